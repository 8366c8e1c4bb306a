"""A command's `main` run as N ranks forked from the test's process, for the end-to-end tests
where several ranks, not the launcher, are the point (equal results on 1, 2 and 4 ranks, FSDP
shards, collectives).

Why forks: each rank of `torchrun` or `python -m` imports torch and fastalign afresh (about 3 s of
CPU per process on a 2-core box, plus 2 s for torchrun's own agent); a fork inherits the test
process's imports and starts in milliseconds. The ranks still are separate processes joined by a
gloo process group through MASTER_ADDR/MASTER_PORT, as torchrun's are; what torchrun itself does
(signals to the group, relaunch, its exit status) is tested through torchrun elsewhere.

With CUDA, callers use the subprocess launchers instead: a forked child cannot use a CUDA context
its parent may hold.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Seconds the other ranks get to end after one exits non-zero (they usually exit 2 on the same
# error); then they are killed (status -9), as torchrun ends the group when a rank fails instead of
# waiting out the collectives.
FAILED_RANK_GRACE_S = 20


def signal_group(pid: int, sig: int) -> None:
    """`sig` to the process group `pid` leads, or to `pid` alone where it has none (setpgid failed or
    not reached yet)."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


class RankRuns(subprocess.CompletedProcess):
    """The ranks' outcome as one CompletedProcess (stdout and stderr concatenated in rank order;
    returncode 0 when every rank exited 0, else the first rank's non-zero status), with each rank's
    own outcome in `ranks`."""

    def __init__(self, args: list[str], ranks: list[subprocess.CompletedProcess]):
        failed = [r.returncode for r in ranks if r.returncode != 0]
        super().__init__(args, failed[0] if failed else 0, "".join(r.stdout for r in ranks),
                         "".join(r.stderr for r in ranks))
        self.ranks = ranks


def run_rank(main: Callable[[Sequence[str] | None], int | None], args: list[str], env: dict[str, str],
              logs: Path, rank: int) -> None:
    """The child's whole life: fresh stdio into its own files, rank environment, one thread, the
    default warning filters and no log handler (as in a new interpreter), then `run_main`; never
    returns (os._exit skips the parent's atexit handlers and pytest's teardown)."""
    status = 1
    try:
        for fd, name in ((1, "out"), (2, "err")):
            target = os.open(logs / f"{rank}.{name}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(target, fd)
            os.close(target)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 (lives until os._exit)
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        os.environ.update(env)
        logging.getLogger().handlers = []
        warnings.resetwarnings()
        warnings.simplefilter("default")
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", category)
        torch.set_num_threads(1)
        from fastalign.cli import run_main

        status = run_main(main, args)
    except SystemExit as exit_:  # argparse's usage errors
        status = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:  # a bug: the traceback, status 1, as the interpreter would
        traceback.print_exc()
    finally:
        try:
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(status)


def run_forked(main: Callable[[Sequence[str] | None], int | None], args: Sequence[object], nproc: int = 1,
               timeout: float = 300, extra_env: dict[str, str] | None = None) -> RankRuns:
    """`main(args)` in `nproc` forked ranks (RANK, WORLD_SIZE, MASTER_PORT ... as torchrun sets
    them when nproc > 1); waits for all, kills all after `timeout` seconds (an AssertionError with
    what each rank wrote), and the rest FAILED_RANK_GRACE_S after a rank exits non-zero."""
    if dist.is_initialized():
        raise RuntimeError("fork ranks from a process without a process group (the children would inherit it)")
    args = [str(arg) for arg in args]
    env = {"OMP_NUM_THREADS": "1", **(extra_env or {})}
    if nproc > 1:
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(nproc),
                   LOCAL_WORLD_SIZE=str(nproc))
    logs = Path(tempfile.mkdtemp(prefix="fastalign-ranks-"))
    sys.stdout.flush()
    sys.stderr.flush()
    pids: list[int] = []
    statuses: dict[int, int] = {}
    timed_out = rank_failed = False
    try:
        for rank in range(nproc):
            rank_env = dict(env, RANK=str(rank), LOCAL_RANK=str(rank)) if nproc > 1 else env
            pid = os.fork()
            if pid == 0:
                try:
                    run_rank(main, args, rank_env, logs, rank)
                finally:
                    os._exit(1)  # never back into the test session
            pids.append(pid)
        deadline = time.monotonic() + timeout
        while len(statuses) < nproc and time.monotonic() < deadline:
            for pid in pids:
                if pid not in statuses:
                    done, status = os.waitpid(pid, os.WNOHANG)
                    if done:
                        statuses[pid] = os.waitstatus_to_exitcode(status)
                        if statuses[pid] != 0 and not rank_failed:  # as torchrun: the others are ended
                            rank_failed = True
                            deadline = min(deadline, time.monotonic() + FAILED_RANK_GRACE_S)
            time.sleep(0.01)
        timed_out = len(statuses) < nproc and not rank_failed
    finally:
        for pid in pids:
            if pid not in statuses:
                os.kill(pid, signal.SIGKILL)
                statuses[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        ranks = [subprocess.CompletedProcess(args, statuses[pid], _read(logs / f"{rank}.out"),
                                             _read(logs / f"{rank}.err")) for rank, pid in enumerate(pids)]
        shutil.rmtree(logs, ignore_errors=True)
    result = RankRuns(args, ranks)
    if timed_out:
        raise AssertionError(f"{nproc} forked ranks still running after {timeout} s:\n{result.stderr[-4000:]}")
    return result
