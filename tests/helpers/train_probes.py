"""The trainer's own main() with probes: the process group's timeout as torch receives it, a save
and an evaluation that each take SLOW_S seconds (as a large checkpoint would), and a device peak of
FAKE_PEAK_FLOPS (so that a CPU run logs an MFU).

`run_probed_train` runs it through `helpers.ranks.run_ranks` (a forked process, or a new interpreter
with CUDA), so the probes never touch the test process; it prints `PROBES {json}` last on stdout.
"""

from __future__ import annotations

import json
import os
import subprocess
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
    from helpers.ranks import run_ranks

    result = run_ranks(probed_main, args, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result, json.loads(result.stdout.split("PROBES ", 1)[1])
