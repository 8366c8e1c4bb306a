"""One run per output directory, and no destructive step touches what the run reads.

In-process: the lock (`fastalign.run_lock`: a second holder refused, stale locks taken over) and the
input guard (`fastalign.run_inputs`, `checkpoint.start_branch`). Through the command line (slow):
--overwrite_output_dir refusing to delete the model it starts from, a second trainer on a live
run's directory, a stale lock taken over, and every rank of a refused torchrun exiting 2."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from fastalign import checkpoint as ckpt
from fastalign.errors import ConfigError
from fastalign.run_inputs import RunInputs, refuse_destroying_inputs
from fastalign.run_lock import LOCK_FILE, hold_output_dir, take_lock
from helpers.checkpoints import make_checkpoint
from helpers.training import common, metrics, no_traceback, ok, run_train, start_train, wait_for_steps


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_owner(out: Path, host: str, pid: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    path.write_text(json.dumps({"host": host, "pid": pid, "started": "2026-01-01T00:00:00Z"}))
    return path


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its bytes (None for a directory)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


# ---------------------------------------------------------------------------- the lock, in-process


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


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, process_group, caplog):
    out = tmp_path / "out"
    pid = dead_pid()
    write_owner(out, socket.gethostname(), pid)
    with hold_output_dir(out):
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"taking over the stale lock of pid {pid}" in caplog.text


def test_a_lock_still_held_for_a_dead_owner_on_this_host_is_replaced(tmp_path, caplog):
    """A forked child kept the dead owner's descriptor (and so its flock): the file is replaced."""
    out = tmp_path / "out"
    pid = dead_pid()
    path = write_owner(out, socket.gethostname(), pid)
    inherited = os.open(path, os.O_RDWR)
    fcntl.flock(inherited, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with take_lock(out) as lock:
            assert json.loads(path.read_text())["pid"] == os.getpid()
            assert os.fstat(lock.fd).st_ino != os.fstat(inherited).st_ino
        assert f"its owner, pid {pid} on this host" in caplog.text
    finally:
        os.close(inherited)


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


# ---------------------------------------------------------------------------- inputs, in-process


def run_args(model: Path, data: Path, eval_data: Path | None = None) -> Namespace:
    return Namespace(model_name_or_path=str(model), data_path=str(data),
                     eval_data_path=str(eval_data) if eval_data else None)


def guard(out: Path, args: Namespace, *, overwrite=False, save_total_limit=None, save_only_model=False):
    refuse_destroying_inputs(out, RunInputs.from_args(args), overwrite=overwrite, save_total_limit=save_total_limit,
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
    inputs = RunInputs.from_args(run_args(tmp_path / "model", tmp_path / "data.jsonl", eval_data))
    with pytest.raises(ConfigError, match="resuming at step 2 would move into abandoned-<UTC time>/ the later "
                                          f"checkpoint {out / 'checkpoint-4'}, which holds --eval_data_path"):
        ckpt.start_branch(out, 2, out / "checkpoint-2", inputs)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-4"]


# ---------------------------------------------------------------------------- the command line


@pytest.mark.slow
def test_overwrite_output_dir_keeps_the_model_it_starts_from(tiny, tmp_path):
    """The README's "start a new run from a --save_only_model checkpoint", into the same dir."""
    model, data = tiny
    out = tmp_path / "out"
    flags = dict(max_steps=2, per_device_train_batch_size=2, save_strategy="steps", save_steps=1)
    ok(run_train(common(model, data, out, save_only_model=True, **flags)))
    start = out / "checkpoint-2"
    before = tree(out)
    result = run_train(common(start, data, out, overwrite_output_dir=True, **flags))
    stderr = no_traceback(result)
    assert (f"error: --overwrite_output_dir True would delete {start}, which holds "
            f"--model_name_or_path {start}") in stderr
    assert tree(out) == before  # the model, the other checkpoint, metrics: every byte


@pytest.mark.slow
def test_a_second_trainer_on_a_live_run_is_refused_and_the_first_finishes_intact(tiny, tmp_path):
    """A scheduler relaunching a job that is still alive (`auto`): the relaunch exits 2 naming the
    live run; the first run, paused meanwhile (SIGSTOP) so it is surely alive, then finishes."""
    model, data = tiny
    out = tmp_path / "out"
    flags = dict(max_steps=12, per_device_train_batch_size=2, save_strategy="steps", save_steps=4)
    first = start_train(common(model, data, out, **flags))
    try:
        wait_for_steps(out, first, 5)  # checkpoint-4 written, the lock long since
        os.kill(first.pid, signal.SIGSTOP)
        second = run_train(common(model, data, out, resume_from_checkpoint="auto", **flags))
    finally:
        os.kill(first.pid, signal.SIGCONT)
    stderr = no_traceback(second)
    assert f"error: --output_dir {out} is in use by another fastalign run: pid {first.pid} on host " \
           f"{socket.gethostname()}" in stderr
    assert "Nothing in" in stderr and "choose another --output_dir" in stderr
    _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err[-3000:]
    assert [m["step"] for m in metrics(out)] == list(range(1, 13))  # each step once, no foreign line
    assert not (out / LOCK_FILE).exists()


@pytest.mark.slow
def test_a_stale_lock_from_a_dead_process_is_taken_over_through_the_command(tiny, tmp_path):
    model, data = tiny
    out = tmp_path / "out"
    pid = dead_pid()
    write_owner(out, socket.gethostname(), pid)
    result = ok(run_train(common(model, data, out, max_steps=1, per_device_train_batch_size=2)))
    assert f"taking over the stale lock of pid {pid} on host {socket.gethostname()}" in result.stderr
    assert [m["step"] for m in metrics(out)] == [1] and not (out / LOCK_FILE).exists()


@pytest.mark.slow
def test_every_rank_of_a_refused_torchrun_exits_2(tiny, tmp_path):
    model, data = tiny
    out = tmp_path / "out"
    with take_lock(out):  # this test process is the live run
        result = run_train(common(model, data, out, max_steps=1, per_device_train_batch_size=1), nproc=2)
    assert result.returncode != 0
    assert "ConfigError" not in result.stderr  # the workers' own exit: no traceback (torchrun prints its own)
    refused = [line for line in result.stderr.splitlines()
               if line.startswith(f"error: --output_dir {out} is in use by another fastalign run: pid {os.getpid()}")]
    assert len(refused) == 2, result.stderr[-3000:]  # rank 0 and rank 1 both learned it
    assert "exitcode  : 2" in result.stderr, result.stderr[-3000:]
    assert not out.exists() or list(out.iterdir()) == [], "a refused run writes nothing"
