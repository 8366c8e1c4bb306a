"""The trainer's metrics: the statistics of a logging window, their reduction on the way to the
host, MFU, peak memory and metrics.jsonl (docs/design.md)."""

from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fastalign.config import TrainConfig
from fastalign.hardware import gpu_for_device_name
from fastalign.reporting import open_reporters


@dataclass
class Window:
    """Statistics of the optimizer steps since the last metrics line.

    `device_sums` stays on the device (no host sync per micro-batch): [sum loss_g, sum nll_best,
    sum penalty, active penalties]; host-side counts come from the batches' shapes.
    """

    device_sums: torch.Tensor
    groups: int = 0
    tokens: int = 0  # sequence tokens: query + response per response, as the unshared layout counts
    computed_tokens: int = 0  # positions run through the layers (fewer with --share_prefix)
    tokens_x_len: int = 0  # sum over segments of Lq * (2 Lk - Lq) (= length^2 unshared; attention FLOPs)
    lr: float = 0.0  # the LR of the window's last step
    started: float = 0.0
    paused: float = 0.0  # seconds of evaluation and checkpointing inside the window (not training)

    def training_seconds(self) -> float:
        return time.perf_counter() - self.started - self.paused

    @classmethod
    def new(cls, device) -> Window:
        return cls(torch.zeros(4, dtype=torch.float64, device=device), started=time.perf_counter())


@dataclass
class PendingLog:
    """A logging step's statistics, reduced over ranks, on their way to the host."""

    step: int
    epoch: float
    lr: float
    elapsed: float  # training seconds of the window (host clock; evaluation and saving excluded)
    values: torch.Tensor  # float64 [10 + world size], see Trainer._start_log
    ready: torch.cuda.Event | None  # CUDA: recorded after the copy to the host


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in FLOP/s, for MFU; None on CPU and on an unknown GPU."""
    if device.type != "cuda":
        return None
    gpu = gpu_for_device_name(torch.cuda.get_device_name(device))
    return gpu.tflops * 1e12 if gpu is not None else None


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


METRICS_FILE = "metrics.jsonl"


def _logged_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class MetricsLog:
    """metrics.jsonl (+ the --report_to integrations, fastalign.reporting) on rank 0."""

    def __init__(self, output_dir: Path, enabled: bool, config: TrainConfig, resume_step: int | None):
        self.enabled = enabled
        self.path = output_dir / METRICS_FILE
        self.reporters: list = []
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            # Keep the lines up to the checkpoint: the interrupted run's later lines (and a line it
            # may have left half written) are redone.
            kept = [line for line in self.path.read_text().splitlines()
                    if _logged_step(line) is not None and _logged_step(line) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.reporters = open_reporters(config.report_to, output_dir=output_dir,
                                        logging_dir=Path(config.logging_dir), run_name=config.run_name,
                                        config=vars(config))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for reporter in self.reporters:
            reporter.write(record)

    def close(self) -> None:
        """Finish the reporters (once: the trainer closes on success, main() on every exit)."""
        reporters, self.reporters = self.reporters, []
        for reporter in reporters:
            reporter.close()
