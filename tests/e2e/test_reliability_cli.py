"""Faults through the command line, as a user meets them: a damaged newest checkpoint, resuming an
older step (a new branch), a full disk during a checkpoint and the export, preemption by SIGTERM /
SIGINT (one process and under torchrun), and output paths that would destroy inputs."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers.ranks import run_ranks
from helpers.train_mains import with_file_size_limit
from helpers.training import (
    assert_same_metrics,
    assert_same_weights,
    common,
    metrics,
    no_traceback,
    ok,
    start_train,
    train_in_process,
    train_ranks,
    wait_for_steps,
)

from fastalign.reporting import installed

pytestmark = pytest.mark.slow

FLAGS = dict(per_device_train_batch_size=2, save_strategy="steps", save_steps=1)


@pytest.fixture(scope="module")
def four_steps(tiny, tmp_path_factory):
    """An output dir with checkpoint-1 .. checkpoint-4 of one run (copy it before changing it)."""
    model, data = tiny
    out = tmp_path_factory.mktemp("four") / "out"
    ok(train_in_process(common(model, data, out, max_steps=4, **FLAGS)))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{i}" for i in (1, 2, 3, 4)]
    return out


def copy_run(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest


def test_damaged_newest_checkpoint_auto_resumes_the_previous_explicit_is_an_error(tiny, four_steps, tmp_path):
    model, data = tiny
    out = copy_run(four_steps, tmp_path / "out")
    shard = out / "checkpoint-4" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-1000])  # truncated by a kill / a full disk

    stderr = no_traceback(
        train_in_process(common(model, data, out, max_steps=4, resume_from_checkpoint=out / "checkpoint-4", **FLAGS))
    )
    assert "error: --resume_from_checkpoint" in stderr and str(shard) in stderr and "truncated" in stderr

    result = ok(train_in_process(common(model, data, out, max_steps=4, resume_from_checkpoint="auto", **FLAGS)))
    assert f"skipping {out / 'checkpoint-4'}" in result.stderr and str(shard) in result.stderr
    assert f"resumed from {out / 'checkpoint-3'}" in result.stderr
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]
    (abandoned,) = out.glob("abandoned-*")  # the damaged one is kept aside, not resumed again
    assert [p.name for p in abandoned.iterdir()] == ["checkpoint-4"]


def test_resuming_an_older_checkpoint_starts_a_new_branch(tiny, four_steps, tmp_path):
    """checkpoint-2 resumed with --save_total_limit 1 next to checkpoint-3/4 of the first run:
    the new branch's checkpoint-3 is kept (not deleted at once in favour of the old 4), and a
    later `auto` continues the new branch."""
    model, data = tiny
    out = copy_run(four_steps, tmp_path / "out")
    result = ok(train_in_process(common(model, data, out, max_steps=3, save_total_limit=1,
                                 resume_from_checkpoint=out / "checkpoint-2", **FLAGS)))
    assert "starts a new branch" in result.stderr
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["args"]["save_total_limit"] == 1  # written by the new branch
    (abandoned,) = out.glob("abandoned-*")
    assert sorted(p.name for p in abandoned.iterdir()) == ["checkpoint-3", "checkpoint-4"]

    result = ok(train_in_process(common(model, data, out, max_steps=4, save_total_limit=1,
                                 resume_from_checkpoint="auto", **FLAGS)))
    assert f"resumed from {out / 'checkpoint-3'}" in result.stderr
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]


def run_limited(args: list[str], limit: int) -> subprocess.CompletedProcess:
    """The trainer whose writes past `limit` bytes fail with EFBIG (as a full disk's ENOSPC), in a
    process of its own (helpers/ranks.py: forked on CPU) so that the limit binds it alone."""
    return run_ranks(with_file_size_limit, [limit, *args])


def test_write_failure_in_a_checkpoint_and_in_the_export_is_a_clean_error(tiny, four_steps, tmp_path):
    model, data = tiny
    shard_size = (four_steps / "checkpoint-1" / "__0_0.distcp").stat().st_size
    weights_size = (four_steps / "model.safetensors").stat().st_size
    assert weights_size < shard_size // 2

    out = copy_run(four_steps, tmp_path / "ckpt")
    stderr = no_traceback(run_limited(common(model, data, out, max_steps=6, resume_from_checkpoint="auto",
                                             **FLAGS), limit=shard_size // 2))
    assert f"error: writing checkpoint {out / 'checkpoint-5'} failed" in stderr
    assert "a write stopped short" in stderr and "it needs about" in stderr  # torch.save hides the errno
    assert f"The last complete checkpoint is {out / 'checkpoint-4'}" in stderr
    assert not list(out.glob("*.tmp"))

    out = tmp_path / "export"
    stderr = no_traceback(run_limited(common(model, data, out, max_steps=1, per_device_train_batch_size=2),
                                      limit=weights_size // 2))
    assert f"error: writing the model to {out} failed" in stderr and "File too large (EFBIG)" in stderr
    assert not list(out.glob(".tmp-save-*")) and not (out / "model.safetensors").exists()


@pytest.mark.parametrize("sig, save", [(signal.SIGINT, "steps"), (signal.SIGTERM, "no"), (signal.SIGTERM, "model")],
                         ids=["SIGINT-saves", "SIGTERM-save_strategy-no", "SIGTERM-save_only_model"])
def test_signal_finishes_the_step_saves_and_names_the_resume_point(tiny, tmp_path, sig, save):
    model, data = tiny
    out = tmp_path / "out"
    flags = dict(max_steps=400, per_device_train_batch_size=2, save_strategy="no" if save == "no" else "steps",
                 save_steps=1000, **(dict(save_only_model=True) if save == "model" else {}))
    report = installed("wandb")
    proc = start_train(common(model, data, out, **flags, **(dict(report_to="wandb") if report else {})),
                       extra_env={"WANDB_MODE": "offline"})
    wait_for_steps(out, proc, 2)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr[-3000:]
    assert "Traceback" not in stderr
    assert f"stopped: {sig.name} received: stopped after step" in stderr
    step = int(stderr.split("stopped after step ")[1].split()[0])
    assert [m["step"] for m in metrics(out)] == list(range(1, step + 1))  # every finished step logged
    if report:  # the run was finished on the way out (exit record, every step's history)
        from helpers.wandb_offline import wandb_records

        records = list(wandb_records(Path(glob.glob(str(out / "wandb" / "offline-run-*" / "*.wandb"))[0])))
        assert [r.history.step.num for r in records if r.WhichOneof("record_type") == "history"] == \
            list(range(1, step + 1))
        assert any(r.WhichOneof("record_type") == "exit" for r in records)
    if save == "no":
        assert "no checkpoint was written" in stderr and not list(out.glob("checkpoint-*"))
        return
    assert [p.name for p in out.glob("checkpoint-*")] == [f"checkpoint-{step}"]
    if save == "model":  # written, and said to be model only: no resume hint that would fail
        stopped = next(line for line in stderr.splitlines() if "stopped: " in line)
        assert f"the last checkpoint is {out / f'checkpoint-{step}'}, model only" in stopped
        assert "cannot be resumed" in stopped and "--resume_from_checkpoint" not in stopped
        return
    assert f"--resume_from_checkpoint {out / f'checkpoint-{step}'}" in stderr
    result = ok(train_in_process(common(model, data, out, **dict(flags, max_steps=step + 1),
                                 resume_from_checkpoint="auto")))
    assert f"resumed from {out / f'checkpoint-{step}'}" in result.stderr


def test_kill_9_mid_run_then_auto_resume_equals_the_uninterrupted_run(tiny, tmp_path):
    """SIGKILL lands wherever it lands (a step, a save, a metrics line): `auto` resumes the newest
    complete checkpoint and the run ends with the uninterrupted run's weights, bit for bit."""
    model, data = tiny
    flags = dict(max_steps=16, per_device_train_batch_size=2, save_strategy="steps", save_steps=1,
                 save_total_limit=2)
    full, killed = tmp_path / "full", tmp_path / "killed"
    ok(train_in_process(common(model, data, full, **flags)))
    proc = start_train(common(model, data, killed, **flags))
    wait_for_steps(killed, proc, 4)
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL  # killed, not finished
    result = ok(train_in_process(common(model, data, killed, resume_from_checkpoint="auto", **flags)))
    assert "resumed from" in result.stderr
    assert_same_metrics(metrics(full), metrics(killed))
    assert_same_weights(full, killed, atol=0)
    assert not list(killed.glob("checkpoint-*.tmp"))


def worker_pids(launcher: subprocess.Popen, count: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
        ranks = {}
        for pid in children:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            rank = next((int(e[5:]) for e in environ if e.startswith(b"RANK=")), None)
            if rank is not None:
                ranks[rank] = int(pid)
        if len(ranks) == count:
            return ranks
        time.sleep(0.1)
    raise AssertionError("torchrun workers not found")


def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step(tiny, tmp_path):
    model, data = tiny
    out = tmp_path / "out"
    flags = dict(max_steps=400, per_device_train_batch_size=1, save_strategy="steps", save_steps=1000,
                 fsdp="full_shard auto_wrap")
    proc = start_train(common(model, data, out, **flags), nproc=2)
    pids = worker_pids(proc, 2)
    wait_for_steps(out, proc, 2)
    os.kill(pids[1], signal.SIGTERM)  # rank 1 only; rank 0 learns it in the step's flag all_reduce
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode != 0
    # found in the text, not by lines: the two ranks' stderr lines can glue together on one line
    stops = re.findall(r"stopped: SIGTERM received: stopped after step (\d+) ", stderr)
    assert len(stops) == 2, stderr[-4000:]  # both ranks, the same step
    step = int(stops[0])
    assert stops == [str(step)] * 2
    assert [p.name for p in out.glob("checkpoint-*")] == [f"checkpoint-{step}"]
    result = ok(train_ranks(common(model, data, out, **dict(flags, max_steps=step + 1),
                                   resume_from_checkpoint="auto"), nproc=2))
    assert f"resumed from {out / f'checkpoint-{step}'}" in result.stderr


@pytest.mark.parametrize("output, needle", [
    ("", "must not be empty"),
    ("{model}", "is --model_name_or_path"),
    ("{model}/run", "is inside --model_name_or_path"),
])
def test_output_dir_that_would_overwrite_inputs_is_refused(tiny, output, needle, capsys):
    from fastalign.config import parse_args

    model, data = tiny
    argv = ["--model_name_or_path", str(model), "--data_path", str(data), "--output_dir", output.format(model=model)]
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    assert exit_.value.code == 2 and needle in capsys.readouterr().err
    if output:
        assert parse_args(argv + ["--allow_output_in_model_dir", "True"]).allow_output_in_model_dir
