"""Resumable checkpoints: completeness, rotation, auto-resume choice, and a save/load round trip."""

from __future__ import annotations

import random

import pytest
import torch
from helpers.checkpoints import make_checkpoint, sharded_toy, train_steps

from fastalign import checkpoint as ckpt
from fastalign.errors import ConfigError


def test_latest_checkpoint_skips_partial_and_orders_numerically(tmp_path, process_group):
    make_checkpoint(tmp_path, 9)
    make_checkpoint(tmp_path, 10)
    make_checkpoint(tmp_path, 12, complete=False)  # crashed before its state file
    make_checkpoint(tmp_path, 15, suffix=".tmp")  # crashed before the rename
    (tmp_path / "checkpoint-final").mkdir()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-9", "checkpoint-10"]
    assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint-10"
    assert ckpt.resolve_resume("auto", tmp_path).name == "checkpoint-10"


def test_auto_resume_without_checkpoint_starts_fresh(tmp_path, process_group):
    assert ckpt.resolve_resume("auto", tmp_path / "missing") is None
    assert ckpt.resolve_resume(None, tmp_path) is None


def test_explicit_resume_path_must_be_complete(tmp_path, process_group):
    partial = make_checkpoint(tmp_path, 4, complete=False)
    with pytest.raises(ConfigError, match="--resume_from_checkpoint"):
        ckpt.resolve_resume(str(partial), tmp_path)
    with pytest.raises(ConfigError, match="not a directory"):
        ckpt.resolve_resume(str(tmp_path / "nope"), tmp_path)
    good = make_checkpoint(tmp_path, 5)
    assert ckpt.resolve_resume(str(good), tmp_path) == good


def test_rotation_keeps_the_newest_complete_checkpoints(tmp_path):
    for step in (2, 4, 6, 8):
        make_checkpoint(tmp_path, step)
    make_checkpoint(tmp_path, 10, suffix=".tmp")
    deleted = ckpt.rotate_checkpoints(tmp_path, 2)
    assert [p.name for p in deleted] == ["checkpoint-2", "checkpoint-4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10.tmp", "checkpoint-6", "checkpoint-8"]
    assert ckpt.rotate_checkpoints(tmp_path, None) == []


def test_save_load_round_trip_with_rotation(tmp_path, process_group):
    model, optimizer, scheduler = sharded_toy(0)
    for step in (1, 2, 3):
        train_steps(model, optimizer, scheduler, 1)
        ckpt.save_checkpoint(tmp_path, step, model, optimizer, scheduler,
                             {"step": step, "epoch": 0, "step_in_epoch": step}, save_total_limit=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3"]
    expected_rng = (torch.rand(3), random.random())
    expected = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}

    fresh, fresh_opt, fresh_sched = sharded_toy(1)
    state = ckpt.load_checkpoint(tmp_path / "checkpoint-3", fresh, fresh_opt, fresh_sched)
    assert state == {"step": 3, "epoch": 0, "step_in_epoch": 3}
    assert (torch.rand(3), random.random()) == (pytest.approx(expected_rng[0]), expected_rng[1])
    for name, value in fresh.state_dict().items():
        assert torch.equal(value.full_tensor(), expected[name]), name
    assert fresh_sched.last_epoch == scheduler.last_epoch == 3
    # Same optimizer state: one more identical step keeps the two models identical.
    torch.manual_seed(7)
    train_steps(model, optimizer, scheduler, 1)
    torch.manual_seed(7)
    train_steps(fresh, fresh_opt, fresh_sched, 1)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a.full_tensor(), b.full_tensor()), name


def test_resaving_a_step_replaces_it(tmp_path, process_group):
    model, optimizer, scheduler = sharded_toy(0)
    position = {"step": 1, "epoch": 0, "step_in_epoch": 1}
    ckpt.save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {**position, "run": "a"})
    ckpt.save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {**position, "run": "b"})
    assert ckpt.read_trainer_state(tmp_path / "checkpoint-1")["run"] == "b"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-1"]


def test_fresh_start_into_a_directory_with_checkpoints_stops(tmp_path, process_group):
    make_checkpoint(tmp_path, 7)
    with pytest.raises(ConfigError) as err:
        ckpt.prepare_output_dir(tmp_path, fresh_start=True, overwrite=False)
    message = str(err.value)
    assert str(tmp_path) in message and "checkpoint-7" in message
    assert "--resume_from_checkpoint auto" in message and "--overwrite_output_dir True" in message
    assert (tmp_path / "checkpoint-7").is_dir()
    # Resuming there is what the checkpoints are for; a new directory is created.
    ckpt.prepare_output_dir(tmp_path, fresh_start=False, overwrite=False)
    ckpt.prepare_output_dir(tmp_path / "new", fresh_start=True, overwrite=False)
    assert (tmp_path / "new").is_dir()


def test_overwrite_output_dir_removes_the_old_run(tmp_path, process_group):
    make_checkpoint(tmp_path, 7)
    make_checkpoint(tmp_path, 9, suffix=".tmp")
    make_checkpoint(tmp_path, 3, suffix=".old")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "checkpoint-notes").mkdir()  # not a checkpoint name: the user's, kept
    (tmp_path / "config.json").write_text("{}")
    ckpt.prepare_output_dir(tmp_path, fresh_start=True, overwrite=True, run_files=("metrics.jsonl",))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-notes", "config.json"]
    ckpt.prepare_output_dir(tmp_path, fresh_start=True, overwrite=False)  # nothing left to clash
