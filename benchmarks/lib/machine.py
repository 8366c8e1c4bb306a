"""What ran a benchmark: CPU, memory, GPU, library versions, source commit; device names for
result files; a GPU's peak dense bf16 throughput and the model FLOPs utilisation against it.

torch and fastalign are imported inside the functions that use them, for start-up time: importing
this module (gpu_check.py's parent process, a script's `--help`) loads neither.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

from benchmarks.lib.paths import REPO_ROOT


def slug(text: str) -> str:
    """`NVIDIA H100 80GB HBM3` -> `nvidia-h100-80gb-hbm3` (safe in file names)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_tag(device: str | Any) -> str:
    """Short device name for result file names: `cpu-2c` or the GPU name slug."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return slug(torch.cuda.get_device_name(device))
    return f"cpu-{_cpu_count()}c"


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # absent or broken install: report it as missing, do not fail the benchmark
        return None
    return getattr(mod, "__version__", "unknown")


def _git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("-dirty" if dirty else "")) or None


def machine_info(device: str | Any = "cpu") -> dict[str, Any]:
    """What ran the benchmark: CPU, memory, GPU, library versions, source commit."""
    import torch

    device = torch.device(device)
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_count": _cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "mem_total_bytes": _mem_total_bytes(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "flash_attn": _version("flash_attn"),
        "git_commit": _git_commit(),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu_name=props.name,
            gpu_count=torch.cuda.device_count(),
            gpu_mem_bytes=props.total_memory,
            gpu_capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
            peak_bf16_tflops=peak_bf16_tflops(props.name),
        )
    return info


def machine_summary(info: dict[str, Any]) -> str:
    """One line for tables and RESULTS.md."""
    if "gpu_name" in info:
        return f"1x {info['gpu_name']}, torch {info['torch']}"
    return f"{info['cpu_model']} ({info['cpu_count']} cores), torch {info['torch']}"


def peak_bf16_tflops(device_name: str) -> float | None:
    """Peak dense bf16 tensor-core TFLOP/s of a GPU (without sparsity; vendor data sheets: H100 SXM
    989, H100 PCIe 756, H200 989, A100 312, ...), matched by name; None when unknown. The table is
    the trainer's (`fastalign.hardware.GPUS`), so its logged MFU and the benchmarks' agree."""
    from fastalign.hardware import gpu_for_device_name

    gpu = gpu_for_device_name(device_name)
    return gpu.tflops if gpu is not None else None


def mfu(flops_per_second: float, device: str | Any) -> float | None:
    """Model FLOPs utilisation against the device's peak dense bf16 throughput (None on CPU).

    Count model FLOPs of real tokens only (fastalign.hf_config.LlamaConfig.flops_per_token: 6 x the
    matmul parameters before sharding, embeddings excluded, plus causal attention), so padding
    earns no credit and two implementations of the same step get the same FLOPs."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    peak = peak_bf16_tflops(torch.cuda.get_device_name(device))
    return None if peak is None else flops_per_second / (peak * 1e12)
