"""The trainer's own main() with probes: the process group's timeout as torch receives it, a save
and an evaluation that each take SLOW_S seconds (as a large checkpoint would), and a device peak of
FAKE_PEAK_FLOPS (so that a CPU run logs an MFU).

`run_probed_train` runs it in a process forked from the test's (helpers/forked.py), so the probes
never touch the test process; with CUDA, this file as a script in a new interpreter (a forked child
cannot use CUDA). Either way the process prints `PROBES {json}` last on stdout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

FAKE_PEAK_FLOPS = 1e9
SLOW_S = 1.5
REPO = Path(__file__).resolve().parents[2]


def probed_main(argv: Sequence[str]) -> int:
    import torch.distributed as dist

    from fastalign import train, trainer
    from fastalign.cli import run_main

    os.environ.pop("LOCAL_RANK", None)  # what the flag --local-rank sets, not inherited
    trainer.peak_flops = lambda device: FAKE_PEAK_FLOPS  # an MFU on CPU, to check what it counts
    seen = {}
    init = dist.init_process_group

    def recording_init(*args, **kwargs):
        seen["timeout_s"] = kwargs["timeout"].total_seconds()
        return init(*args, **kwargs)

    dist.init_process_group = recording_init
    for name in ("_save", "_evaluate"):
        original = getattr(trainer.Trainer, name)

        def slow(self, *args, _original=original, **kwargs):
            time.sleep(SLOW_S)
            return _original(self, *args, **kwargs)

        setattr(trainer.Trainer, name, slow)
    status = run_main(train.main, list(argv))
    seen["LOCAL_RANK"] = os.environ.get("LOCAL_RANK")
    print("PROBES " + json.dumps(seen), flush=True)
    return status


def run_probed_train(args: Sequence[object], timeout: int = 300) -> tuple[subprocess.CompletedProcess, dict]:
    """(the run's outcome, the probes it printed) for `python -m fastalign.train ARGS` with the probes."""
    import torch

    args = [str(arg) for arg in args]
    if torch.cuda.is_available():
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        result = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                                timeout=timeout, cwd=REPO, env=env)
    else:
        from helpers.forked import run_forked

        result = run_forked(probed_main, args, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result, json.loads(result.stdout.split("PROBES ", 1)[1])


if __name__ == "__main__":
    from fastalign.cli import exit_process, run_main

    exit_process(run_main(probed_main, sys.argv[1:]))
