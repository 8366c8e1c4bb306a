"""Shared command-line plumbing: clean error exits instead of tracebacks."""

from __future__ import annotations

import sys
from typing import Callable, Sequence

from fastalign.errors import FastalignError


def run_main(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a CLI `main(argv)`; a `FastalignError` becomes `error: <message>` and exit status 2.

    Interrupts exit 130. Other exceptions propagate (a traceback there means a bug in fastalign).
    """
    try:
        return int(main(argv) or 0)
    except FastalignError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
