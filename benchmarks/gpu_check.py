"""`make gpu-check`: everything that needs CUDA, in one command, for a lent GPU machine.

    PYTHONPATH=. python3 benchmarks/gpu_check.py --out_dir DIR [--budget_s 420] [--only STAGE ...]

Name a DIR that comes back from the machine (on a lent one, only the folder you name does); it is
printed first and last. No network and no install: it runs from the source tree with the
machine's python (torch, triton, transformers, safetensors, numpy and pytest; hypothesis,
matplotlib, flash-attn, trl and liger-kernel are optional).

Stages, in order, each with its own timeout inside an overall budget (default 420 s, so that a
second run fits a 15-minute loan with the machine's start-up):

  environment   (in-process, seconds) versions, GPU, the C compiler and Python headers Triton
                needs, one tiny Triton kernel launched, the attention and loss backends fastalign
                picks and why (benchmarks/gpu_environment.py). No CUDA, or a Triton that cannot
                build its launcher: the check stops here with one `error:` line naming the cause
                and the fix, every later stage listed as skipped with that reason, exit status 2.
                On sm80 or newer, attention falling back to per-sequence SDPA fails this stage
                (the others still run).
  pytest        `pytest -m gpu` after collecting the GPU tests (fewer run than collected, a
                collection error or a test skipped for want of CUDA fails it)
  loss_head     benchmarks/loss_head.py --preset gpu (fused loss head vs full logits, ...)
  checkpoint_1b the random 1.1B checkpoint, built once into a scratch folder (not --out_dir) and
                shared by the 1B stages below
  train_gpu-1b  benchmarks/train_throughput.py --preset gpu-1b (fastalign vs the original step)
  train_compile / train_offload / train_checkpointing
                benchmarks/train_modes.py: `--compile` (recompiles counted), `--fsdp "full_shard
                offload"` (one rank) and `--gradient_checkpointing`, each a few steps whose losses
                are compared with the eager run's (run once, shared)
  peer_trl      benchmarks/peer_trl.py: TRL's DPOTrainer vs fastalign --num_comp 2 on the 1B
                checkpoint (skipped, with the reason, when trl does not import)
  train_gpu-1b-realign, train_gpu-7b-layers   when time and GPU memory are left

Statuses: ok; failed (non-zero exit: the note is the first error line of its log); timeout (ran
past its own limit: a failure); cut (stopped by the overall budget before its own limit: not a
failure, the budget was too small); skipped (with the reason: not enough budget or GPU memory, a
stage it needs failed, an optional package missing, or the environment stage stopped the check).
The console gets one line per stage; each stage's output goes to its log. In DIR: `<stage>.log`,
each benchmark's JSON (and PNG), `pytest.xml`, `environment.json`, `summary.json`, and
`results-row.md`, the row for benchmarks/RESULTS.md. Exit status: 0 when nothing failed or
timed out, 1 when something did, 2 when the environment stage stopped the check.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.lib.machine import slug
from benchmarks.lib.paths import REPO_ROOT, RESULTS_DIR
from benchmarks.lib.results import utc_date, write_json
from benchmarks.lib.tables import format_table
from fastalign.errors import FastalignError

STAGING_DIR = RESULTS_DIR / "tmp"  # git-ignored
DEFAULT_BUDGET_S = 420.0


@dataclass
class Stage:
    name: str
    argv: list[str]
    max_s: float  # this stage's own timeout: about twice its estimate (see stages())
    min_s: float = 0.0  # skip the stage when less than this is left (about its estimate)
    writes_results: bool = False  # a benchmark: gets --out_dir, and the files it writes there are listed
    min_gpu_gib: float = 0.0  # skip the stage on a GPU with less memory
    needs: str = ""  # a stage that must have passed first (its product is this one's input)
    skip_reason: str = ""  # known before the run: why it cannot run here


@dataclass
class StageResult:
    name: str
    status: str  # ok | failed | timeout | cut | skipped
    seconds: float
    returncode: int | None = None
    log: str | None = None
    outputs: list[str] = field(default_factory=list)
    note: str = ""  # one line: why it did not pass, or what it counted


FAILING = ("failed", "timeout")


def stages(python: str, out_dir: Path, scratch: Path) -> list[Stage]:
    """The GPU check's stages. Estimates on an H100 (none measured yet: computed from the work):
    pytest ~90 s (two collections ~10 s each, Triton compiles of each kernel variant, a bf16
    FSDP2 training run); loss_head ~45 s (11 workers started together, 3 cases, 20 timed steps);
    train modes on a tiny model: checkpointing ~25 s (with the eager run), offload ~20 s, compile
    ~60 s (inductor on one decoder layer, forward and backward); checkpoint_1b ~20 s (1.1B
    parameters initialised on the GPU, 2.2 GB written); train_gpu-1b ~100 s (three processes load
    2.2 GB each, 10 steps of 8 groups per side); peer_trl ~60 s (two processes, 5 steps each).
    In 420 s the stages up to train_gpu-1b fit; the later ones run when the earlier finish early
    (or in a second run: --only checkpoint_1b peer_trl ...)."""
    bench = REPO_ROOT / "benchmarks"
    model_1b = scratch / "model-gpu-1b"
    modes_dir = scratch / "train-modes"
    trl_missing = "" if importlib.util.find_spec("trl") else "trl is not importable here (pip install trl)"

    def train(preset: str, *extra: str) -> list[str]:
        return [python, str(bench / "train_throughput.py"), "--preset", preset, "--plot", *extra]

    def mode(name: str) -> list[str]:
        return [python, str(bench / "train_modes.py"), "--mode", name, "--work_dir", str(modes_dir)]

    return [
        Stage("pytest", [python, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider",
                         f"--junitxml={out_dir / 'pytest.xml'}", "tests"], max_s=180, min_s=60),
        Stage("loss_head", [python, str(bench / "loss_head.py"), "--preset", "gpu"], max_s=90, min_s=30,
              writes_results=True),
        # The modes are cheap on a tiny model; the eager run they compare with is made by the first.
        Stage("train_checkpointing", mode("checkpointing"), max_s=60, min_s=25, writes_results=True),
        Stage("train_offload", mode("offload"), max_s=60, min_s=20, writes_results=True),
        Stage("train_compile", mode("compile"), max_s=150, min_s=60, writes_results=True),
        Stage("checkpoint_1b", train("gpu-1b", "--build_model_dir", str(model_1b)), max_s=60, min_s=20,
              min_gpu_gib=64),
        Stage("train_gpu-1b", train("gpu-1b", "--model_dir", str(model_1b)), max_s=180, min_s=90,
              writes_results=True, min_gpu_gib=64, needs="checkpoint_1b"),  # 3 processes x ~20 GiB
        Stage("peer_trl", [python, str(bench / "peer_trl.py"), "--model_dir", str(model_1b), "--repeats", "1"],
              max_s=120, min_s=60, writes_results=True, min_gpu_gib=64, needs="checkpoint_1b", skip_reason=trl_missing),
        Stage("train_gpu-1b-realign", train("gpu-1b-realign", "--model_dir", str(model_1b)), max_s=150, min_s=80,
              writes_results=True, min_gpu_gib=64, needs="checkpoint_1b"),
        Stage("train_gpu-7b-layers", train("gpu-7b-layers"), max_s=180, min_s=100, writes_results=True,
              min_gpu_gib=64),  # three sides' processes, each ~17 GiB of fp32 weights, grads and AdamW + activations
    ]


# ----------------------------------------------------------------------------- environment


def environment(out_dir: Path) -> tuple[StageResult, dict, str]:
    """The environment stage: (its result, the facts, why the check must stop or "")."""
    from benchmarks import gpu_environment

    start = time.perf_counter()
    info, verdict = gpu_environment.collect()
    write_json(out_dir / "environment.json", {**info, "fatal": verdict.fatal, "problems": verdict.problems})
    keys = ("gpu_name", "gpu_mem_bytes", "gpu_capability", "nvidia_smi", "torch", "cuda", "triton",
            "transformers", "flash_attn", "c_compiler", "python_headers", "triton_launch", "attention_backend",
            "attention_reason", "loss_backend", "loss_reason", "flash_attn_reason", "fastalign_choices_error",
            "git_commit")
    print("\n".join(f"  {k}: {info[k]}" for k in keys if k in info), flush=True)
    note = verdict.fatal or "; ".join(verdict.problems)
    status = "failed" if note else "ok"
    return StageResult("environment", status, time.perf_counter() - start, outputs=["environment.json"],
                       note=note), info, verdict.fatal


# ----------------------------------------------------------------------------- running stages


def run_logged(argv: list[str], log_path: Path, timeout_s: float, env: dict[str, str]) -> int | None:
    """Run argv with its output in log_path; None when it ran out of time (its whole process group,
    benchmark workers included, is killed)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, text=True, env=env,
                                cwd=REPO_ROOT, start_new_session=True)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None


_ERROR_LINE = re.compile(r"^(error: |E\s+|[\w.]*(Error|Exception)\b|FAILED )")


def failure_reason(log_text: str) -> str:
    """One line for the console from a failed stage's log: the first error line (the cause; what
    follows it is usually its consequences), else the last line."""
    lines = [line.strip() for line in log_text.splitlines() if line.strip()]
    for line in lines:
        if _ERROR_LINE.match(line):
            return line[:300]
    return lines[-1][:300] if lines else "no output"


@dataclass
class PytestCounts:
    collected: int
    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0
    skip_reasons: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # "test: first line of the message"

    @property
    def ran(self) -> int:
        return self.passed + self.failed + self.errors + self.skipped


def read_junit(path: Path, collected: int) -> PytestCounts:
    counts = PytestCounts(collected=collected)
    for case in ET.parse(path).getroot().iter("testcase"):
        name = case.get("name", "?")
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts.passed += 1
            continue
        message = (outcome.get("message") or outcome.text or "").strip().splitlines()
        first = message[0][:200] if message else ""
        if outcome.tag == "skipped":
            counts.skipped += 1
            counts.skip_reasons.append(f"{name}: {first}")
            continue
        if outcome.tag == "failure":
            counts.failed += 1
        else:
            counts.errors += 1
        counts.failures.append(f"{name}: {first}")
    return counts


def pytest_verdict(counts: PytestCounts | None, returncode: int | None, collect_note: str) -> tuple[str, str]:
    """(status, note) of the pytest stage: passing means every collected GPU test ran, none
    failed, and none was skipped for want of CUDA (a GPU test that skips because an optional
    package such as flash-attn is missing is listed, not failed)."""
    if collect_note:
        return "failed", collect_note
    if counts is None:
        return "failed", f"pytest exited {returncode} without a JUnit report"
    summary = f"{counts.passed} passed, {counts.failed} failed, {counts.errors} errors, " \
              f"{counts.skipped} skipped of {counts.collected} collected"
    no_cuda = [r for r in counts.skip_reasons if "needs CUDA" in r]
    if counts.failures:
        return "failed", f"{summary}; first: {counts.failures[0]}"
    if counts.ran < counts.collected:
        return "failed", f"{summary}: only {counts.ran} ran (collection or run interrupted)"
    if no_cuda:
        return "failed", f"{summary}: skipped for want of CUDA: {no_cuda[0]}"
    if returncode not in (0, None):
        return "failed", f"{summary}; pytest exited {returncode}"
    skipped = f"; skipped: {'; '.join(counts.skip_reasons)}" if counts.skip_reasons else ""
    return "ok", summary + skipped


def collect_gpu_tests(python: str, out_dir: Path, timeout_s: float, env: dict[str, str]) -> tuple[int, str]:
    """(number of GPU tests collected, "" or why collection failed)."""
    log_path = out_dir / "pytest-collect.log"
    rc = run_logged([python, "-m", "pytest", "-m", "gpu", "--collect-only", "-q", "-p", "no:cacheprovider",
                     "tests"], log_path, timeout_s, env)
    text = log_path.read_text()
    ids = [line for line in text.splitlines() if "::" in line and not line.startswith(("ERROR", "FAILED"))]
    if rc is None:
        return len(ids), f"collecting the GPU tests took more than {timeout_s:.0f} s"
    if rc != 0 or not ids:
        return len(ids), f"collecting the GPU tests failed (exit {rc}): {failure_reason(text)}"
    return len(ids), ""


def run_stage(stage: Stage, out_dir: Path, timeout_s: float, env: dict[str, str], *, cut_by_budget: bool
              ) -> StageResult:
    """Run one stage with `timeout_s`; running out of it is `cut` when the overall budget set that
    limit (cut_by_budget), else `timeout`."""
    start_wall = time.time()
    start = time.perf_counter()
    argv = list(stage.argv)
    if stage.writes_results:
        argv += ["--out_dir", str(out_dir)]
    log_path = out_dir / f"{stage.name}.log"
    print(f"=== {stage.name} (timeout {timeout_s:.0f} s): {' '.join(argv)}", flush=True)
    collected, collect_note = 0, ""
    if stage.name == "pytest":
        collected, collect_note = collect_gpu_tests(argv[0], out_dir, min(60.0, timeout_s), env)
        timeout_s -= time.perf_counter() - start
    rc = run_logged(argv, log_path, max(timeout_s, 1.0), env) if not collect_note else 1
    seconds = time.perf_counter() - start
    outputs = [log_path.name] if log_path.exists() else []
    if stage.writes_results:
        outputs += sorted(p.name for p in out_dir.iterdir() if p.is_file() and p.stat().st_mtime >= start_wall
                          and p.name != log_path.name)
    log_text = log_path.read_text(errors="replace") if log_path.exists() else ""
    out_of_time = "cut" if cut_by_budget else "timeout"
    limit = f"{'the budget' if cut_by_budget else 'its own limit'} stopped it after {timeout_s:.0f} s"
    if stage.name == "pytest":
        junit = out_dir / "pytest.xml"
        counts = read_junit(junit, collected) if junit.exists() and junit.stat().st_mtime >= start_wall else None
        status, note = pytest_verdict(counts, rc, collect_note)
        if rc is None:
            status, note = out_of_time, f"{limit}; {note}"
        return StageResult(stage.name, status, seconds, rc, log_path.name, outputs + ["pytest.xml"], note)
    if rc is None:
        last_line = log_text.strip().splitlines()[-1][:200] if log_text.strip() else "none"
        return StageResult(stage.name, out_of_time, seconds, None, log_path.name, outputs,
                           f"{limit}; last output: {last_line}")
    if rc != 0:
        return StageResult(stage.name, "failed", seconds, rc, log_path.name, outputs, failure_reason(log_text))
    return StageResult(stage.name, "ok", seconds, rc, log_path.name, outputs)


def run_stages(stage_list: list[Stage], out_dir: Path, budget_s: float, env: dict[str, str], *, gpu_gib: float,
               started: float, clock: Callable[[], float] = time.perf_counter) -> list[StageResult]:
    """Run the stages in order within what is left of the budget (counted from `started`)."""
    results: list[StageResult] = []
    status_of: dict[str, str] = {}
    for stage in stage_list:
        left = budget_s - (clock() - started)
        skip = stage.skip_reason
        if not skip and stage.needs and status_of.get(stage.needs) != "ok":
            skip = f"needs {stage.needs}, which {'did not run' if stage.needs not in status_of else 'did not pass'}"
        if not skip and stage.min_gpu_gib and gpu_gib < stage.min_gpu_gib:
            skip = f"needs {stage.min_gpu_gib:.0f} GiB of GPU memory, has {gpu_gib:.0f}"
        if not skip and left < max(stage.min_s, 5.0):
            skip = f"{left:.0f} s of the {budget_s:.0f} s budget left, it needs about {max(stage.min_s, 5.0):.0f} s"
        if skip:
            result = StageResult(stage.name, "skipped", 0.0, note=skip)
            print(f"=== {stage.name}: skipped ({skip})", flush=True)
        else:
            result = run_stage(stage, out_dir, min(stage.max_s, left), env, cut_by_budget=left < stage.max_s)
            print(f"    -> {result.status} in {result.seconds:.0f} s" + (f": {result.note}" if result.note else ""),
                  flush=True)
        status_of[stage.name] = result.status
        results.append(result)
    return results


def results_row(info: dict, results: list[StageResult]) -> str:
    """The benchmarks/RESULTS.md row of this run (GPU, versions, backends, each stage's status)."""
    stage_cells = "; ".join(f"{r.name} {r.status}" + (f" ({r.note})" if r.status != "ok" and r.note else "")
                            for r in results if r.name != "environment")
    pytest_note = next((r.note for r in results if r.name == "pytest" and r.status == "ok"), "")
    return (f"| {utc_date()} | {info.get('gpu_name', 'no GPU')} | torch {info.get('torch')}, CUDA {info.get('cuda')}, "
            f"triton {info.get('triton')}, flash-attn {info.get('flash_attn') or 'none'} | "
            f"attention {info.get('attention_backend', '?')}, loss {info.get('loss_backend', '?')} | "
            f"{stage_cells}{'; pytest: ' + pytest_note if pytest_note else ''} |\n")


def check(out_dir: Path, budget_s: float, only: list[str] | None, *,
          environment_stage: Callable[[Path], tuple[StageResult, dict, str]] = environment,
          stage_list: Callable[[str, Path, Path], list[Stage]] = stages) -> int:
    """The whole check into out_dir; the exit status (see the module docstring)."""
    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"gpu-check: results in {out_dir}", flush=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")  # no network on the lent machine: never try the hub

    env_result, info, fatal = environment_stage(out_dir)
    results = [env_result]
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))  # the shared checkpoints: never in out_dir
    try:
        every = stage_list(sys.executable, out_dir, scratch)
        wanted = set(only) | {s.needs for s in every if s.name in only and s.needs} if only is not None else None
        planned = [s for s in every if wanted is None or s.name in wanted]  # --only: with what they need
        if fatal:
            results += [StageResult(s.name, "skipped", 0.0, note=f"environment: {fatal}") for s in planned]
        else:
            results += run_stages(planned, out_dir, budget_s, env, started=t0,
                                  gpu_gib=(info.get("gpu_mem_bytes") or 0) / 2**30)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    total = time.perf_counter() - t0
    (out_dir / "results-row.md").write_text(results_row(info, results))
    write_json(out_dir / "summary.json", {"out_dir": str(out_dir), "total_s": total, "budget_s": budget_s,
                                          "fatal": fatal, "stages": [asdict(r) for r in results]})
    print("\n" + format_table(["stage", "status", "seconds", "note"],
                              [[r.name, r.status, f"{r.seconds:.1f}", r.note[:160]] for r in results]))
    print(f"\ntotal {total:.0f} s of the {budget_s:.0f} s budget; RESULTS.md row: results-row.md")
    print(f"gpu-check: results in {out_dir}", flush=True)
    if fatal:
        raise FastalignError(f"gpu-check stopped at the environment stage: {fatal}")
    return 1 if any(r.status in FAILING for r in results) else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget_s", type=float, default=DEFAULT_BUDGET_S,
                        help=f"overall time budget in seconds (default {DEFAULT_BUDGET_S:.0f})")
    parser.add_argument("--out_dir", type=Path, default=None,
                        help="name a folder that comes back from the machine (default: "
                             "benchmarks/results/tmp/gpu-check-<date>-<gpu>/, git-ignored)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these stages (names as in the summary)")
    args = parser.parse_args(argv)
    out_dir = args.out_dir
    if out_dir is None:
        import torch

        gpu = slug(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else "no-gpu"
        out_dir = STAGING_DIR / f"gpu-check-{utc_date()}-{gpu}"
    return check(out_dir.resolve(), args.budget_s, args.only)


if __name__ == "__main__":
    from fastalign.cli import run_main

    sys.exit(run_main(main))
