"""Terminal output beside a tqdm progress bar: every log line starts on a line of its own.

A bar redraws itself in place ("\\r...tok_s=9313]") and leaves the cursor at the end of its line.
A plain stream handler would append the next log line there; `TqdmHandler` writes through
`tqdm.write`, which clears the bar, prints the line and redraws the bar below it. A bar that is
open when an error ends the run is closed first (`Trainer.train`), so `error: ...` starts a line too.
"""

from __future__ import annotations

import logging
import sys

LOG_FORMAT = "[fastalign %(asctime)s] %(message)s"


class TqdmHandler(logging.Handler):
    """Writes records to stderr through tqdm.write (clears and redraws any active bar)."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # as logging.StreamHandler: a failing log line must not end the run
            self.handleError(record)


def setup_logging(is_main: bool) -> None:
    """INFO on rank 0, warnings and errors only elsewhere, all through `TqdmHandler`."""
    handler = TqdmHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, handlers=[handler])
