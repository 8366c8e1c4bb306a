"""Terminal output beside a tqdm progress bar: every log line starts on a line of its own.

A bar redraws itself in place ("\\r...tok_s=9313]") and leaves the cursor at the end of its line.
A plain stream handler would append the next log line there; `TqdmHandler` writes through
`tqdm.write`, which clears the bar, prints the line and redraws the bar below it. A bar that is
open when an error ends the run is closed first (`Trainer.train`), so `error: ...` starts a line too.
The trainer shows the bar only when stderr is a terminal; in a file every logging step is one
plain `key=value` line (`format_metrics_line`).
"""

from __future__ import annotations

import logging
import sys

# tqdm is imported where used: `python -m fastalign.train --help` and a refused flag do not pay for it.

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


# Keys of a metrics record shown in its log line, in this order, each with its format; a key the
# record lacks or holds null for (mfu off CUDA, a ranking metric without rated pairs) is left out.
_LINE_FIELDS = (
    ("epoch", "{:.2f}"),
    ("loss", "{:.4f}"), ("nll_best", "{:.4f}"), ("penalty", "{:.4f}"),
    ("lr", "{:.3e}"), ("grad_norm", "{:.4f}"), ("tokens_per_s", "{:.0f}"), ("mfu", "{:.1%}"),
)
_EVAL_FORMAT = "{:.4f}"


def format_metrics_line(record: dict, total_steps: int) -> str:
    """One metrics record as a `key=value` line: `step=12/300 epoch=0.40 loss=2.1234 ...`.

    Plain text with no padding or escape codes, so a person reads it in a terminal or a log file
    and a script splits it on spaces and '='. A training line shows the fields of `_LINE_FIELDS`;
    an evaluation line every `eval_*` key (ranking metrics per category as `eval_<metric>/<category>`).
    """
    parts = [f"step={record['step']}/{total_steps}"]
    for key, fmt in _LINE_FIELDS:
        if record.get(key) is not None:
            parts.append(f"{key}={fmt.format(record[key])}")
    for key, value in record.items():
        if key.startswith("eval_") and value is not None:
            parts.append(f"{'_'.join(key.split())}={_EVAL_FORMAT.format(value)}")  # no space in a key
    return " ".join(parts)
