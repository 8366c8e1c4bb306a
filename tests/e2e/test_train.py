"""End-to-end training runs on a tiny Llama (CPU, gloo): learning, rank/accumulation invariance,
resume, the original command line under torchrun, HF export, and failures."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers.ranks import run_ranks
from helpers.train_mains import print_seed_compat
from helpers.training import (
    assert_same_metrics,
    assert_same_weights,
    common,
    metrics,
    ok,
    run_train,
    train_in_process,
    train_ranks,
)
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def test_tiny_model_learns(tiny, tmp_path):
    model, data = tiny
    out = tmp_path / "out"
    ok(train_in_process(common(model, data, out, max_steps=12, per_device_train_batch_size=4,
                               learning_rate=3e-3, max_tokens_per_batch=600, evaluation_strategy="steps",
                               eval_steps=6, eval_data_path=data, per_device_eval_batch_size=8)))
    evals = [m for m in metrics(out) if "eval_loss" in m]
    assert [m["step"] for m in evals] == [6, 12]
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]
    losses = [m["loss"] for m in metrics(out) if "loss" in m]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2, losses
    first = metrics(out)[0]
    assert "eval_loss" not in first
    assert {"step", "epoch", "loss", "nll_best", "penalty", "penalty_active_frac", "lr", "grad_norm",
            "tokens_per_s", "mfu", "peak_mem_gb"} <= first.keys()
    assert first["mfu"] is None and first["tokens_per_s"] > 0 and first["peak_mem_gb"] > 0


def test_one_rank_x4_equals_two_ranks_x2_equals_four_ranks_x1(tiny, tmp_path):
    """The step loss is the mean over the global batch's groups, however they are split over
    accumulation steps and ranks (1 process: plain module; 2 and 4: FSDP2 full_shard)."""
    model, data = tiny
    # max_tokens_per_batch 0: every side runs the same 2-group micro-batches (step-level packing
    # would regroup them differently per world size: the same loss, but a summation order that
    # Adam's first update amplifies past 1e-6; test_both_layouts_... covers it at 5e-6)
    flags = dict(max_steps=3, per_device_train_batch_size=2, fsdp="full_shard auto_wrap", max_tokens_per_batch=0)
    one, two, four = tmp_path / "one", tmp_path / "two", tmp_path / "four"
    # Activation checkpointing on one side only: recomputation must not change the numbers.
    ok(train_in_process(common(model, data, one, gradient_accumulation_steps=4, gradient_checkpointing=True,
                        **flags)))
    ok(train_ranks(common(model, data, two, gradient_accumulation_steps=2, **flags), nproc=2))
    ok(train_ranks(common(model, data, four, gradient_accumulation_steps=1, **flags), nproc=4))
    for other in (two, four):
        assert_same_metrics(metrics(one), metrics(other))
        assert_same_weights(one, other)
    start = load_file(model / "model.safetensors")["model.norm.weight"]
    assert not torch.equal(start, load_file(one / "model.safetensors")["model.norm.weight"])


def test_both_layouts_and_step_packing_on_two_ranks_equal_one_rank_of_single_group_passes(tiny, tmp_path):
    """The original's passes (one group per micro-batch, query + response per response, 1 rank)
    vs 2 FSDP ranks with the shared prefix and step-level packing (all of a rank's groups in one
    pass), and vs 2 ranks unshared: the same loss, gradient norm and weights."""
    model, data = tiny
    flags = dict(max_steps=2, per_device_train_batch_size=1, fsdp="full_shard auto_wrap")
    original, shared, unshared = tmp_path / "original", tmp_path / "shared", tmp_path / "unshared"
    ok(train_in_process(common(model, data, original, gradient_accumulation_steps=4, share_prefix=False,
                        max_tokens_per_batch=0, **flags)))
    result = ok(train_ranks(common(model, data, shared, gradient_accumulation_steps=2, **flags), nproc=2))
    assert re.search(r"share_prefix True: \d+ computed of \d+ sequence tokens \(\d+\.\d% saved\)", result.stderr)
    ok(train_ranks(common(model, data, unshared, gradient_accumulation_steps=2, share_prefix=False, **flags), nproc=2))
    for other in (shared, unshared):
        assert_same_metrics(metrics(original), metrics(other))
        assert_same_weights(original, other, atol=5e-6)
    for a, b in zip(metrics(original), metrics(shared)):
        assert a["sequence_tokens"] == b["sequence_tokens"] == a["computed_tokens"]  # same real tokens
        assert b["computed_tokens"] < b["sequence_tokens"]                          # fewer computed
    for a, b in zip(metrics(original), metrics(unshared)):
        assert a["computed_tokens"] == b["computed_tokens"]


@pytest.mark.parametrize("share_prefix", [True, False])
def test_resume_after_step_3_equals_uninterrupted_run(tiny, tmp_path, share_prefix):
    model, data = tiny
    flags = dict(max_steps=6, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                 save_strategy="steps", save_steps=3, lr_scheduler_type="cosine", warmup_steps=2,
                 num_comp=2, share_prefix=share_prefix)
    full = tmp_path / "full"
    ok(train_in_process(common(model, data, full, **flags)))
    assert sorted(p.name for p in full.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]

    # A run that died after step 5: checkpoint-3 complete, checkpoint-6 half written, metrics
    # written up to step 5, no final model.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")
    shutil.copytree(full / "checkpoint-6", resumed / "checkpoint-6.tmp")
    (resumed / "checkpoint-6.tmp" / "trainer_state.json").unlink()
    partial = [line for line in (full / "metrics.jsonl").read_text().splitlines()][:5]
    (resumed / "metrics.jsonl").write_text("\n".join(partial) + '\n{"step": 6, "lo')  # died mid-line

    result = ok(train_in_process(common(model, data, resumed, resume_from_checkpoint="auto", **flags)))
    assert "resumed from" in result.stderr and "checkpoint-3" in result.stderr
    assert_same_metrics(metrics(full), metrics(resumed))
    assert_same_weights(full, resumed, atol=0)
    assert not (resumed / "checkpoint-6.tmp").exists()


def test_original_command_line_under_torchrun_loads_in_transformers(tiny, tmp_path):
    """docs/training.md's train_alignment.py flags, tiny sizes, 2 processes launched with the
    multi-node rendezvous flags (c10d, one node); output is an HF model."""
    model, data = tiny
    out = tmp_path / "out"
    args = [
        "--model_name_or_path", str(model), "--data_path", str(data), "--bf16", "True",
        "--output_dir", str(out), "--num_train_epochs", "2", "--per_device_train_batch_size", "1",
        "--per_device_eval_batch_size", "1", "--gradient_accumulation_steps", "8",
        "--evaluation_strategy", "no", "--save_strategy", "steps", "--save_steps", "2",
        "--save_total_limit", "1", "--learning_rate", "2e-5", "--weight_decay", "0.",
        "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine", "--logging_steps", "1",
        "--fsdp", "full_shard auto_wrap", "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer",
        "--tf32", "True", "--model_max_length", "96", "--rating_scale", "7", "--margin", "1",
        "--max_flow", "False", "--ratio", "0.2", "--num_comp", "3",
    ]
    result = ok(run_train(args, nproc=2, timeout=400, rendezvous=True))
    assert "world size 2" in result.stderr and "bf16" in result.stderr
    # 40 groups / (2 ranks x 8) = 3 steps per epoch, 2 epochs; checkpoints at 2, 4, 6 with a
    # limit of 1: only the newest is left.
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-6"]

    from transformers import AutoTokenizer, LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("### Instruction:\nHello\n\n### Response:", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = hf(ids).logits
    assert torch.isfinite(logits).all()
    trained, start = hf.state_dict(), load_file(model / "model.safetensors")
    assert any(not torch.equal(trained[k].float(), start[k].float()) for k in start)


def test_bad_flag_exits_2_with_message(tiny, tmp_path):
    model, data = tiny
    result = train_in_process(common(model, data, tmp_path / "out") + ["--num_compare", "3"])
    assert result.returncode == 2
    assert "--num_compare" in result.stderr and "Traceback" not in result.stderr


def test_bad_data_exits_2_naming_the_record(tiny, tmp_path):
    model, data = tiny
    bad = tmp_path / "bad.jsonl"
    records = data.read_text().splitlines()[:3]
    broken = json.loads(records[1])
    del broken["scores"]
    bad.write_text("\n".join([records[0], json.dumps(broken), records[2]]) + "\n")
    result = train_in_process(common(model, bad, tmp_path / "out", max_steps=1))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error:" in result.stderr and "scores" in result.stderr and "Traceback" not in result.stderr


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny, tmp_path):
    model, data = tiny
    out = tmp_path / "out"
    result = train_in_process(common(model, data, out, max_steps=6, per_device_train_batch_size=4,
                              save_strategy="steps", save_steps=1, max_grad_norm=0,
                              learning_rate=1e30, logging_steps=3, bf16=True))  # FSDP2 on 1 rank
    assert result.returncode == 2, result.stderr[-2000:]
    assert "NaN" in result.stderr and "Traceback" not in result.stderr
    kept = sorted(p.name for p in out.glob("checkpoint-*"))
    assert kept and all(not name.endswith(".tmp") for name in kept)
    for name in kept:
        assert_finite_checkpoint(out / name, tmp_path)
    assert not (out / "model.safetensors").exists()


def assert_finite_checkpoint(path: Path, scratch: Path) -> None:
    """Every model tensor of a DCP checkpoint-<step> directory is finite."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = scratch / f"{path.name}.pt"
    dcp_to_torch_save(path, flat)
    weights = torch.load(flat, weights_only=True)["model"]
    assert weights
    for name, tensor in weights.items():
        assert torch.isfinite(tensor).all(), (path.name, name)


@pytest.mark.parametrize("save", ["every step", "never"])
def test_update_that_overflows_the_weights_saves_and_exports_nothing(tiny, tmp_path, save):
    """A finite loss and gradient, then an update to inf/NaN (learning rate 1e39 overflows fp32):
    neither checkpoint-1 nor the final model may be written from those weights."""
    model, data = tiny
    out = tmp_path / "out"
    flags = dict(save_strategy="steps", save_steps=1) if save == "every step" else {}
    result = train_in_process(common(model, data, out, max_steps=1, per_device_train_batch_size=4,
                              max_grad_norm=0, learning_rate=1e39, lr_scheduler_type="linear", **flags))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "NaN/inf by step 1" in result.stderr and "No checkpoint was written" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(out.glob("checkpoint-*")) and not (out / "model.safetensors").exists()
    assert [m["step"] for m in metrics(out)] == [1]  # the step's own loss and gradient were finite
    assert all(map(math.isfinite, (metrics(out)[0]["loss"], metrics(out)[0]["grad_norm"])))


def test_fresh_start_refuses_another_runs_checkpoints_unless_overwriting(tiny, tmp_path):
    """checkpoint-50 of an earlier run: rotation would keep it over the new run's checkpoint-1
    and `auto` would resume it, so a fresh start stops; --overwrite_output_dir True clears it."""
    model, data = tiny
    out = tmp_path / "out"
    foreign = out / "checkpoint-50"
    foreign.mkdir(parents=True)
    (foreign / ".metadata").write_bytes(b"x")
    (foreign / "trainer_state.json").write_text('{"step": 50}')
    (out / "checkpoint-51.tmp").mkdir()
    (out / "metrics.jsonl").write_text('{"step": 50, "loss": 1.0}\n')
    flags = dict(max_steps=1, per_device_train_batch_size=4, save_strategy="steps", save_steps=1,
                 save_total_limit=1)
    result = train_in_process(common(model, data, out, **flags))
    assert result.returncode == 2, result.stderr[-2000:]
    assert str(out) in result.stderr and "checkpoint-50" in result.stderr
    assert "--resume_from_checkpoint auto" in result.stderr and "--overwrite_output_dir True" in result.stderr
    assert foreign.is_dir() and not (out / "model.safetensors").exists()

    ok(train_in_process(common(model, data, out, overwrite_output_dir=True, **flags)))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert [m["step"] for m in metrics(out)] == [1]


def test_resume_can_extend_the_run_with_a_larger_max_steps(tiny, tmp_path):
    """HF lets a resumed run go further; the LR schedule is then the new total's from the
    checkpoint's step on (linear: 1 - step/6, not the old run's 1 - step/4 = 0)."""
    model, data = tiny
    out = tmp_path / "out"
    flags = dict(per_device_train_batch_size=2, save_strategy="steps", save_steps=4,
                 lr_scheduler_type="linear")
    ok(train_in_process(common(model, data, out, max_steps=4, **flags)))
    result = ok(train_in_process(common(model, data, out, max_steps=6, resume_from_checkpoint="auto", **flags)))
    assert "resumed from" in result.stderr and "checkpoint-4" in result.stderr
    assert "planned for 4 steps as a run of 6 steps" in result.stderr
    lines = metrics(out)
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6]
    assert lines[4]["lr"] == pytest.approx(1e-3 * (1 - 4 / 6))
    assert lines[5]["lr"] == pytest.approx(1e-3 * (1 - 5 / 6))
    assert (out / "model.safetensors").exists()


def test_resume_takes_this_runs_learning_rate(tiny, tmp_path):
    """After a divergence users resume with a lower --learning_rate: the schedule must use it, not
    the learning rate stored in the checkpoint's optimizer state."""
    model, data = tiny
    out = tmp_path / "out"
    flags = dict(per_device_train_batch_size=2, save_strategy="steps", save_steps=4,
                 lr_scheduler_type="linear", max_steps=6)
    ok(train_in_process(common(model, data, out, **flags) + ["--max_steps", "4"]))
    ok(train_in_process(common(model, data, out, resume_from_checkpoint="auto", learning_rate=1e-5, **flags)))
    lines = metrics(out)
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6]
    assert lines[3]["lr"] == pytest.approx(1e-3 * (1 - 3 / 4))
    assert lines[4]["lr"] == pytest.approx(1e-5 * (1 - 4 / 6))


def test_output_dir_that_is_a_file_is_a_clean_error(tiny, tmp_path):
    model, data = tiny
    not_a_dir = tmp_path / "afile"
    not_a_dir.write_text("x")
    result = train_in_process(common(model, data, not_a_dir, max_steps=1))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: --output_dir" in result.stderr and "Traceback" not in result.stderr


def test_default_step_token_budget_is_the_originals_padded_micro_batch():
    """Not given on CUDA: bs x num_comp x model_max_length (one padded pass of the original command,
    read from the trainer's own parsed flags); on CPU 4096; a given budget and 0 (off) whatever the device."""
    from fastalign.config import parse_args, step_token_budget

    def budget(device: str, *flags: str) -> int | None:
        args = parse_args(["--model_name_or_path", "m", "--data_path", "d.jsonl", "--output_dir", "o", *flags])
        return step_token_budget(args.max_tokens_per_batch, torch.device(device),
                                 batch_size=args.per_device_train_batch_size, num_comp=args.num_comp,
                                 model_max_length=args.model_max_length)

    published = ("--per_device_train_batch_size", "1", "--num_comp", "3", "--model_max_length", "480",
                 "--gradient_accumulation_steps", "8")
    assert budget("cuda", *published) == 1 * 3 * 480 == 1440
    assert budget("cuda", "--per_device_train_batch_size", "4", "--num_comp", "5", "--model_max_length", "512") == 10240
    assert budget("cuda") == 8 * 3 * 512  # the parser's defaults
    assert budget("cpu", *published) == budget("cpu") == 4096
    for device in ("cuda", "cpu"):
        assert budget(device, *published, "--max_tokens_per_batch", "2880") == 2880
        assert budget(device, *published, "--max_tokens_per_batch", "0") is None


def test_accumulation_over_unequal_micro_batches_equals_one_micro_batch(tiny, tmp_path):
    """Micro-batches of 1, 1 and 2 groups accumulated == the same 4 groups in one micro-batch.
    The mean over the step's groups tells these apart from HF's mean of micro-batch means."""
    from fastalign.data import GroupBatcher, load_records, tokenize_records
    from fastalign.model_dir import load_tokenizer

    model, data = tiny
    budget = 450  # the epoch-0 order starts with groups of 200, 323, 203 + 233, 270 tokens
    tokenized = tokenize_records(load_records(str(data)).records, load_tokenizer(model), model_max_length=128)
    batcher = GroupBatcher(tokenized, num_comp=3, seed=42, batch_size=None, max_tokens_per_batch=budget,
                           gradient_accumulation_steps=3)
    first = next(batcher.iter_steps(0))
    assert [b.num_groups for b in first.micro_batches] == [1, 1, 2]
    one_batch = GroupBatcher(tokenized, num_comp=3, seed=42, batch_size=4)
    assert next(one_batch.iter_steps(0)).micro_batches[0].record_indices == [
        i for b in first.micro_batches for i in b.record_indices]

    # Through the command line: the same 4 groups as 4 single-group passes (step packing off) and
    # as one pass (step-level packing at the default budget).
    split, whole = tmp_path / "split", tmp_path / "whole"
    ok(train_in_process(common(model, data, split, max_steps=1, per_device_train_batch_size=1, max_tokens_per_batch=0,
                        gradient_accumulation_steps=4)))
    ok(train_in_process(common(model, data, whole, max_steps=1, per_device_train_batch_size=1,
                        gradient_accumulation_steps=4)))
    assert_same_metrics(metrics(split), metrics(whole))  # grad_norm: the step's gradient
    # Adam's first update is lr * g / (|g| + eps): elements with |g| near eps amplify the
    # summation-order difference of differently packed micro-batches (1e-6 of a 1e-3 update).
    assert_same_weights(split, whole, atol=5e-6)


def test_data_flags_take_effect_through_the_command(tiny, tmp_path):
    """--skip_invalid trains past a bad record; --stop_response cuts at the turn marker and
    --no_append_eos leaves EOS off: the logged data statistics are those of the data layer with
    these options (and differ from the defaults')."""
    from fastalign.data import load_records, tokenize_records
    from fastalign.model_dir import load_tokenizer

    model, data = tiny
    records = [json.loads(line) for line in data.read_text().splitlines()[:8]]
    records[2]["responses"][0] += "\n\nHuman: and one more thing?"
    del records[5]["scores"]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps(r) + "\n" for r in records))

    loaded = load_records(str(mixed), skip_invalid=True)
    tokenizer = load_tokenizer(model)
    flagged = tokenize_records(loaded.records, tokenizer, model_max_length=128, append_eos=False,
                               stop_response=True).stats
    default = tokenize_records(loaded.records, tokenizer, model_max_length=128).stats
    assert flagged["stopped_responses"] == 1 and flagged["tokens"] < default["tokens"]

    out = tmp_path / "out"
    result = ok(train_in_process(common(model, mixed, out, max_steps=1, per_device_train_batch_size=2,
                                 skip_invalid=True, stop_response=True, no_append_eos=True)))
    summary = next(line for line in result.stderr.splitlines() if "train data" in line)
    assert "7 valid records, skipped 1 " in summary
    assert ", ".join(f"{k}={v}" for k, v in flagged.items()) in summary
    assert (out / "model.safetensors").exists()


def test_margin_mode_seed_packs_candidates_as_the_original_collator(tiny, tmp_path):
    """--margin_mode seed makes the trainer's batcher reproduce the original candidate order and
    int() scores (data.GroupBatcher seed_compat); paper mode keeps file order."""
    model, data = tiny
    for mode, expected in (("seed", True), ("paper", False)):
        args = common(model, data, tmp_path / mode, margin_mode=mode, max_steps=1)
        result = run_ranks(print_seed_compat, args)  # the trainer set up in a process of its own
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"seed_compat {expected}" in result.stdout
