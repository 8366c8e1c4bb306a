"""--profile_steps N: where a training step's time goes.

Details: docs/design.md section 7.26.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from fastalign.distributed import broadcast_object
from fastalign.errors import FastalignError

log = logging.getLogger("fastalign.train")

PREFIX = "fastalign/"
PHASES = ("data", "forward", "loss_head", "backward", "optimizer")
CATEGORIES = PHASES + ("communication", "host_wait", "other")
PAUSED = "paused"
# Which label a piece of time covered by several ranges gets: the lowest number wins.
_PRIORITY = {PAUSED: 0, "host_wait": 1, "communication": 2, "loss_head": 3,
             "data": 4, "forward": 4, "backward": 4, "optimizer": 4}
_COMM_PREFIXES = ("c10d::", "gloo:", "nccl:")
_WAIT_NAMES = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaEventSynchronize")
TRACE_NAME = "rank{rank}.pt.trace.json"
SUMMARY_FILE = "summary.json"

_recording = False  # a StepProfiler is running: regions are recorded (and synchronize on CUDA)


@contextlib.contextmanager
def region(phase: str) -> Iterator[None]:
    """Mark a phase of the step for the profiler; nothing at all when no profile is running."""
    if not _recording:
        yield
        return
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    with torch.profiler.record_function(PREFIX + phase):
        if cuda:
            torch.cuda.synchronize()  # the previous phase's device work is not this one's
        yield
        if cuda:
            torch.cuda.synchronize()  # this phase's device work ends inside its range


def classify(name: str, on_device: bool) -> str | None:
    """The label of a profiler event by its name (None: not one the breakdown uses)."""
    if name.startswith(PREFIX):
        label = name[len(PREFIX):]
        return label if label in _PRIORITY else None
    if on_device:
        return "communication" if "nccl" in name.lower() else None
    if name.startswith(_COMM_PREFIXES) or name == "record_param_comms":
        return "communication"
    if name in _WAIT_NAMES:
        return "host_wait"
    return None


def breakdown(steps: list[tuple[float, float]], ranges: list[tuple[str, float, float]]) -> dict:
    """Seconds per category of the steps [(start, end)] (any time unit in, seconds out when the
    unit is microseconds), given labelled ranges [(label, start, end)]; see docs/design.md section 7.26.

    Returns {"steps": n, "step_time_s": mean step time, "seconds": {category: mean per step},
    "share": {category: fraction of the step time}}."""
    totals = dict.fromkeys(CATEGORIES, 0.0)
    step_time = 0.0
    for step_start, step_end in steps:
        inside = [(label, max(start, step_start), min(end, step_end)) for label, start, end in ranges
                  if start < step_end and end > step_start]
        cuts = sorted({step_start, step_end, *(t for _, start, end in inside for t in (start, end))})
        for a, b in zip(cuts, cuts[1:]):
            covering = [label for label, start, end in inside if start <= a and end >= b]
            label = min(covering, key=_PRIORITY.__getitem__) if covering else "other"
            if label == PAUSED:
                continue
            totals[label] += b - a
            step_time += b - a
    n = max(1, len(steps))
    return {"steps": len(steps), "step_time_s": step_time / n / 1e6,
            "seconds": {k: v / n / 1e6 for k, v in totals.items()},
            "share": {k: (v / step_time if step_time else 0.0) for k, v in totals.items()}}


def events_breakdown(results, complete_steps: int) -> dict:
    """`breakdown` of a torch.profiler run's raw Kineto events (`results` is `profile.profiler.kineto_results`),
    over its first `complete_steps` steps (a profile ended before its schedule holds a last, unfinished one).

    Raw events, not `profile.events()`: that builds a Python FunctionEvent per event and their tree,
    about 3 s per 45,000 events (two steps of the tiny test model; a real model records far more),
    while every other rank waits for this one's summary. The breakdown needs names and times only."""
    steps, ranges = [], []
    origin = results.trace_start_ns()  # times relative to it, in integers: float64 would round absolute ns
    for event in results.events():
        if getattr(event, "is_hidden_event", lambda: False)():  # profile.events() leaves them out too
            continue
        name = event.name()
        start, end = (event.start_ns() - origin) / 1e3, (event.end_ns() - origin) / 1e3  # us, as breakdown assumes
        if name.startswith("ProfilerStep"):  # "ProfilerStep#k", as in the trace
            steps.append((start, end))
            continue
        label = classify(name, event.device_type() != torch.autograd.DeviceType.CPU)
        if label is not None:
            ranges.append((label, start, end))
    return breakdown(sorted(steps)[:complete_steps], ranges)


def format_summary(summary: dict) -> str:
    """The log's table: each category's ms per step and share of the step time."""
    lines = [f"profile of {summary['steps']} steps (mean over {summary['world_size']} ranks): "
             f"{summary['step_time_s'] * 1e3:.1f} ms per step",
             f"  {'phase':<14}{'ms/step':>10}{'share':>9}"]
    for category in CATEGORIES:
        lines.append(f"  {category:<14}{summary['seconds'][category] * 1e3:>10.2f}"
                     f"{summary['share'][category]:>9.1%}")
    return "\n".join(lines)


def mean_over_ranks(per_rank: list[dict]) -> dict:
    n = len(per_rank)
    step_time = sum(r["step_time_s"] for r in per_rank) / n
    seconds = {c: sum(r["seconds"][c] for r in per_rank) / n for c in CATEGORIES}
    return {"steps": per_rank[0]["steps"], "world_size": n, "step_time_s": step_time, "seconds": seconds,
            "share": {c: (s / step_time if step_time else 0.0) for c, s in seconds.items()}}


class StepProfiler:
    """torch.profiler over `steps` optimizer steps after the first; `step()` after each one.

    Use as a context manager around the loop. Without steps (--profile_steps 0) every method is
    free. Collective when the profile ends (every rank calls `step()` equally often): the
    per-rank breakdowns are gathered to rank 0, which writes summary.json and logs the table."""

    def __init__(self, steps: int, output_dir: Path, rank: int):
        self.steps = steps
        self.directory = output_dir / "profile"
        self.rank = rank
        self.profile = None
        self.failed = False  # the loop raised: no collective, no summary (a peer may be gone)
        self.written = False

    def __enter__(self) -> StepProfiler:
        global _recording
        if not self.steps:
            return self
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profile = torch.profiler.profile(
            activities=activities, on_trace_ready=self._write,
            schedule=torch.profiler.schedule(wait=0, warmup=1, active=self.steps, repeat=1))
        self.profile.__enter__()
        _recording = True
        return self

    def step(self) -> None:
        if self.profile is not None:
            self.profile.step()

    def data(self, batches: Iterable) -> Iterator:
        """`batches`, each one's packing inside the data region."""
        iterator = iter(batches)
        while True:
            with region("data"):
                item = next(iterator, StopIteration)
            if item is StopIteration:
                return
            yield item

    def __exit__(self, exc_type, exc, tb) -> None:
        global _recording
        self.failed = exc_type is not None
        _recording = False
        profile, self.profile = self.profile, None
        if profile is not None:
            profile.__exit__(None, None, None)  # writes the trace if it stopped while recording
            if not (self.written or self.failed) and self.rank == 0:
                log.warning("--profile_steps %d: the run ended before a step could be profiled "
                            "after the warm-up step; no trace written", self.steps)

    def _write(self, profile) -> None:
        global _recording
        _recording = False  # the N steps are done: no more synchronizing regions
        # step() calls so far: 1 warm-up + the recorded steps that finished
        mine = events_breakdown(profile.profiler.kineto_results,
                                complete_steps=min(self.steps, profile.step_num - 1))
        if self.failed or not mine["steps"]:  # no step ended while recording: nothing to show
            return  # (the same on every rank: they step together)
        self.written = True
        trace = self.directory / TRACE_NAME.format(rank=self.rank)
        problem = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            profile.export_chrome_trace(str(trace))
        except OSError as err:
            problem = f"writing {trace} failed: {err.strerror or err}"
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (mine, problem))
        self._raise_if_any(gathered)
        if self.rank == 0:
            summary = mean_over_ranks([mine for mine, _ in gathered])
            path = self.directory / SUMMARY_FILE
            try:
                path.write_text(json.dumps({**summary, "per_rank": [mine for mine, _ in gathered],
                                            "categories": list(CATEGORIES)}, indent=1) + "\n")
            except OSError as err:
                problem = f"writing {path} failed: {err.strerror or err}"
            else:
                log.info("%s\n  traces and summary.json in %s", format_summary(summary), self.directory)
        self._raise_if_any([(None, broadcast_object(problem))])  # rank 0's summary.json

    def _raise_if_any(self, gathered: list) -> None:
        """The same error on every rank when one could not write its part of the profile."""
        problems = [problem for _, problem in gathered if problem is not None]
        if problems:
            raise FastalignError(f"--profile_steps: {problems[0]}; training stopped after the "
                                 f"profiled steps (run without --profile_steps, or free the disk)")
