"""Reading a benchmark's result files: the one JSON file a run wrote, and numbers a reader can use."""

from __future__ import annotations

import json
import math
from pathlib import Path


def only_json(directory: Path, prefix: str) -> dict:
    files = sorted(directory.glob(f"{prefix}-*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def finite(value, *, positive: bool = False) -> bool:
    """A number a reader can use: int/float (not bool, not None), finite, and > 0 if asked."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return ok and (value > 0 if positive else value >= 0)
