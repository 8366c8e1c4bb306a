"""A function's result computed in a process forked from the test's, collected later: for a
module's run that mostly waits (sleeps that stand in for slow saves) while the module's other
tests go on beside it.

The child returns through a JSON file (JSON values and CompletedProcess; no pickle) and ends with
os._exit (no pytest teardown, no atexit handler of the parent); it leads its own process group, so
that `close` ends what it started.
With CUDA the function runs at once in this process instead: a forked child must not touch a
CUDA context its parent may hold.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from helpers.forked import signal_group


class Pending:
    """`fn(*args)` started now; `result()` waits for it and returns its value (or raises an
    AssertionError with the child's traceback); `close()` kills it if no one collected it."""

    def __init__(self, fn: Callable[..., Any], *args: Any):
        self.pid = None
        self.value: tuple[str, Any] | None = None
        if torch.cuda.is_available():
            self.value = self._call(fn, args)
            return
        fd, name = tempfile.mkstemp(prefix="fastalign-pending-", suffix=".json")
        os.close(fd)
        self.path = Path(name)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                os.setpgid(0, 0)  # its own group: close() ends the processes it forks too
                quiet = os.open(os.devnull, os.O_WRONLY)  # not into pytest's capture of whichever test runs now
                os.dup2(quiet, 1)
                os.dup2(quiet, 2)
                outcome = self._call(fn, args)
                self.path.write_text(json.dumps(outcome, default=_encode))
                status = 0
            finally:
                os._exit(status)
        self.pid = pid

    @staticmethod
    def _call(fn: Callable[..., Any], args: tuple) -> tuple[str, Any]:
        try:
            return "value", fn(*args)
        except BaseException:  # the test that collects it fails with this
            return "error", traceback.format_exc()

    def result(self, timeout: float = 300) -> Any:
        if self.value is None:
            deadline = time.monotonic() + timeout
            status = None
            while status is None and time.monotonic() < deadline:
                done, raw = os.waitpid(self.pid, os.WNOHANG)
                if done:
                    status = os.waitstatus_to_exitcode(raw)
                else:
                    time.sleep(0.02)
            if status is None:
                self.close()
                raise AssertionError(f"{self.pid} still running after {timeout} s")
            self.pid = None
            outcome = self.path.read_bytes()
            self.path.unlink()
            if status != 0 or not outcome:
                raise AssertionError(f"the forked process ended with status {status} and no result")
            self.value = json.loads(outcome, object_hook=_decode)
        kind, value = self.value
        if kind == "error":
            raise AssertionError(f"the forked process raised:\n{value}")
        return value

    def close(self) -> None:
        if self.pid is not None:
            signal_group(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.pid = None
            self.path.unlink(missing_ok=True)


def _encode(value: Any) -> dict:
    if isinstance(value, subprocess.CompletedProcess):
        return {"completed_process": [value.args, value.returncode, value.stdout, value.stderr]}
    raise TypeError(f"a background result must be JSON or a CompletedProcess, not {type(value).__name__}")


def _decode(obj: dict) -> Any:
    return subprocess.CompletedProcess(*obj["completed_process"]) if set(obj) == {"completed_process"} else obj
