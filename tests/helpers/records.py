"""Files the tests write as inputs: JSONL rows, metrics.jsonl lines, hh-rlhf conversations."""

from __future__ import annotations

import json

MULTI_TURN_CHOSEN = ("\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And times 3?"
                     "\n\nAssistant: 12, since 4 x 3 = 12.")
MULTI_TURN_REJECTED = ("\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And times 3?"
                       "\n\nAssistant: I won't do math.")


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def metrics_line(step, **overrides):
    record = {"step": step, "epoch": round(step / 4, 4), "loss": 2.0 / step, "nll_best": 1.8 / step,
              "penalty": 0.5 / step, "penalty_active_frac": 0.5, "lr": 1e-4, "grad_norm": 1.0,
              "tokens_per_s": 1000.0 + step, "mfu": None, "peak_mem_gb": 0.5}
    record.update(overrides)
    return json.dumps(record)


def write_metrics(run_dir, lines, *, final_newline=True):
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "metrics.jsonl"
    path.write_text("\n".join(lines) + ("\n" if final_newline else ""))
    return path
