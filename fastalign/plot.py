"""Plot a training run's metrics.jsonl as one PNG.

Details: docs/design.md section 7.25.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from fastalign.cli import run_main
from fastalign.errors import DataError, FastalignError

METRICS_FILE = "metrics.jsonl"
# (key in metrics.jsonl, panel title); each panel also shows "eval_<key>" when the file has it.
PANELS = (
    ("loss", "loss"),
    ("nll_best", "NLL of the best response"),
    ("penalty", "penalty"),
    ("penalty_active_frac", "active-penalty fraction"),
    ("tokens_per_s", "tokens / s"),
    ("lr", "learning rate"),
)

# Drawn together in the panel beside the loss: (key, legend label).
RANKING_KEYS = (("eval_pairwise_accuracy", "pairwise accuracy"), ("eval_kendall_tau", "Kendall tau-b"),
                ("eval_top1_accuracy", "top-1 accuracy"))
RANKING_TITLE = "eval ranking metrics"

PLOTTED_KEYS = frozenset(["epoch"] + [k for key, _ in PANELS for k in (key, f"eval_{key}")]
                         + [key for key, _ in RANKING_KEYS])


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_metrics(path: Path) -> list[dict]:
    """The JSON objects of a metrics.jsonl file, each with a numeric "step" (DataError otherwise)."""
    if not path.parent.is_dir():
        raise DataError(f"{path.parent}: no such directory")
    if not path.is_file():
        raise DataError(f"{path}: no such file (training writes it every --logging_steps steps)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror or err}") from None
    lines = text.split("\n")
    records = []
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if line_number == len(lines):  # no newline after it: still being written
                continue
            raise DataError(f"{path}: line {line_number}: invalid JSON: {err.msg} (column {err.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}: line {line_number}: expected a JSON object")
        if not _is_number(record.get("step")):
            raise DataError(f"{path}: line {line_number}: 'step' is missing or not a number")
        for key in PLOTTED_KEYS & record.keys():  # other keys may hold anything: not ours to judge
            value = record[key]
            if value is not None and not _is_number(value):
                raise DataError(f"{path}: line {line_number}: '{key}' is {json.dumps(value)[:40]}, "
                                "expected a number or null")
        records.append(record)
    if not records:
        raise DataError(f"{path}: no metrics logged yet (empty file)")
    return records


def series(records: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of `key`, sorted by step; null / missing / non-finite values left out,
    the last line winning when a step repeats."""
    by_step: dict[float, float] = {}
    for record in records:
        value = record.get(key)
        if value is not None and math.isfinite(value):
            by_step[record["step"]] = value
    steps = sorted(by_step)
    return steps, [by_step[step] for step in steps]


def epoch_boundaries(records: Sequence[dict]) -> list[float]:
    """Steps at which epochs 1, 2, ... end, from the lines' (step, epoch) pairs."""
    steps, epochs = series(records, "epoch")
    pairs = [(step, epoch) for step, epoch in zip(steps, epochs) if epoch > 0]
    if not pairs:
        return []
    last_step, last_epoch = pairs[-1]
    steps_per_epoch = last_step / last_epoch
    return [k * steps_per_epoch for k in range(1, math.floor(last_epoch + 1e-6) + 1)]


def draw(records: Sequence[dict], title: str):
    """The figure of `records` (metrics.jsonl lines): the loss, the ranking metrics beside it,
    then the other PANELS; returns a matplotlib Figure on an Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Figure + Agg canvas directly (no pyplot): no global backend state, no display needed.
    figure = Figure(figsize=(12, 13), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(4, 2, sharex=True).ravel()
    boundaries = epoch_boundaries(records)
    for ax in axes[:len(PANELS) + 1]:
        ax.grid(alpha=0.3)
        for step in boundaries:
            ax.axvline(step, color="grey", linestyle=":", linewidth=1)
    _plot_ranking(axes[1], records)
    axes[-1].set_visible(False)  # 7 panels on a 4 x 2 grid
    for ax, (key, panel_title) in zip([axes[0], *axes[2:]], PANELS):  # axes[1]: the ranking metrics
        ax.set_title(panel_title)
        steps, values = series(records, key)
        eval_steps, eval_values = series(records, f"eval_{key}")
        if steps:
            ax.plot(steps, values, marker="." if len(steps) < 50 else None, label="train")
        if eval_steps:
            ax.plot(eval_steps, eval_values, marker="o", linestyle="--", label="eval")
            ax.legend(loc="best", fontsize="small")
        if not steps and not eval_steps:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    for ax in axes[-3:-1]:
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_tick_params(labelbottom=True)
    figure.suptitle(f"{title}: metrics up to step {max(r['step'] for r in records):g}")
    return figure


def plot_metrics(output_dir: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    """Draw OUTPUT_DIR/metrics.jsonl to a PNG (default OUTPUT_DIR/metrics.png); returns its path."""
    try:
        import matplotlib  # noqa: F401  (draw imports its parts)
    except ImportError:
        raise FastalignError("plotting needs matplotlib: pip install matplotlib") from None

    run_dir = Path(output_dir)
    records = read_metrics(run_dir / METRICS_FILE)
    target = Path(output) if output is not None else run_dir / "metrics.png"

    figure = draw(records, run_dir.resolve().name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{os.getpid()}-{target.name}")
    try:
        figure.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, target)
    except OSError as err:
        raise DataError(f"{target}: cannot write: {err.strerror or err}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _plot_ranking(ax, records: Sequence[dict]) -> None:
    """The evaluation's ranking metrics (one line each) on one panel."""
    ax.set_title(RANKING_TITLE)
    drawn = False
    for key, label in RANKING_KEYS:
        steps, values = series(records, key)
        if steps:
            ax.plot(steps, values, marker="o", linestyle="--", label=label)
            drawn = True
    if drawn:
        ax.legend(loc="best", fontsize="small")
    else:
        ax.text(0.5, 0.5, "no evaluation with ranking metrics", ha="center", va="center",
                transform=ax.transAxes, color="grey")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastalign.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", type=Path, help="training --output_dir (holds metrics.jsonl)")
    parser.add_argument("--output", type=Path, default=None, help="PNG to write (default OUTPUT_DIR/metrics.png)")
    args = parser.parse_args(argv)
    print(f"wrote {plot_metrics(args.output_dir, args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
