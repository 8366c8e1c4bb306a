"""Stopping cleanly on SIGTERM / SIGINT (cluster preemption, Ctrl-C).

The first signal only raises a flag: the trainer finishes the optimizer step it is in, writes a
checkpoint (unless --save_strategy no) and exits with 128 + the signal number (143 for SIGTERM,
130 for SIGINT), naming the checkpoint to resume from. A second signal exits at once, without
saving: the first restores the signals' default action, so the kernel ends the process (status
128 + signal in a shell) even while it is blocked in C, e.g. in a collective waiting on a dead
peer, where a Python handler would not run until the call returned. Under torchrun a signal may
reach only some ranks (a scheduler that signals one process, a node that is drained): the ranks
agree on the flag once per step with one all_reduce of a single int on a CPU (gloo) group, so they
all stop after the same step and no device synchronisation is added to the step.
"""

from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist

from fastalign.errors import FastalignError

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(FastalignError):
    """The run stopped on a signal after saving what it could; exits 128 + signal number."""

    label = "stopped"

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopOnSignal:
    """Context manager: while active, SIGTERM/SIGINT set `signum` instead of killing the process.

    `requested()` is collective (every rank calls it once per step) and returns the signal number
    any rank received, or 0.
    """

    def __init__(self):
        self.signum = 0
        self._previous: dict[int, object] = {}
        self._group = None

    def __enter__(self) -> StopOnSignal:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        if dist.is_initialized() and dist.get_world_size() > 1:
            # The flag's own group: a CPU all_reduce (gloo) never waits for queued GPU work.
            self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._group is not None:
            dist.destroy_process_group(self._group)
            self._group = None

    def _handle(self, signum: int, frame) -> None:
        # The flag first: nothing below may lose it. os.write, not print: a handler that
        # interrupts a write to stderr (tqdm writes there all the time) must not write through
        # the same buffered stream ("reentrant call").
        self.signum = signum
        # A second signal gets the default action (the kernel ends the process with 128 +
        # signal), even while this process is blocked in C (a collective waiting on a dead
        # peer, a device sync, a checkpoint write), where a Python handler would never run.
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        name = signal.Signals(signum).name
        os.write(2, f"\n{name}: finishing the current step, then saving a checkpoint and stopping "
                    f"(send it again to exit at once, without saving)\n".encode())

    def requested(self) -> int:
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return int(flag.item())
