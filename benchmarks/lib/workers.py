"""Worker processes: a parent drives child Python processes over stdin/stdout, one JSON line each
way (`Worker` in the parent, `serve` in the child); and `error_line`, the one line that names a
failure in a child's output."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from benchmarks.lib.memory import CPU_MEMORY_ENV
from benchmarks.lib.paths import REPO_ROOT

_REPLY = "@@fastalign-bench@@ "


@dataclass
class Worker:
    """A child Python process that serves commands over stdin/stdout, one JSON line each way.

    Used to give each side of a comparison its own process (clean peak-RSS accounting, no shared
    allocator) while the parent interleaves their steps. The child runs `serve(handlers)`.
    Anything else the child prints to stdout (library chatter) is passed through to stderr.
    """

    argv: list[str]
    env: dict[str, str] | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> Worker:
        env = {**(os.environ if self.env is None else self.env), **CPU_MEMORY_ENV}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen([sys.executable, *self.argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=REPO_ROOT, bufsize=1)
        return self

    def call(self, cmd: str, **args: Any) -> dict[str, Any]:
        self.send(cmd, **args)
        return self.receive(cmd)

    def send(self, cmd: str, **args: Any) -> None:
        """Ask without waiting: send to several workers, then `receive` from each, and they work
        at the same time (start-up, imports, CUDA initialisation)."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, "args": args}) + "\n")
        self.proc.stdin.flush()

    def receive(self, cmd: str) -> dict[str, Any]:
        """The reply to the last `send`; RuntimeError with the child's traceback if it failed."""
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(_REPLY):
                reply = json.loads(line[len(_REPLY):])
                if "error" in reply:
                    raise RuntimeError(f"worker {self.argv} failed on {cmd!r}:\n{reply['error']}")
                return reply
            sys.stderr.write(line)
        raise RuntimeError(f"worker {self.argv} exited (status {self.proc.wait()}) before answering {cmd!r}")

    def close(self) -> None:
        if self.proc is None:
            return
        try:
            if self.proc.poll() is None:
                self.call("exit")
        except (RuntimeError, BrokenPipeError, OSError):
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def error_line(text: str) -> str:
    """The line that names an exception in a traceback or log (its last `XError: ...` /
    `error: ...` line), else the last line: one line for a table or a verdict."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^(error: |[\w.]*(Error|Exception|Interrupt)\b)", line):
            return line[:300]
    return lines[-1][:300] if lines else "no output"


def serve(handlers: dict[str, Callable[..., dict[str, Any]]]) -> int:
    """Child side of `Worker`: answer JSON commands until `exit` (or stdin closes)."""
    import traceback

    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        if request["cmd"] == "exit":
            print(_REPLY + json.dumps({"ok": True}), flush=True)
            return 0
        try:
            reply = handlers[request["cmd"]](**request.get("args", {}))
        except Exception:  # the parent re-raises it with the child's traceback
            reply = {"error": traceback.format_exc()}
        print(_REPLY + json.dumps(reply, default=str), flush=True)
    return 0
