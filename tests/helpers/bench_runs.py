"""Running a benchmark script for the end-to-end tests: as a user does (`python benchmarks/NAME.py
ARGS`, `run_script`), or its `main(ARGS)` in a process forked from the test's (`run_bench`), or
several such runs ahead of the tests that read them (`RunPool`).

A script's own child processes (its workers, torchrun ranks, start-up probes, training runs) are
what it measures, so they stay real processes either way; `run_bench` saves the seconds of imports
the script's top level would pay in a fresh interpreter, since the fork inherits the test
process's. With CUDA both are `run_script`: a forked child cannot use CUDA.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from helpers.forked import run_forked, run_rank, signal_group

REPO = Path(__file__).resolve().parents[2]


def script_env() -> dict[str, str]:
    """What `run_script` adds to the environment: the tree on PYTHONPATH (the scripts' workers and
    ranks import from it), no tokenizer thread pools."""
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "TOKENIZERS_PARALLELISM": "false"}


def run_script(script: str, *argv: object, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python benchmarks/SCRIPT.py ARGV` from the repository root, its output captured."""
    return subprocess.run([sys.executable, str(REPO / script), *map(str, argv)], cwd=REPO,
                          env=dict(os.environ, **script_env()), capture_output=True, text=True, timeout=timeout)


# What most scripts' top levels import on first use (transformers' tokenizers and model code alone
# are seconds of CPU): imported once in the test process, every forked run inherits them.
WARM_MODULES = ("fastalign.train", "fastalign.tiny", "fastalign.demo", "fastalign.checkpoint",
                "transformers.models.llama.modeling_llama")


@functools.cache
def warm_imports() -> None:
    for name in WARM_MODULES:
        importlib.import_module(name)


def run_bench(name: str, *argv: object, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python benchmarks/NAME.py ARGV` as `benchmarks.NAME.main(ARGV)` in a process forked from this
    one (helpers/forked.py): the same exit status (run_main's: 2 and an `error:` line for a clean
    error), stdout and stderr. With CUDA it is `run_script`."""
    if torch.cuda.is_available():
        return run_script(f"benchmarks/{name}.py", *argv, timeout=timeout)
    warm_imports()
    module = importlib.import_module(f"benchmarks.{name}")
    return run_forked(module.main, list(argv), timeout=timeout, extra_env=script_env())


@dataclass
class _Started:
    pid: int
    logs: Path
    deadline: float
    argv: list[str]


@dataclass
class RunPool:
    """Benchmark runs started before the tests that read them, `slots` at a time, each `run_bench`'s
    forked `main` in a process group of its own (with its workers, ranks and probes).

    Most runs spend seconds in one process at a time (probes, world sizes, training runs one after
    the other), so two side by side keep both cores of a small machine busy. Nothing in them is
    timed against a limit, and each run's results go to its own folder. `add` queues a run (in the
    order they start), `result` waits for one (starting queued ones as slots free up), `close`
    kills what still runs. With CUDA, `result` is `run_script` at that moment."""

    slots: int = 2
    queued: dict[str, tuple[str, list[str], float]] = field(default_factory=dict)
    started: dict[str, _Started] = field(default_factory=dict)
    done: dict[str, subprocess.CompletedProcess] = field(default_factory=dict)

    def add(self, key: str, name: str, *argv: object, timeout: float = 600) -> None:
        self.queued[key] = (name, [str(arg) for arg in argv], timeout)

    def start(self) -> RunPool:
        self._fill()
        return self

    def result(self, key: str) -> subprocess.CompletedProcess:
        if torch.cuda.is_available():
            name, argv, timeout = self.queued.pop(key)
            return run_script(f"benchmarks/{name}.py", *argv, timeout=timeout)
        while key not in self.done:
            if key not in self.queued and key not in self.started:
                raise KeyError(f"no run {key!r} was added")
            self._reap()
            self._fill()
            time.sleep(0.02)
        result = self.done[key]
        if result.returncode is None:
            raise AssertionError(f"{key}: still running after its timeout:\n{result.stderr[-4000:]}")
        return result

    def close(self) -> None:
        self.queued.clear()
        for run in self.started.values():
            self._kill(run)
        for key in list(self.started):
            self._finish(key, None)

    def _fill(self) -> None:
        if torch.cuda.is_available():
            return
        while self.queued and len(self.started) < self.slots:
            key = next(iter(self.queued))
            name, argv, timeout = self.queued.pop(key)
            warm_imports()
            main = importlib.import_module(f"benchmarks.{name}").main
            logs = Path(tempfile.mkdtemp(prefix=f"fastalign-bench-{key}-"))
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                try:
                    with contextlib.suppress(OSError):  # the run and its workers: one group to kill on a timeout
                        os.setpgid(0, 0)
                    run_rank(main, argv, {"OMP_NUM_THREADS": "1", **script_env()}, logs, 0)
                finally:
                    os._exit(1)  # never back into the test session
            with contextlib.suppress(OSError):  # also here: the group exists before any kill (either may run first)
                os.setpgid(pid, pid)
            self.started[key] = _Started(pid, logs, time.monotonic() + timeout, argv)

    def _reap(self) -> None:
        for key, run in list(self.started.items()):
            done, status = os.waitpid(run.pid, os.WNOHANG)
            if done:
                self._finish(key, os.waitstatus_to_exitcode(status))
            elif time.monotonic() > run.deadline:
                self._kill(run)
                self._finish(key, None)

    def _kill(self, run: _Started) -> None:
        """SIGTERM to the run's group first: a torchrun agent among them forwards it to its workers,
        which live in sessions of their own; SIGKILL to what is left after a grace period."""
        signal_group(run.pid, signal.SIGTERM)
        until, reaped = time.monotonic() + 5.0, False
        while not reaped and time.monotonic() < until:
            reaped = os.waitpid(run.pid, os.WNOHANG)[0] != 0
            time.sleep(0.05)
        signal_group(run.pid, signal.SIGKILL)
        if not reaped:
            os.waitpid(run.pid, 0)

    def _finish(self, key: str, returncode: int | None) -> None:
        run = self.started.pop(key)
        out, err = ((run.logs / f"0.{name}").read_text(errors="replace") if (run.logs / f"0.{name}").exists()
                    else "" for name in ("out", "err"))
        shutil.rmtree(run.logs, ignore_errors=True)
        self.done[key] = subprocess.CompletedProcess(run.argv, returncode, out, err)
