"""Shared command-line plumbing: clean error exits instead of tracebacks, and flag value types.

The flag types are shared by every `python -m fastalign.*` command, so a flag that two commands
have (`--bf16`, `--model_max_length`, ...) reads and fails the same way in both.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from fastalign.errors import FastalignError


def run_main(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a CLI `main(argv)`; a `FastalignError` becomes `error: <message>` and exit status 2
    (its `label` and `exit_code`: a run stopped by a signal prints `stopped:` and exits 128 + signal).

    Interrupts exit 130. Other exceptions propagate (a traceback there means a bug in fastalign).
    """
    try:
        return int(main(argv) or 0)
    except FastalignError as err:
        print(f"{err.label}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def gloo_threads_alive() -> bool:
    """Whether this process still has gloo's threads (torch names them pt_gloo_runloop and
    gloo_tcp_loop); False where /proc/self/task cannot tell (not Linux).

    A thread names itself when it first runs, so one not yet scheduled is missed; that one has
    executed no collective and so holds nothing that could be released late.
    """
    try:
        tasks = list(Path("/proc/self/task").iterdir())
    except OSError:
        return False
    for task in tasks:
        try:
            if "gloo" in (task / "comm").read_text():
                return True
        except OSError:  # the thread ended while we looked
            continue
    return False


def exit_process(status: int) -> NoReturn:
    """End a command's process with `status`: `sys.exit(status)`, except that a process still
    holding gloo's worker threads ends at once (os._exit) after its output is flushed.

    Why: gloo's worker threads release a finished collective's tensors on their own time. When
    that happens after the interpreter has begun finalising, the thread needs the GIL, Python ends
    it with pthread_exit, and the unwinding aborts the whole process ("terminate called without
    an active exception", status -6) after all of its work succeeded (gdb: the release comes from
    ~AsyncBarrierWork in ProcessGroupGloo::runLoop while the main thread is in Py_FinalizeEx).
    destroy_process_group does not end those threads: the group lives on in the DeviceMesh that
    DTensor's sharding cache keeps. Seen in 2 of 140 two-rank CPU runs. Every entry point
    that may run a process group ends with `exit_process(run_main(main))`; whatever must reach
    disk is closed before (metrics, reporters, checkpoints), and stdio and logging are flushed
    here. Where no gloo thread is left, the interpreter finalises as usual (atexit handlers run).
    """
    if not gloo_threads_alive():
        sys.exit(status)
    logging.shutdown()  # flushes and closes every handler
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can be written anyway
            pass
    os._exit(status)


def str_to_bool(value: str) -> bool:
    """HF's boolean flag values: True/False, yes/no, y/n, 1/0, t/f (any case)."""
    text = str(value).strip().lower()
    if text in ("true", "yes", "y", "1", "t"):
        return True
    if text in ("false", "no", "n", "0", "f"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


# add_argument keywords of a boolean flag as HF writes them: `--bf16 True`, `--bf16 False`, or a
# bare `--bf16` (True). Give the default next to it: add_argument("--bf16", default=False, **BOOLEAN_FLAG)
BOOLEAN_FLAG = dict(type=str_to_bool, nargs="?", const=True, metavar="True|False")


def number(kind: type, *, low: float | None = None, high: float | None = None, low_open: bool = False,
           what: str = "") -> Callable[[str], int | float]:
    """An argparse type: `kind(text)`, finite, >= low (> low when low_open) and <= high.

    `what` names the expected value in the error ("a positive integer"); argparse prefixes the flag.
    """

    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what or kind.__name__}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low}, got {text!r}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {text!r}")
        return value

    convert.__name__ = what or kind.__name__  # argparse names the type in "invalid <name> value"
    return convert


positive_int = number(int, low=1, what="a positive integer")
nonneg_float = number(float, low=0.0, what="a number >= 0")
positive_float = number(float, low=0.0, low_open=True, what="a number > 0")
