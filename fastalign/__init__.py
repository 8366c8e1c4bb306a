"""fastalign: a performance-first trainer for Stable Alignment."""

__version__ = "0.1.0"
