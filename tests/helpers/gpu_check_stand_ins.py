"""Stand-ins for benchmarks/gpu_check.py's stages and environment stage: tiny `python -c` stages
that pass, fail, hang, need a failed stage, an optional package, more GPU memory or more budget,
so that the check's orchestration (statuses, notes, budget, exit status) is tested in seconds on
a CPU machine.

As a script, one whole check over the stand-ins, for a test that starts it in the background (its
stages mostly sleep, waiting for their limits):
`python -m helpers.gpu_check_stand_ins OUTCOME_JSON OUT_DIR BUDGET_S [STAGE ...]` writes
{"status": the check's exit status, "elapsed": its seconds} to OUTCOME_JSON (every stage when no
STAGE is named).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `benchmarks` is imported from the source tree, as its scripts do
    sys.path.insert(0, str(REPO))


def _script(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def stand_in_stages(python, out_dir, scratch):
    """Every kind of stage outcome, in gpu_check's `stages(python, out_dir, scratch)` signature."""
    from benchmarks.gpu_check import Stage

    noisy_failure = ("import sys; print('loading'); print('RuntimeError: the first cause'); "
                     "print('error: a consequence', file=sys.stderr); sys.exit(3)")
    return [
        Stage("fine", _script("print('ok')"), max_s=30),
        Stage("broken", _script(noisy_failure), max_s=30),
        Stage("after_broken", _script("print('never')"), max_s=30, needs="broken"),
        Stage("hangs", _script("import time; print('started', flush=True); time.sleep(60)"), max_s=1.5),
        Stage("optional", _script("print('never')"), max_s=30, skip_reason="trl is not importable here"),
        Stage("big_gpu", _script("print('never')"), max_s=30, min_gpu_gib=64),
        Stage("long", _script("import time; print('working', flush=True); time.sleep(60)"), max_s=120),
        Stage("late", _script("print('never')"), max_s=30, min_s=20),
    ]


def fake_environment(fatal: str = ""):
    """An environment stage that reports a 40 GiB stand-in GPU (and `fatal` as its verdict)."""
    from benchmarks.gpu_check import StageResult

    def environment_stage(out_dir):
        info = {"torch": "2.x", "gpu_name": "Stand-in GPU", "gpu_mem_bytes": 40 * 2**30}
        (out_dir / "environment.json").write_text(json.dumps(info))
        return StageResult("environment", "failed" if fatal else "ok", 0.1, note=fatal), info, fatal

    return environment_stage


def main(argv: Sequence[str] | None = None) -> int:
    from benchmarks import gpu_check

    outcome, out_dir, budget_s, *names = sys.argv[1:] if argv is None else argv

    def stages(python, out, scratch):
        every = stand_in_stages(python, out, scratch)
        return [s for s in every if s.name in names] if names else every

    started = time.perf_counter()
    status = gpu_check.check(Path(out_dir), budget_s=float(budget_s), only=None, environment_stage=fake_environment(),
                             stage_list=stages)
    Path(outcome).write_text(json.dumps({"status": status, "elapsed": time.perf_counter() - started}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
