"""Any `main(argv) -> int` run as a command's ranks, for end-to-end tests where what the ranks
compute, print and write is the point, not the launcher: on CPU as ranks forked from the test's
process (helpers/forked.py: no imports per rank), with CUDA as real processes,

    python -m helpers.ranks MODULE:FUNCTION ARGS                   (nproc 1)
    torchrun --standalone --nproc_per_node=N -m helpers.ranks ...  (nproc > 1)

because a forked child cannot use a CUDA context its parent may hold. The function must live in an
importable module (fastalign's, or one in tests/helpers), so both ways find it.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def run_ranks(main: Callable[[Sequence[str] | None], int | None], args: Sequence[object], nproc: int = 1,
              timeout: float = 300) -> subprocess.CompletedProcess:
    """`main(args)` on `nproc` ranks (RANK, WORLD_SIZE, MASTER_PORT ... as torchrun sets them when
    nproc > 1; none for 1, as `python -m`): the exit status (0 when every rank exited 0), stdout and
    stderr (the ranks' in rank order when forked). Forked, the result's `ranks` holds each rank's."""
    args = [str(arg) for arg in args]
    if not torch.cuda.is_available():
        from helpers.forked import run_forked

        return run_forked(main, args, nproc=nproc, timeout=timeout)
    launch = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, *launch, "-m", "helpers.ranks", f"{main.__module__}:{main.__name__}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


if __name__ == "__main__":
    from fastalign.cli import exit_process, run_main

    module, name = sys.argv[1].split(":")
    exit_process(run_main(getattr(importlib.import_module(module), name), sys.argv[2:]))
