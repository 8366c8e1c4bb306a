"""One run per output directory, and no destructive step touches what the run reads.

In-process: the lock (`fastalign.run_lock`: a second holder refused, stale locks taken over) and the
input guard (`fastalign.run_inputs`, `checkpoint.start_branch`). Through the command line (slow):
--overwrite_output_dir refusing to delete the model it starts from, a second trainer on a live
run's directory, a stale lock taken over, and every rank of a refused torchrun exiting 2."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
from helpers.run_dir import tree, write_owner
from helpers.training import (
    common,
    metrics,
    no_traceback,
    ok,
    run_train,
    start_train,
    train_in_process,
    wait_for_steps,
)

from fastalign.run_lock import LOCK_FILE, hold_output_dir, take_lock

pytestmark = pytest.mark.slow


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---------------------------------------------------------------------------- the lock, in-process


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


# ---------------------------------------------------------------------------- the command line


@pytest.mark.slow
def test_overwrite_output_dir_keeps_the_model_it_starts_from(tiny, tmp_path):
    """docs/reliability.md's "start a new run from a --save_only_model checkpoint", into the same dir."""
    model, data = tiny
    out = tmp_path / "out"
    flags = dict(max_steps=2, per_device_train_batch_size=2, save_strategy="steps", save_steps=1)
    ok(train_in_process(common(model, data, out, save_only_model=True, **flags)))
    start = out / "checkpoint-2"
    before = tree(out)
    result = train_in_process(common(start, data, out, overwrite_output_dir=True, **flags))
    stderr = no_traceback(result)
    assert (f"error: --overwrite_output_dir True would delete {start}, which holds "
            f"--model_name_or_path {start}") in stderr
    assert tree(out) == before  # the model, the other checkpoint, metrics: every byte


@pytest.mark.slow
def test_a_second_trainer_on_a_live_run_is_refused_and_the_first_finishes_intact(tiny, tmp_path):
    """A scheduler relaunching a job that is still alive (`auto`): the relaunch exits 2 naming the
    live run; the first run, paused meanwhile (SIGSTOP) so it is surely alive, then finishes.
    The first is a real process (its pid holds the lock); the relaunch is the trainer's main in
    the test's process, another pid, refused by the lock alone."""
    model, data = tiny
    out = tmp_path / "out"
    flags = dict(max_steps=12, per_device_train_batch_size=2, save_strategy="steps", save_steps=4)
    first = start_train(common(model, data, out, **flags))
    try:
        wait_for_steps(out, first, 5)  # checkpoint-4 written, the lock long since
        os.kill(first.pid, signal.SIGSTOP)
        second = train_in_process(common(model, data, out, resume_from_checkpoint="auto", **flags))
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
    result = ok(train_in_process(common(model, data, out, max_steps=1, per_device_train_batch_size=2)))
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
    # rank 0 and rank 1 both learned it (counted in the text: the two ranks' stderr lines can glue together)
    refused = result.stderr.count(f"error: --output_dir {out} is in use by another fastalign run: pid {os.getpid()}")
    assert refused == 2, result.stderr[-3000:]
    assert "exitcode  : 2" in result.stderr, result.stderr[-3000:]
    assert not out.exists() or list(out.iterdir()) == [], "a refused run writes nothing"
