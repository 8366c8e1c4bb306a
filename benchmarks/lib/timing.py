"""Wall-clock timing with the device synchronised, and summaries of repeated measurements.

torch is imported inside `synchronize`, for start-up time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any


def synchronize(device: str | Any) -> None:
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: str | Any) -> tuple[Any, float]:
    """Run fn once; return (its result, wall seconds) with the device synchronised on both ends."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        raise ValueError("median of no values")
    mid = n // 2
    return ordered[mid] if n % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def summarize_times(times: Sequence[float]) -> dict[str, float]:
    return {"median_s": median(times), "min_s": min(times), "max_s": max(times), "mean_s": sum(times) / len(times),
            "n": len(times)}
