"""Running the trainer as a user does, for the end-to-end tests: `python -m fastalign.train` or
torchrun, its flags, its exit status and what it writes (metrics.jsonl, model.safetensors).

`train_in_process` runs the same `main` in the test's process: for runs where the process itself
is not what a test checks, it saves the seconds of imports each `python -m` pays."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from helpers.forked import free_port
from helpers.ranks import run_ranks

REPO = Path(__file__).resolve().parents[2]


def run_train(args: list[str], nproc: int = 1, timeout: int = 300,
              rendezvous: bool = False) -> subprocess.CompletedProcess:
    """`python -m fastalign.train`, or torchrun with `nproc` processes: `--standalone`, or with
    `rendezvous` the multi-node flags of docs/training.md (c10d rendezvous, one node here)."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "fastalign.train", *args]
    else:
        launch = (["--nnodes=1", "--node_rank=0", "--rdzv_backend=c10d",
                   f"--rdzv_endpoint=127.0.0.1:{free_port()}", "--rdzv_id=fastalign-test"]
                  if rendezvous else ["--standalone"])
        cmd = [sys.executable, "-m", "torch.distributed.run", *launch,
               f"--nproc_per_node={nproc}", "-m", "fastalign.train", *args]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


def _write_warning(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


@contextlib.contextmanager
def as_a_fresh_process():
    """What `python -m fastalign.train` starts with and a test's process lacks: no root log handler
    (pytest's own would make main's logging.basicConfig a no-op), Python's default warning filters
    with warnings printed to stderr, and one thread (the subprocesses' OMP_NUM_THREADS=1). Restored
    after, with the process group a failed run leaves behind destroyed."""
    root = logging.getLogger()
    handlers, level, threads = root.handlers[:], root.level, torch.get_num_threads()
    root.handlers = []
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.resetwarnings()
            warnings.simplefilter("default")
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            warnings.showwarning = _write_warning
            yield
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers, root.level = handlers, level
        torch.set_num_threads(threads)
        if dist.is_initialized():
            dist.destroy_process_group()


def train_in_process(args: list[str]) -> subprocess.CompletedProcess:
    """`python -m fastalign.train ARGS` run as `fastalign.train.main` in this process: the exit
    status run_main gives (2 and an `error:` line for a clean error; for a bug, 1 and the traceback
    on stderr, as the interpreter would), stdout and stderr (log lines included) captured.

    For one-process runs whose test checks files, metrics, lines and exit statuses, not the process.
    With CUDA it is `run_train`: the subprocess sees no GPU there (tests/conftest.py), this process does.
    """
    if torch.cuda.is_available():
        return run_train(args)
    from fastalign.train import main

    return main_in_process(main, args, "fastalign.train")


def main_in_process(main, args: list[object], name: str, stdin: str = "") -> subprocess.CompletedProcess:
    """`python -m NAME ARGS` as `run_main(main, ARGS)` in this process, `stdin` as sys.stdin: the exit
    status (2 and an `error:` line for a clean error, 1 and the traceback for a bug, argparse's own for
    a usage error), stdout and stderr, log lines included."""
    from fastalign.cli import run_main

    args = [str(arg) for arg in args]
    stdout, stderr, saved_stdin = io.StringIO(), io.StringIO(), sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with as_a_fresh_process(), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                status = run_main(main, args)
            except SystemExit as exit_:  # argparse's usage errors (2)
                status = exit_.code if isinstance(exit_.code, int) else 1
            except Exception:
                traceback.print_exc()
                status = 1
    finally:
        sys.stdin = saved_stdin
    return subprocess.CompletedProcess([name, *args], status, stdout.getvalue(), stderr.getvalue())


def train_ranks(args: list[str], nproc: int, timeout: int = 300) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=NPROC -m fastalign.train ARGS` as ranks forked from this process
    (helpers/forked.py): the same process group and collectives without each rank's imports. For
    tests of what several ranks compute; torchrun's own behaviour is tested with `run_train`.
    The result's `ranks` holds each rank's outcome. With CUDA, real processes (helpers/ranks.py)."""
    from fastalign.train import main

    return run_ranks(main, args, nproc=nproc, timeout=timeout)


def run_train_on_terminal(args: list[str], timeout: int = 300) -> tuple[int, str]:
    """`python -m fastalign.train` with stderr on a pseudo-terminal, as in an interactive shell
    (the progress bar is drawn only there): (exit status, everything the terminal received)."""
    import fcntl
    import pty
    import select
    import struct
    import termios
    import time

    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # else 0 columns: an empty bar
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-m", "fastalign.train", *args], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=terminal, cwd=REPO, env=env)
    os.close(terminal)
    received, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not select.select([controller], [], [], 1.0)[0]:
                continue
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the process has ended and closed the terminal
                break
            if not chunk:
                break
            received.append(chunk)
        status = process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if process.poll() is None:
            process.kill()
        os.close(controller)
    return status, b"".join(received).decode(errors="replace")


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def common(model: Path, data: Path, out: Path, **flags) -> list[str]:
    args = {"model_name_or_path": model, "data_path": data, "output_dir": out,
            "model_max_length": 128, "learning_rate": 1e-3, "logging_steps": 1, "save_strategy": "no",
            "lr_scheduler_type": "constant"}
    args.update(flags)
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(a: Path, b: Path, atol: float = 1e-6) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=atol, msg=name)


LOGGED = ("loss", "nll_best", "penalty", "penalty_active_frac", "lr", "grad_norm")


def assert_same_metrics(ma: list[dict], mb: list[dict]) -> None:
    assert [m["step"] for m in ma] == [m["step"] for m in mb]
    for a, b in zip(ma, mb):
        for key in LOGGED:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)


def no_traceback(result: subprocess.CompletedProcess, code: int = 2) -> str:
    assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr


def wait_for_steps(out: Path, proc: subprocess.Popen, steps: int) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        path = out / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= steps:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {steps} logged steps: {proc.communicate()[1][-3000:]}")


def start_train(args: list[str], nproc: int = 1, extra_env: dict | None = None) -> subprocess.Popen:
    launch = ([sys.executable, "-m", "fastalign.train"] if nproc == 1 else
              [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "fastalign.train"])
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **(extra_env or {}))
    return subprocess.Popen(launch + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, env=env)
