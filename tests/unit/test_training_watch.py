"""What a user watches while training (issue 23): a log line per logging step, the ranking metrics
of fastalign.evaluate in training's evaluation, the best checkpoint kept and exported, the profiler's
trace and step-time breakdown, and the plot of the ranking metrics.

The in-process tests check each piece's rules; one small run through `python -m fastalign.train`
(stderr captured: not a terminal) checks them together as a user meets them."""

from __future__ import annotations

import json

import pytest
from helpers.checkpoints import make_checkpoint

from fastalign import best_model
from fastalign import checkpoint as ckpt
from fastalign.config import parse_args
from fastalign.console import format_metrics_line
from fastalign.errors import FastalignError
from fastalign.evaluate import ranking_record, score_record
from fastalign.profiling import CATEGORIES, StepProfiler, breakdown, classify, events_breakdown, region

REQUIRED = ["--model_name_or_path", "m", "--data_path", "d", "--output_dir", "o"]
EVAL = ["--evaluation_strategy", "steps", "--eval_data_path", "e"]


# ----------------------------------------------------------------------------- the log line


def test_log_line_is_one_plain_key_value_line_with_the_steps_metrics():
    record = {"step": 12, "epoch": 0.4, "loss": 2.123456, "nll_best": 1.9, "penalty": 0.45,
              "penalty_active_frac": 0.5, "lr": 3e-4, "grad_norm": 0.8123, "tokens_per_s": 9313.4,
              "sequence_tokens": 100, "computed_tokens": 80, "mfu": None, "peak_mem_gb": 1.0}
    line = format_metrics_line(record, 300)
    assert line == ("step=12/300 epoch=0.40 loss=2.1235 nll_best=1.9000 penalty=0.4500 lr=3.000e-04 "
                    "grad_norm=0.8123 tokens_per_s=9313")  # no mfu where it is unknown (CPU)
    assert "mfu=41.0%" in format_metrics_line(record | {"mfu": 0.41}, 300)
    fields = dict(part.split("=") for part in line.split())
    assert fields["step"] == "12/300" and float(fields["loss"]) == pytest.approx(2.1235)

    evaluation = {"step": 6, "epoch": 0.2, "eval_loss": 1.5, "eval_pairwise_accuracy": 0.75,
                  "eval_kendall_tau": None, "eval_pairwise_accuracy/self harm": 1.0}
    assert format_metrics_line(evaluation, 300) == (
        "step=6/300 epoch=0.20 eval_loss=1.5000 eval_pairwise_accuracy=0.7500 "
        "eval_pairwise_accuracy/self_harm=1.0000")  # a key never holds a space: split() still works


# ----------------------------------------------------------------------------- ranking metrics


def test_ranking_record_has_the_evaluate_metrics_overall_and_per_category():
    results = [score_record(0, "a", [0, 1, 2], [7, 3, 5], [-1.0, -3.0, -2.0], [4, 4, 4]),  # all right
               score_record(1, "b", [0, 1], [2, 6], [-1.0, -2.0], [3, 3]),                  # wrong
               score_record(2, None, [0, 1], [4, 4], [-1.0, -2.0], [3, 3])]                 # tied: no pair
    record = ranking_record(results)
    assert record["eval_pairwise_accuracy"] == pytest.approx(3 / 4)
    assert record["eval_kendall_tau"] == pytest.approx((1.0 - 1.0) / 2)
    assert record["eval_top1_accuracy"] == pytest.approx(1 / 2)
    assert record["eval_pairwise_accuracy/a"] == 1.0 and record["eval_pairwise_accuracy/b"] == 0.0
    assert record["eval_top1_accuracy/b"] == 0.0
    assert not any(key.endswith("/None") for key in record)


def test_ranking_metrics_reach_tensorboard_as_eval_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fastalign.reporting import TensorBoardReporter

    reporter = TensorBoardReporter(tmp_path, "run", {})
    reporter.write({"step": 4, "eval_loss": 2.5, "eval_pairwise_accuracy": 0.75,
                    "eval_kendall_tau": None, "eval_top1_accuracy/advice": 0.5})
    reporter.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("eval/pairwise_accuracy")] == [(4, 0.75)]
    assert [e.value for e in events.Scalars("eval/top1_accuracy/advice")] == [0.5]
    assert "eval/kendall_tau" not in events.Tags()["scalars"]  # undefined (null) is not a point


# ----------------------------------------------------------------------------- the best checkpoint


def test_best_model_flags_have_hfs_defaults_and_refuse_what_cannot_work(capsys):
    args = parse_args(REQUIRED)
    assert (args.metric_for_best_model, args.greater_is_better) == ("eval_pairwise_accuracy", True)
    args = parse_args(REQUIRED + ["--metric_for_best_model", "loss"])
    assert (args.metric_for_best_model, args.greater_is_better) == ("eval_loss", False)
    args = parse_args(REQUIRED + EVAL + ["--load_best_model_at_end", "--metric_for_best_model",
                                         "kendall_tau", "--greater_is_better", "False"])
    assert (args.metric_for_best_model, args.greater_is_better) == ("eval_kendall_tau", False)
    for argv, needle in [
        (["--metric_for_best_model", "bleu"], "--metric_for_best_model"),
        (["--load_best_model_at_end", "True"], "--evaluation_strategy"),
        (EVAL + ["--load_best_model_at_end", "True", "--save_strategy", "epoch"], "--save_strategy"),
    ]:
        with pytest.raises(SystemExit) as exc:
            parse_args(REQUIRED + argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err
    with pytest.raises(best_model.ConfigError, match="multiple of --eval_steps"):
        best_model.check_intervals(save_steps=3, eval_steps=2, strategy="steps")


def test_best_checkpoint_follows_the_metric_and_its_direction():
    best = best_model.BestCheckpoint("eval_pairwise_accuracy", greater_is_better=True)
    assert best.offer(2, {"eval_pairwise_accuracy": 0.6})
    assert not best.offer(4, {"eval_pairwise_accuracy": None})  # undefined: not a candidate
    assert not best.offer(6, {"eval_pairwise_accuracy": 0.6})   # a tie keeps the earlier one
    assert best.offer(8, {"eval_pairwise_accuracy": 0.7}) and best.step == 8
    lower = best_model.BestCheckpoint("eval_loss", greater_is_better=False)
    lower.offer(2, {"eval_loss": 3.0})
    lower.offer(4, {"eval_loss": 3.5})
    assert lower.step == 2

    resumed = best_model.BestCheckpoint("eval_pairwise_accuracy", greater_is_better=True)
    resumed.restore(best.state())
    assert (resumed.step, resumed.value) == (8, 0.7)
    other_rule = best_model.BestCheckpoint("eval_loss", greater_is_better=False)
    other_rule.restore(best.state())  # chosen by another metric: not carried over
    assert other_rule.step is None


def test_rotation_never_deletes_the_best_checkpoint(tmp_path):
    for step in (2, 4, 6, 8):
        make_checkpoint(tmp_path, step)
    deleted = ckpt.rotate_checkpoints(tmp_path, 1, protect=tmp_path / "checkpoint-8",
                                      best=tmp_path / "checkpoint-4")
    assert sorted(p.name for p in deleted) == ["checkpoint-2", "checkpoint-6"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-8"]
    make_checkpoint(tmp_path, 10)
    ckpt.rotate_checkpoints(tmp_path, 2, protect=tmp_path / "checkpoint-10", best=tmp_path / "checkpoint-10")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-8"]  # best = newest


def test_a_best_checkpoint_gone_by_the_end_is_a_clean_error_and_exports_nothing(tmp_path, process_group):
    import torch

    best = best_model.BestCheckpoint("eval_loss", greater_is_better=False, step=4, value=1.5)
    with pytest.raises(FastalignError, match=r"best checkpoint .*checkpoint-4 .*missing.*Nothing was exported"):
        best_model.load_for_export(best, tmp_path, torch.nn.Linear(2, 2), prefix="", final_step=6)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- the profile breakdown


def test_breakdown_gives_each_moment_of_the_step_to_its_most_specific_range():
    # microseconds: a 100 us step; forward holds the loss head; a collective straddles
    # forward's end; evaluation (paused) is not step time; a host wait inside backward
    ranges = [("data", 0, 10), ("forward", 10, 50), ("loss_head", 30, 45), ("communication", 40, 60),
              ("backward", 60, 85), ("host_wait", 80, 85), ("paused", 85, 95)]
    result = breakdown([(0, 100)], ranges)
    seconds = {k: round(v * 1e6, 6) for k, v in result["seconds"].items()}
    assert seconds == {"data": 10, "forward": 20, "loss_head": 10, "communication": 20, "backward": 20,
                       "optimizer": 0, "host_wait": 5, "other": 5}
    assert result["step_time_s"] == pytest.approx(90e-6)
    assert sum(result["share"].values()) == pytest.approx(1.0)
    assert set(result["share"]) == set(CATEGORIES)


def profiled_work(profiler: StepProfiler, steps: int) -> None:
    """`steps` "optimizer steps" of a toy model, marked as the trainer marks its phases."""
    import torch

    model = torch.nn.Linear(64, 64)
    with profiler:
        for batch in profiler.data(torch.randn(8, 64) for _ in range(steps)):
            with region("forward"):
                loss = model(batch).square().mean()
            with region("backward"):
                loss.backward()
            profiler.step()


def test_profile_writes_a_trace_and_a_summary_in_process(tmp_path, process_group):
    profiled_work(StepProfiler(2, tmp_path, rank=0), steps=4)
    trace = json.loads((tmp_path / "profile" / "rank0.pt.trace.json").read_text())
    assert sum(e.get("name", "").startswith("ProfilerStep#") for e in trace["traceEvents"]) == 2
    summary = json.loads((tmp_path / "profile" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["world_size"] == 1 and summary["step_time_s"] > 0
    assert summary["seconds"]["forward"] > 0 and summary["seconds"]["backward"] > 0


def test_raw_event_breakdown_equals_the_one_from_torchs_function_events():
    """The breakdown reads Kineto's raw events (fast, but torch-internal); torch's public
    `profile.events()` must give the same steps and seconds, so a torch upgrade that changes the
    raw events fails here."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function, schedule

    def both(prof) -> None:  # when the trace is ready, as StepProfiler reads it
        steps, ranges = [], []
        for event in prof.events():
            start, end = event.time_range.start, event.time_range.end
            if event.name.startswith("ProfilerStep"):
                steps.append((start, end))
            elif (label := classify(event.name, event.device_type != torch.autograd.DeviceType.CPU)) is not None:
                ranges.append((label, start, end))
        results.append((events_breakdown(prof.profiler.kineto_results, complete_steps=3),
                        breakdown(sorted(steps)[:3], ranges)))

    model, results = torch.nn.Linear(64, 64), []
    with profile(activities=[ProfilerActivity.CPU], on_trace_ready=both,
                 schedule=schedule(wait=0, warmup=1, active=3, repeat=1)) as prof:
        for _ in range(5):
            with record_function("fastalign/forward"):
                loss = model(torch.randn(8, 64)).square().mean()
            with record_function("fastalign/backward"):
                loss.backward()
            prof.step()
    ((raw, public),) = results
    assert raw["steps"] == public["steps"] == 3
    assert raw["step_time_s"] == pytest.approx(public["step_time_s"], abs=1e-6)
    for category in CATEGORIES:
        assert raw["seconds"][category] == pytest.approx(public["seconds"][category], abs=1e-6), category
    assert raw["seconds"]["forward"] > 0 and raw["seconds"]["backward"] > 0


def test_profile_that_cannot_be_written_is_a_clean_error(tmp_path, process_group):
    blocker = tmp_path / "out"
    blocker.write_text("a file where the output directory should be")
    with pytest.raises(FastalignError, match=r"--profile_steps: writing .*out/profile/rank0\.pt\.trace\.json failed"):
        profiled_work(StepProfiler(1, blocker, rank=0), steps=3)


def test_a_run_too_short_to_profile_says_so(tmp_path, process_group, caplog):
    profiled_work(StepProfiler(2, tmp_path, rank=0), steps=1)  # only the warm-up step
    assert not (tmp_path / "profile").exists()
    assert "before a step could be profiled" in caplog.text


# ----------------------------------------------------------------------------- the plot


def test_plot_draws_the_ranking_metrics_beside_the_loss():
    pytest.importorskip("matplotlib")
    from fastalign.plot import RANKING_TITLE, draw

    records = [{"step": s, "epoch": s / 10, "loss": 3.0 - s / 10} for s in range(1, 7)]
    records += [{"step": s, "eval_loss": 2.0, "eval_pairwise_accuracy": 0.5 + s / 100,
                 "eval_kendall_tau": s / 10, "eval_top1_accuracy": 0.4} for s in (2, 4, 6)]
    axes = draw(records, "run").axes
    assert axes[0].get_title() == "loss" and axes[1].get_title() == RANKING_TITLE
    lines = {line.get_label(): list(line.get_ydata()) for line in axes[1].get_lines()}
    assert lines["pairwise accuracy"] == pytest.approx([0.52, 0.54, 0.56])
    assert lines["Kendall tau-b"] == pytest.approx([0.2, 0.4, 0.6])
    assert lines["top-1 accuracy"] == pytest.approx([0.4] * 3)
