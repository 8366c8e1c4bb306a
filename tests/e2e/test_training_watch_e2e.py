"""A whole watched run through the command line: step logs, evaluation rankings, the best model, the profile.

The trainer's and the evaluator's `main` run in this process (helpers/training.py, helpers/commands.py):
what is checked is what they log and write, not the process; both commands run as `python -m` in
other tests."""

from __future__ import annotations

import json
import re

import pytest
from helpers.commands import command_in_process
from helpers.training import common, metrics, ok, train_in_process

from fastalign import checkpoint as ckpt

pytestmark = pytest.mark.slow


RANKING = ("eval_pairwise_accuracy", "eval_kendall_tau", "eval_top1_accuracy")


@pytest.mark.slow
def test_a_run_logs_each_step_evaluates_rankings_keeps_the_best_and_profiles(tiny, tmp_path):
    """6 steps, evaluation and a checkpoint every 2, at most 1 checkpoint kept, the best by the
    *highest* eval_loss (the first evaluation: the tiny model learns), 2 steps profiled."""
    model, data = tiny
    out = tmp_path / "out"
    result = ok(train_in_process(common(
        model, data, out, max_steps=6, per_device_train_batch_size=8, learning_rate=3e-3,
        max_tokens_per_batch=1200, evaluation_strategy="steps", eval_steps=2, eval_data_path=data,
        save_strategy="steps", save_steps=2, save_total_limit=1, load_best_model_at_end=True,
        metric_for_best_model="eval_loss", greater_is_better=True, profile_steps=2)))
    log = result.stderr
    lines = metrics(out)
    train_lines = [m for m in lines if "loss" in m]
    evals = [m for m in lines if "eval_loss" in m]

    # 1. one plain line per logging step in a log that is not a terminal: no bar, no \r
    assert "\r" not in log and "train:" not in log
    logged = [dict(part.split("=", 1) for part in line.split("] ", 1)[1].split())
              for line in log.splitlines() if re.search(r"\] step=\d+/6 epoch=\S+ loss=", line)]
    assert [f["step"] for f in logged] == [f"{s}/6" for s in range(1, 7)]
    for fields, record in zip(logged, train_lines):
        assert float(fields["loss"]) == pytest.approx(record["loss"], abs=1e-4)
        assert float(fields["lr"]) == pytest.approx(record["lr"], rel=1e-3)
        assert {"nll_best", "penalty", "grad_norm", "tokens_per_s"} <= fields.keys()
        assert "mfu" not in fields  # unknown on CPU

    # 2. ranking metrics in every evaluation, overall and per category, in the log line too
    assert [m["step"] for m in evals] == [2, 4, 6]
    categories = {json.loads(line).get("category") for line in data.read_text().splitlines()} - {None}
    for record in evals:
        assert all(0.0 <= record[key] <= 1.0 or key == "eval_kendall_tau" for key in RANKING)
        assert {f"{key}/{c}" for key in RANKING for c in categories} <= record.keys()
    assert re.search(r"step=2/6 epoch=\S+ eval_loss=\S+ .*eval_pairwise_accuracy=\S+ "
                     r"eval_kendall_tau=\S+ eval_top1_accuracy=\S+", log)

    # 3. the best checkpoint (step 2) survives --save_total_limit 1 and is what was exported
    assert evals[0]["eval_loss"] > max(m["eval_loss"] for m in evals[1:])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-6"]
    assert ckpt.read_trainer_state(out / "checkpoint-6")["best_checkpoint"]["step"] == 2
    assert "--load_best_model_at_end: exporting" in log and "checkpoint-2" in log
    report = out / "evaluate.json"
    ok(command_in_process("fastalign.evaluate", ["--model_name_or_path", out, "--data_path", data, "--num_comp", "3",
                                                 "--model_max_length", "128", "--output_json", report]))
    evaluated = json.loads(report.read_text())
    for key in RANKING:  # equal to fastalign.evaluate on the exported weights: the step-2 weights
        assert evals[0][key] == pytest.approx(evaluated["metrics"][key.removeprefix("eval_")], abs=1e-12)
        for c in categories:
            assert evals[0][f"{key}/{c}"] == pytest.approx(
                evaluated["by_category"][c][key.removeprefix("eval_")], abs=1e-12)
    assert any(evals[0][key] != evals[-1][key] for key in RANKING)  # not the last step's weights

    # 4. the profile: a trace that loads as JSON, a breakdown that sums to the step time
    trace = json.loads((out / "profile" / "rank0.pt.trace.json").read_text())
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    steps = [e for e in events if e["name"].startswith("ProfilerStep#")]
    assert len(steps) == 2
    paused = sum(e["dur"] for e in events if e["name"] == "fastalign/paused")
    trace_step_time = (sum(e["dur"] for e in steps) - paused) / 2 / 1e6
    summary = json.loads((out / "profile" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["step_time_s"] == pytest.approx(trace_step_time, rel=0.10)
    assert sum(summary["seconds"].values()) == pytest.approx(summary["step_time_s"], rel=1e-6)
    attributed = sum(v for k, v in summary["seconds"].items() if k != "other")
    assert attributed == pytest.approx(summary["step_time_s"], rel=0.10), summary["share"]
    assert all(summary["seconds"][phase] > 0 for phase in ("data", "forward", "loss_head", "backward",
                                                           "optimizer"))
    assert {e["name"] for e in events} >= {f"fastalign/{p}" for p in ("data", "forward", "loss_head",
                                                                      "backward", "optimizer")}
    assert "profile of 2 steps" in log and re.search(r"backward +[\d.]+ +[\d.]+%", log)
