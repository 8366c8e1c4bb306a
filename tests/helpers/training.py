"""Running the trainer as a user does, for the end-to-end tests: `python -m fastalign.train` or
torchrun, its flags, its exit status and what it writes (metrics.jsonl, model.safetensors)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_train(args: list[str], nproc: int = 1, timeout: int = 300,
              rendezvous: bool = False, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m fastalign.train`, or torchrun with `nproc` processes: `--standalone`, or with
    `rendezvous` the multi-node flags of docs/training.md (c10d rendezvous, one node here); `extra_env`
    adds environment variables."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "fastalign.train", *args]
    else:
        launch = (["--nnodes=1", "--node_rank=0", "--rdzv_backend=c10d",
                   f"--rdzv_endpoint=127.0.0.1:{free_port()}", "--rdzv_id=fastalign-test"]
                  if rendezvous else ["--standalone"])
        cmd = [sys.executable, "-m", "torch.distributed.run", *launch,
               f"--nproc_per_node={nproc}", "-m", "fastalign.train", *args]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **(extra_env or {}))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


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
