"""How a command's process ends (fastalign.cli.exit_process): with its status and all of its
output, and without interpreter finalisation while gloo's worker threads are alive (they can abort
a finished run there: "terminate called without an active exception", status -6)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]

ENDING = textwrap.dedent("""
    import atexit, logging, sys
    from logging.handlers import MemoryHandler
    import torch
    import torch.distributed as dist
    from fastalign.cli import exit_process, gloo_threads_alive

    if sys.argv[1] == "group":
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        # A finished collective, as at the end of a run: its worker thread has run (and named
        # itself; a thread that has not been scheduled yet has no name).
        dist.all_reduce(torch.ones(4))
        kept = dist.group.WORLD  # outlives destroy_process_group, as the DeviceMesh of FSDP does
        dist.destroy_process_group()
    print(f"threads={gloo_threads_alive()}", file=sys.stderr)
    # Written only when flushed: at logging.shutdown().
    handler = MemoryHandler(capacity=1000, target=logging.FileHandler(sys.argv[2]))
    logging.getLogger("probe").addHandler(handler)
    logging.getLogger("probe").warning("logged before the exit")
    atexit.register(lambda: print("finalised", file=sys.stderr))
    print("printed before the exit", end="")  # no newline: it sits in stdout's buffer (a pipe)
    exit_process(3)
""")


@pytest.fixture(scope="module")
def endings(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """case -> (the script's process, its log file), the two processes started at once."""
    root = tmp_path_factory.mktemp("endings")
    script = root / "ending.py"
    script.write_text(ENDING)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    started = {group: subprocess.Popen([sys.executable, str(script), group, str(root / f"{group}.log")],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
               for group in ("group", "none")}
    results = {}
    try:
        for group, proc in started.items():
            stdout, stderr = proc.communicate(timeout=120)
            result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
            results[group] = result, root / f"{group}.log"
    finally:
        for proc in started.values():  # a timed-out one is not left running
            proc.kill()
            proc.wait()
    return results


@pytest.mark.parametrize("group", ["group", "none"])
def test_exit_keeps_the_status_and_the_output_and_skips_finalisation_only_under_gloo(endings, group):
    result, log = endings[group]
    assert result.returncode == 3, result.stderr[-3000:]
    assert result.stdout == "printed before the exit"
    assert log.read_text() == "logged before the exit\n"
    alive = group == "group"
    assert f"threads={alive}" in result.stderr
    # With gloo's threads alive the interpreter must not finalise (no atexit handler runs);
    # without them it exits as usual.
    assert ("finalised" in result.stderr) is not alive
