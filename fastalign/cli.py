"""Shared command-line plumbing: clean error exits instead of tracebacks, and flag value types.

The flag types are shared by every `python -m fastalign.*` command, so a flag that two commands
have (`--bf16`, `--model_max_length`, ...) reads and fails the same way in both.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Callable, Sequence

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
