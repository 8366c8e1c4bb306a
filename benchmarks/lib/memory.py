"""Peak memory of a training loop, measured the same way by every benchmark.

Details: docs/design.md section 7.31.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.lib.timing import synchronize


def _proc_status_kib(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """Current resident set size of this process."""
    kib = _proc_status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    return peak_rss_bytes()  # no /proc: the best available upper bound


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (VmHWM, else ru_maxrss)."""
    kib = _proc_status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB on Linux


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def release_free_heap() -> bool:
    """Give freed heap memory back to the OS (glibc malloc_trim), so RSS tracks live memory."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):  # not glibc
        return False


# Child processes measured by RSS get this malloc setting: large blocks are mmap'd and unmapped on
# free instead of staying in the heap, so a freed activation does not inflate later RSS readings.
CPU_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


@dataclass
class PeakMemory:
    """Peak memory of a training loop on one device (docs/design.md section 7.31).

    Call `start()` after imports and data preparation, build the model, run the warm-up steps,
    then `reset_peak()` and the measured steps; `peak_bytes()` is then the steady-state training
    peak: CUDA: max allocated bytes since reset_peak (absolute, so weights, gradients and optimizer
    state on the GPU count); CPU: peak RSS since reset_peak minus the RSS at start (again weights,
    optimizer state and everything the model holds count; load-time transients do not).
    """

    device: Any
    base_bytes: int = 0
    peak_reset: bool = True

    def start(self) -> PeakMemory:
        import torch

        self.device = torch.device(self.device)
        if self.device.type == "cpu":
            release_free_heap()
            self.base_bytes = rss_bytes()
        return self.reset_peak()

    reset = start  # measure from now on (base and peak both reset)

    def reset_peak(self) -> PeakMemory:
        import torch

        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            release_free_heap()
            self.peak_reset = reset_peak_rss()
        return self

    def peak_bytes(self) -> int:
        import torch

        if self.device.type == "cuda":
            synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        return max(peak_rss_bytes() - self.base_bytes, 0)

    def describe(self) -> dict[str, Any]:
        if self.device.type == "cuda":
            return {"method": "torch.cuda.max_memory_allocated since reset_peak_memory_stats"}
        return {"method": "VmHWM since the last peak reset (malloc_trim, clear_refs) - VmRSS at start "
                          "(own process)", "peak_reset": self.peak_reset,
                "base_rss_bytes": self.base_bytes, "env": CPU_MEMORY_ENV}
