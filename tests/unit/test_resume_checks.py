"""A resume checks what it continues and what it reads: the data, tokenizer and batch flags the
checkpoint was written with (fastalign.resume_inputs), and every file of the checkpoint (regular
files only, small state valid field by field, tensors of this model), each fault one `error:` line
with the checkpoint left as it was. In-process for the variants (one-rank gloo group), through
`python -m fastalign.train` for what a user runs."""

from __future__ import annotations

import argparse
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from helpers.checkpoints import edit_json, link_shard, reseal, saved_checkpoints, setting, sharded_toy

from fastalign import checkpoint as ckpt
from fastalign import resume_inputs
from fastalign.errors import ConfigError

# ---------------------------------------------------------------------------- small state files


def without(key):
    def change(state):
        del state[key]
        return state
    return change


def rng_setting(kind, index, value):
    def change(state):
        state[kind][index] = value
        return state
    return change


STATE, SCHEDULER, RNG = ckpt.STATE_FILE, ckpt.SCHEDULER_FILE, "rng/rank0.json"
# (file, change of checkpoint-2's file, what the message must say)
BAD_FIELDS = {
    "negative-step": (STATE, setting("step", -4), "field 'step' must be in [0, "),
    "string-step": (STATE, setting("step", "2"), "field 'step' must be an integer, got '2'"),
    "float-step": (STATE, setting("step", 2.0), "field 'step' must be an integer"),
    "bool-step": (STATE, setting("step", True), "field 'step' must be an integer"),
    "huge-step": (STATE, setting("step", 10**30), "field 'step' must be in [0, 9223372036854775807]"),
    "step-of-another-dir": (STATE, setting("step", 1), "field 'step' is 1, but the directory is checkpoint-2"),
    "epoch-past-step": (STATE, setting("epoch", 3), "field 'epoch' must be in [0, 2]"),
    "negative-step-in-epoch": (STATE, setting("step_in_epoch", -1), "field 'step_in_epoch' must be in"),
    "no-epoch": (STATE, without("epoch"), "field 'epoch' is missing"),
    "layout-not-object": (STATE, setting("batch_layout", [8]), "field 'batch_layout' must be a JSON object"),
    "zero-total": (STATE, setting("total_steps", 0), "field 'total_steps' must be in [1, "),
    "best-step-string": (STATE, setting("best_checkpoint", {"metric": "eval_loss", "greater_is_better": False,
                                                            "step": "2", "value": 1.0}),
                         "field 'best_checkpoint.step' must be an integer"),
    "best-value-nan": (STATE, setting("best_checkpoint", {"metric": "eval_loss", "greater_is_better": False,
                                                          "step": 2, "value": math.nan}),
                       "field 'best_checkpoint.value' must be a finite number"),
    "state-not-object": (STATE, lambda state: [state], "the trainer state must be a JSON object"),
    "scheduler-other-step": (SCHEDULER, setting("last_epoch", 5),
                             "field 'last_epoch' is 5, but the checkpoint is at step 2"),
    "scheduler-foreign-key": (SCHEDULER, setting("optimizer", "x"),
                              "field 'optimizer' is not a field of the LR scheduler"),
    "scheduler-nan-lr": (SCHEDULER, setting("base_lrs", [math.nan]), "field 'base_lrs[0]' must be a finite number"),
    "scheduler-no-step": (SCHEDULER, without("last_epoch"), "field 'last_epoch' is missing"),
    "rng-short-torch": (RNG, lambda s: {**s, "torch": s["torch"][:-1]}, "field 'torch' must be a list of 5056 items"),
    "rng-not-a-byte": (RNG, rng_setting("torch", 0, 256), "field 'torch' must hold integers in [0, 255]"),
    "rng-python-position": (RNG, lambda s: {**s, "python": [3, s["python"][1][:-1] + [700], None]},
                            "field 'python[1][-1]' must be in [0, 624]"),
    "rng-numpy-kind": (RNG, rng_setting("numpy", 0, "PCG64"), "field 'numpy[0]' must be 'MT19937'"),
    "rng-numpy-position": (RNG, rng_setting("numpy", 2, 625), "field 'numpy[2]' must be in [0, 624]"),
    "rng-no-numpy": (RNG, without("numpy"), "field 'numpy' is missing"),
}


@pytest.mark.parametrize("name", BAD_FIELDS)
def test_bad_field_in_a_state_file_is_refused_and_auto_takes_the_previous(tmp_path, process_group, name, caplog):
    file, change, expected = BAD_FIELDS[name]
    out = tmp_path / "out"
    first, second = saved_checkpoints(out)
    edit_json(second, file, change)
    with pytest.raises(ConfigError) as err:
        ckpt.resolve_resume(str(second), out)
    assert str(second / file) in str(err.value) and expected in str(err.value)
    with caplog.at_level(logging.WARNING, logger="fastalign.checkpoint"):
        assert ckpt.resolve_resume("auto", out) == first
    assert f"skipping {second}" in caplog.text and expected in caplog.text
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[")):  # also without resolve_resume first
        ckpt.load_checkpoint(second, *sharded_toy(1))


def test_valid_state_files_load_as_they_were_saved(tmp_path, process_group):
    """The checks accept what the trainer writes (here: after two real steps)."""
    _, path = saved_checkpoints(tmp_path / "out")
    assert ckpt.verify_checkpoint(path) is None
    assert ckpt.load_checkpoint(path, *sharded_toy(1)) == {"step": 2, "epoch": 0, "step_in_epoch": 2}


# ---------------------------------------------------------------------------- files of the directory


def link_same_bytes(path: Path, elsewhere: Path) -> str:
    """The state file moved out and linked back: same bytes, same checksum, still outside."""
    shutil.move(path / STATE, elsewhere)
    (path / STATE).symlink_to(elsewhere)
    return STATE


def link_rng_dir(path: Path, elsewhere: Path) -> str:
    shutil.move(path / "rng", elsewhere)
    (path / "rng").symlink_to(elsewhere, target_is_directory=True)
    return "rng"


@pytest.mark.parametrize("link", [link_shard, link_same_bytes, link_rng_dir], ids=["shard", "state", "rng-dir"])
def test_symlink_in_a_checkpoint_is_refused_naming_it(tmp_path, process_group, link, caplog):
    out = tmp_path / "out"
    first, second = saved_checkpoints(out)
    name = link(second, tmp_path / "elsewhere")
    reseal(second)
    with pytest.raises(ConfigError) as err:
        ckpt.resolve_resume(str(second), out)
    assert f"{second / name} is a symbolic link" in str(err.value)
    with caplog.at_level(logging.WARNING, logger="fastalign.checkpoint"):
        assert ckpt.resolve_resume("auto", out) == first
    assert f"{second / name} is a symbolic link" in caplog.text


# ---------------------------------------------------------------------------- another model


@pytest.mark.parametrize("other, expected", [
    (lambda: sharded_toy(1, hidden=9), "model.0.weight: checkpoint [8, 4], this model [9, 4]"),
    (lambda: sharded_toy(1, extra_layer=True), "model.3.weight: not in the checkpoint, this model has [3, 3]"),
], ids=["hidden-size", "family"])
def test_checkpoint_of_another_model_names_the_tensor_and_both_shapes(tmp_path, process_group, other, expected):
    (path,) = saved_checkpoints(tmp_path / "out", steps=(1,))
    model, optimizer, scheduler = other()
    before = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError) as err:
        ckpt.load_checkpoint(path, model, optimizer, scheduler)
    message = str(err.value)
    assert message.startswith(f"--resume_from_checkpoint {path}: {path} holds the tensors of another model")
    assert expected in message and "--model_name_or_path" in message
    for key, value in model.state_dict().items():  # nothing was restored
        assert torch.equal(value.full_tensor(), before[key]), key


def test_loading_only_the_model_part_of_a_checkpoint_is_not_a_mismatch(tmp_path, process_group):
    """--load_best_model_at_end reads a checkpoint's {"model": ...} alone: its optimizer tensors
    are not 'tensors of another model'; a model of another shape still is."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from fastalign import safe_dcp

    (path,) = saved_checkpoints(tmp_path / "out", steps=(1,))
    model, _, _ = sharded_toy(1)
    safe_dcp.load({"model": get_model_state_dict(model)}, path)
    other, _, _ = sharded_toy(1, hidden=9)
    with pytest.raises(safe_dcp.StateMismatchError, match=r"model.0.weight: checkpoint \[8, 4\], this model \[9, 4\]"):
        safe_dcp.load({"model": get_model_state_dict(other)}, path)


# ---------------------------------------------------------------------------- inputs of the run


@pytest.fixture
def inputs_of(tmp_path):
    """describe() of a run over files in tmp_path: data.jsonl, eval.jsonl, model/tokenizer.json."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "tokenizer.json").write_text('{"vocab": 1}')
    (tmp_path / "model" / "config.json").write_text('{"hidden_size": 8}')
    (tmp_path / "data.jsonl").write_text('{"query": "q", "responses": ["a"], "scores": [1]}\n')
    (tmp_path / "eval.jsonl").write_text('{"query": "e", "responses": ["a"], "scores": [1]}\n')

    def describe(**flags):
        args = dict(data_path=str(tmp_path / "data.jsonl"), eval_data_path=str(tmp_path / "eval.jsonl"),
                    evaluation_strategy="steps", model_name_or_path=str(tmp_path / "model"),
                    model_max_length=128, share_prefix=True)
        budget = flags.pop("step_token_budget", 4096)
        return resume_inputs.describe(argparse.Namespace(**{**args, **flags}), budget)

    return describe


LAYOUT = {"world_size": 1, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "num_comp": 3,
          "seed": 42, "steps_in_epoch_0": 10}


def checkpoint_state(inputs: dict | None, **layout) -> dict:
    state = {"step": 4, "epoch": 0, "step_in_epoch": 4, "batch_layout": {**LAYOUT, **layout}}
    return state if inputs is None else {**state, "inputs": inputs}


def check(state, inputs, allow_data_change=False, **layout):
    return resume_inputs.check(state, Path("out/checkpoint-4"), layout={**LAYOUT, **layout}, inputs=inputs,
                               allow_data_change=allow_data_change)


def test_unchanged_inputs_resume_silently_and_moved_files_count_as_unchanged(inputs_of, tmp_path):
    saved = inputs_of()
    assert check(checkpoint_state(saved), inputs_of()) == []
    shutil.copy(tmp_path / "data.jsonl", tmp_path / "moved.jsonl")
    assert check(checkpoint_state(saved), inputs_of(data_path=str(tmp_path / "moved.jsonl"))) == []


def test_edited_data_is_refused_naming_the_file_and_both_digests_unless_allowed(inputs_of, tmp_path):
    saved = inputs_of()
    data = tmp_path / "data.jsonl"
    data.write_text(data.read_text().replace('"scores": [1]', '"scores": [2]'))
    now = inputs_of()
    with pytest.raises(ConfigError) as err:
        check(checkpoint_state(saved), now, steps_in_epoch_0=9)
    message = str(err.value)
    old, new = saved["data"]["sha256"][:12], now["data"]["sha256"][:12]
    assert f"--data_path: other contents (checkpoint: {data}, sha256 {old}...; now: {data}, sha256 {new}...)" in message
    assert "optimizer steps in epoch 0 (checkpoint 10, now 9)" in message
    assert "step 4 (epoch 0, step 4 of the epoch)" in message and "--allow_data_change True" in message
    (warning,) = check(checkpoint_state(saved), now, allow_data_change=True, steps_in_epoch_0=9)
    assert warning.startswith("--allow_data_change: resuming") and str(data) in warning


@pytest.mark.parametrize("change, expected", [
    (dict(model_max_length=64), "--model_max_length (checkpoint 128, now 64)"),
    (dict(tokenizer='{"vocab": 2}'), "the tokenizer files of --model_name_or_path: other contents"),
    (dict(eval_data='{"query": "f", "responses": ["a"], "scores": [1]}\n'), "--eval_data_path: other contents"),
], ids=["model_max_length", "tokenizer", "eval-data"])
def test_each_change_to_the_data_as_the_model_sees_it_is_refused(inputs_of, tmp_path, change, expected):
    saved = inputs_of()
    if "tokenizer" in change:
        (tmp_path / "model" / "tokenizer.json").write_text(change.pop("tokenizer"))
    if "eval_data" in change:
        (tmp_path / "eval.jsonl").write_text(change.pop("eval_data"))
    with pytest.raises(ConfigError, match=r"the data differs from the checkpoint's") as err:
        check(checkpoint_state(saved), inputs_of(**change))
    assert expected in str(err.value)
    assert check(checkpoint_state(saved), inputs_of(**change), allow_data_change=True)


def test_what_does_not_change_the_batches_is_not_refused(inputs_of, tmp_path):
    saved = inputs_of()
    (tmp_path / "model" / "config.json").write_text('{"hidden_size": 16}')  # the shapes check covers the model
    assert check(checkpoint_state(saved), inputs_of(evaluation_strategy="no")) == []  # evaluation turned off
    (warning,) = check(checkpoint_state(saved), inputs_of(step_token_budget=1024, share_prefix=False))
    assert "other packing" in warning and "(checkpoint 4096, now 1024)" in warning
    assert "--share_prefix (checkpoint True, now False)" in warning


def test_batch_layout_change_is_refused_even_with_allow_data_change(inputs_of):
    saved = inputs_of()
    with pytest.raises(ConfigError) as err:
        check(checkpoint_state(saved), inputs_of(), allow_data_change=True, world_size=2, seed=1)
    message = str(err.value)
    assert "different batch layout" in message
    assert "number of processes (checkpoint 1, now 2)" in message and "--seed (checkpoint 42, now 1)" in message


def test_checkpoint_without_recorded_inputs_warns_and_continues(inputs_of):
    (warning,) = check(checkpoint_state(None), inputs_of())
    assert "records no digests" in warning and "older fastalign" in warning
    with pytest.raises(ConfigError, match="--per_device_train_batch_size"):  # its layout still counts
        check(checkpoint_state(None), inputs_of(), per_device_train_batch_size=4)
