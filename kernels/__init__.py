"""Triton kernels for fastalign, each beside a plain-PyTorch twin (used on CPU and as test oracle).

This top-level package is named `kernels`; transformers probes an optional hub package of the same
import name. Our distribution is `fastalign` (version < 0.18), so transformers' check
`is_kernels_available()` stays False (tests/test_packaging.py asserts it).
"""
