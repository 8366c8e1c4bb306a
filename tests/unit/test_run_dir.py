"""The run directory in-process: the lock's holder checks and the protection of the run's inputs."""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
from argparse import Namespace
from pathlib import Path

import pytest
from helpers.checkpoints import make_checkpoint
from helpers.run_dir import tree, write_owner

from fastalign import checkpoint as ckpt
from fastalign.errors import ConfigError
from fastalign.run_inputs import RunInputs, refuse_destroying_inputs
from fastalign.run_lock import LOCK_FILE, hold_output_dir, take_lock


def test_a_second_holder_is_refused_naming_the_running_process(tmp_path, process_group):
    out = tmp_path / "out"
    with hold_output_dir(out):
        before = (out / LOCK_FILE).read_bytes()
        assert json.loads(before)["pid"] == os.getpid()
        with pytest.raises(ConfigError) as err:
            hold_output_dir(out)  # another open file description: flock refuses it, even in one process
        message = str(err.value)
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in message and str(out) in message
        assert "Wait for that run to finish" in message and "choose another --output_dir" in message
        assert f"kill {os.getpid()}" in message
        assert (out / LOCK_FILE).read_bytes() == before  # the refused one changed nothing
    assert not (out / LOCK_FILE).exists()  # released and removed
    hold_output_dir(out).release()  # free again


def test_a_lock_held_on_another_host_is_refused(tmp_path):
    out = tmp_path / "out"
    path = write_owner(out, "node-7", 4242)
    held = os.open(path, os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with pytest.raises(ConfigError, match="pid 4242 on host node-7.*kill 4242 on node-7"):
            take_lock(out)
    finally:
        os.close(held)
    assert json.loads(path.read_text())["host"] == "node-7"


def run_args(model: Path, data: Path, eval_data: Path | None = None) -> Namespace:
    return Namespace(model_name_or_path=str(model), data_path=str(data),
                     eval_data_path=str(eval_data) if eval_data else None)


def guard(out: Path, args: Namespace, *, overwrite=False, save_total_limit=None, save_only_model=False):
    refuse_destroying_inputs(out, RunInputs.from_config(args), overwrite=overwrite, save_total_limit=save_total_limit,
                             save_only_model=save_only_model, run_files=("metrics.jsonl",))


def model_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "tokenizer.json").write_text("{}")
    return path


def test_overwrite_refuses_to_delete_a_model_inside_the_output_dir(tmp_path, process_group):
    out = tmp_path / "out"
    make_checkpoint(out, 1)
    model = model_dir(out / "checkpoint-2")  # a --save_only_model checkpoint of the same run
    data = tmp_path / "data.jsonl"
    data.write_text("{}\n")
    before = tree(out)
    with pytest.raises(ConfigError) as err:
        guard(out, run_args(model, data), overwrite=True)
    message = str(err.value)
    assert f"--overwrite_output_dir True would delete {out / 'checkpoint-2'}" in message
    assert f"--model_name_or_path {model}" in message and "Nothing was deleted" in message
    assert tree(out) == before
    guard(out, run_args(model, data))  # without the flag nothing of it is deleted: allowed
    guard(out, run_args(out / "base", data), overwrite=True)  # not a name the flag deletes


@pytest.mark.parametrize("where, flags, action", [
    ("abandoned-20260101T000000Z/data.jsonl", dict(overwrite=True), "--overwrite_output_dir True would delete"),
    ("checkpoint-3.tmp/data.jsonl", {}, "cleaning up what an interrupted save left would delete or move"),
    ("checkpoint-1/data.jsonl", dict(save_total_limit=2), "checkpoint rotation (--save_total_limit 2) would delete"),
    ("tokenizer.json", {}, "the final model export would replace"),
    ("metrics.jsonl", {}, "this run rewrites"),
], ids=["overwrite", "staging-cleanup", "rotation", "export", "metrics"])
def test_a_data_file_reached_through_a_symlink_is_protected(tmp_path, process_group, monkeypatch, where, flags, action):
    """--data_path given as a relative symlink outside the output dir, to a file inside a path
    that a destructive step would delete."""
    out = tmp_path / "out"
    make_checkpoint(out, 1)
    target = out / where
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("{}\n")
    (tmp_path / "link.jsonl").symlink_to(target)
    monkeypatch.chdir(tmp_path)
    before = tree(out)
    doomed = out / Path(where).parts[0]
    expected = f"{action} {doomed}, which holds --data_path link.jsonl ({target})"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        guard(out, run_args(tmp_path / "model", Path("link.jsonl")), **flags)
    assert tree(out) == before


def test_eval_data_inside_a_later_checkpoint_stops_the_lineage_move(tmp_path, process_group):
    out = tmp_path / "out"
    for step in (2, 4):
        make_checkpoint(out, step)
    eval_data = out / "checkpoint-4" / "eval.jsonl"
    eval_data.write_text("{}\n")
    inputs = RunInputs.from_config(run_args(tmp_path / "model", tmp_path / "data.jsonl", eval_data))
    with pytest.raises(ConfigError, match="resuming at step 2 would move into abandoned-<UTC time>/ the later "
                                          f"checkpoint {out / 'checkpoint-4'}, which holds --eval_data_path"):
        ckpt.start_branch(out, 2, out / "checkpoint-2", inputs)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-4"]
