"""Reliability in a process of its own: a second signal exits at once; the checkpoint-save benchmark's
smoke preset runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


REPO = Path(__file__).resolve().parents[2]


def test_second_signal_exits_at_once(tmp_path):
    """First SIGTERM: a flag (the step goes on); second: the default action, at once, even while
    the process is inside a long C++ call (a collective waiting on a dead peer, a device sync),
    where a Python-level handler would only run once the call returned."""
    script = (
        "import os, signal, threading, time, torch\n"
        "from fastalign.preemption import StopOnSignal\n"
        "with StopOnSignal() as stop:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(0.2)\n"
        "    print('flag', stop.requested(), flush=True)\n"
        "    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()\n"
        "    a = torch.randn(1200, 1200, dtype=torch.float64)\n"
        "    torch.linalg.matrix_power(a, 2**30)  # one op, seconds of C++ without bytecode\n"
        "    print('still running', flush=True)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
    assert result.returncode == -signal.SIGTERM, (result.returncode, result.stderr[-2000:])  # 143 in a shell
    assert result.stdout.splitlines() == [f"flag {int(signal.SIGTERM)}"]
    assert "send it again to exit at once" in result.stderr


def test_checkpoint_save_benchmark_runs_its_smoke_preset(tmp_path):
    import json

    from helpers.bench_runs import run_bench

    # forked from this process (helpers/bench_runs.py); tests/e2e/test_benchmarks_e2e.py starts the script
    result = run_bench("checkpoint_save", "--preset", "smoke", "--trials", "1", "--out_dir", tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    (written,) = tmp_path.glob("checkpoint_save-*-smoke-4mib.json")
    (row,) = json.loads(written.read_text())["results"]
    assert row["bytes"] > 3 * 4 * 2**20  # parameters + two AdamW moments
    assert 0 < row["checksum_s"] < row["save_s"] and row["verify_s"] > 0
