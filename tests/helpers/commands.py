"""Any command's `python -m fastalign.X ARGS`, run as `fastalign.X.main` in the test's process
(what helpers.training.train_in_process does for the trainer), with a given standard input.

For tests of a command's output, files and exit status where the process itself is not the point:
it saves the seconds of imports a new interpreter pays. Each command keeps at least one test
through a real `python -m` elsewhere. With CUDA it is that subprocess: this process sees the GPU,
the subprocesses of the e2e tests do not (tests/conftest.py), and the results must not depend on it.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Sequence

import torch

from helpers.training import REPO, main_in_process


def run_module(module: str, args: Sequence[object], stdin: str = "", timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m module ARGS` in a new interpreter, `stdin` piped to it."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=timeout, cwd=REPO, env=env)


def command_in_process(module: str, args: Sequence[object], stdin: str = "") -> subprocess.CompletedProcess:
    """`python -m module ARGS` as `run_main(module.main, ARGS)` here, `stdin` as sys.stdin: the exit
    status (2 and an `error:` line for a clean error, 1 and the traceback for a bug, argparse's own
    for a usage error), stdout and stderr, log lines included. `run_module` with CUDA."""
    if torch.cuda.is_available():
        return run_module(module, args, stdin=stdin)
    return main_in_process(importlib.import_module(module).main, args, module, stdin=stdin)
