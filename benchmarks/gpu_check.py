"""`make gpu-check`: everything that needs CUDA, in one command, for a lent GPU machine.

    PYTHONPATH=. python benchmarks/gpu_check.py [--budget_s 530] [--out_dir DIR] [--only STAGE ...]

No network and no install: it runs from the source tree with the machine's python (which must
have torch, triton, transformers, safetensors, numpy and pytest; hypothesis, matplotlib and
flash-attn are optional). Stages, each with its own timeout inside an overall budget (default
530 s, under 9 minutes); a stage that fails or times out is recorded and the next one still runs:

  1. environment   GPU name, memory, capability, driver (nvidia-smi); torch / CUDA / triton /
                   transformers / flash-attn versions; the attention and loss backends that
                   fastalign picks on this GPU (and why flash-attn is not used, when it is not)
  2. pytest        `pytest -m gpu` (the CUDA tests: Triton kernels, model, trainer on GPU), after
                   collecting them: fewer tests run than collected, a collection error or a test
                   skipped for want of CUDA fails the stage
  3. loss_head     `benchmarks/loss_head.py --preset gpu` (fused loss head vs full logits)
  4. train_gpu-1b  `benchmarks/train_throughput.py --preset gpu-1b --plot` (fastalign vs baseline)
  5. train_gpu-1b-realign  the same on long-query, realignment-like records with k <= 5 (the CPU
                   preset cpu-tiny-realign's data at gpu-1b's size), when time is left
  6. train_gpu-7b-layers   the same for 4 layers of Llama-7B's shape, when time and GPU memory
                   (64 GiB) are left

The console gets one line per stage (status, seconds, a one-line reason when it did not pass);
each stage's full output goes to its log. Everything lands in one folder, by default
benchmarks/results/tmp/gpu-check-<date>-<gpu>/ (git-ignored: move it to benchmarks/results/ to
commit it): `<stage>.log`, the JSON (and PNG) each benchmark wrote, `pytest.xml` (JUnit),
`environment.json`, `summary.json`, and `results-row.md`, the row to paste into
benchmarks/RESULTS.md. The exit status is 0 when no stage failed or timed out (a stage skipped for
lack of time or GPU memory is listed as skipped, with the reason).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    REPO_ROOT, RESULTS_DIR, format_table, machine_info, slug, utc_date, write_json)

STAGING_DIR = RESULTS_DIR / "tmp"  # git-ignored


@dataclass
class Stage:
    name: str
    argv: list[str]
    max_s: float  # this stage's own timeout (cut further by what is left of the budget)
    min_s: float = 0.0  # skip the stage when less than this is left
    writes_results: bool = False  # a benchmark: gets --out_dir, and the files it writes there are listed
    min_gpu_gib: float = 0.0  # skip the stage on a GPU with less memory


@dataclass
class StageResult:
    name: str
    status: str  # ok | failed | timeout | skipped
    seconds: float
    returncode: int | None = None
    log: str | None = None
    outputs: list[str] = field(default_factory=list)
    note: str = ""  # one line: why it did not pass, or what it counted


def stages(python: str, out_dir: Path) -> list[Stage]:
    bench = REPO_ROOT / "benchmarks"
    return [
        Stage("pytest", [python, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider",
                         f"--junitxml={out_dir / 'pytest.xml'}", "tests"], max_s=200),
        Stage("loss_head", [python, str(bench / "loss_head.py"), "--preset", "gpu"], max_s=120, min_s=30,
              writes_results=True),
        Stage("train_gpu-1b", [python, str(bench / "train_throughput.py"), "--preset", "gpu-1b", "--plot"],
              max_s=200, min_s=90, writes_results=True, min_gpu_gib=64),  # 3 processes x ~20 GiB (below)
        Stage("train_gpu-1b-realign", [python, str(bench / "train_throughput.py"), "--preset", "gpu-1b-realign",
                                       "--plot"], max_s=170, min_s=90, writes_results=True, min_gpu_gib=64),
        Stage("train_gpu-7b-layers", [python, str(bench / "train_throughput.py"), "--preset", "gpu-7b-layers",
                                      "--plot"], max_s=180, min_s=100, writes_results=True,
              min_gpu_gib=64),  # three sides' processes, each ~17 GiB of fp32 weights, grads and AdamW + activations
    ]


# ----------------------------------------------------------------------------- environment


def fastalign_choices(cuda: bool) -> dict:
    """The backends fastalign runs with here (bf16, head_dim 128 as in Llama-7B), and why not
    flash-attn when it is not the attention backend."""
    import torch

    from fastalign import attention
    from fastalign.train import loss_backend_name

    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    choices = {"attention_backend": attention.resolve_backend("auto", device, dtype, head_dim=128),
               "loss_backend": loss_backend_name("auto", device)}
    flash_fn, flash_reason = attention.flash_attn_status()
    choices["flash_attn_usable"] = flash_fn is not None
    if flash_reason:
        choices["flash_attn_reason"] = flash_reason
    return choices


def environment(out_dir: Path) -> StageResult:
    start = time.perf_counter()
    import torch

    cuda = torch.cuda.is_available()
    info: dict = {"cuda_available": cuda, **machine_info("cuda" if cuda else "cpu")}
    try:
        info.update(fastalign_choices(cuda))
    except Exception as err:  # reported, not raised: the other stages still run
        info["fastalign_choices_error"] = f"{type(err).__name__}: {err}"
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            info["nvidia_smi"] = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                                                 "--format=csv,noheader"], capture_output=True, text=True,
                                                timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as err:
            info["nvidia_smi"] = f"failed: {err}"
    write_json(out_dir / "environment.json", info)
    keys = ("gpu_name", "gpu_mem_bytes", "gpu_capability", "nvidia_smi", "torch", "cuda", "triton",
            "transformers", "flash_attn", "attention_backend", "loss_backend", "flash_attn_reason",
            "fastalign_choices_error", "git_commit")
    print("\n".join(f"  {k}: {info[k]}" for k in keys if k in info), flush=True)
    note = "" if cuda else "no CUDA device visible to torch"
    if "fastalign_choices_error" in info:
        note = info["fastalign_choices_error"]
    return StageResult("environment", "ok" if cuda and not note else "failed",
                       time.perf_counter() - start, outputs=["environment.json"], note=note)


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


_ERROR_LINE = re.compile(r"^(error: |E\s+|\w*(Error|Exception)\b|Traceback|FAILED )")


def failure_reason(log_text: str) -> str:
    """One line for the console from a failed stage's log: the last error-looking line, else the
    last line."""
    lines = [line.strip() for line in log_text.splitlines() if line.strip()]
    for line in reversed(lines):
        if _ERROR_LINE.match(line) and not line.startswith("Traceback"):
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


def run_stage(stage: Stage, out_dir: Path, timeout_s: float, env: dict[str, str]) -> StageResult:
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
    log_text = log_path.read_text() if log_path.exists() else ""
    if stage.name == "pytest":
        junit = out_dir / "pytest.xml"
        counts = read_junit(junit, collected) if junit.exists() and junit.stat().st_mtime >= start_wall else None
        status, note = pytest_verdict(counts, rc, collect_note)
        if rc is None:
            status, note = "timeout", f"killed after {timeout_s:.0f} s; {note}"
        return StageResult(stage.name, status, seconds, rc, log_path.name, outputs + ["pytest.xml"], note)
    if rc is None:
        return StageResult(stage.name, "timeout", seconds, None, log_path.name, outputs,
                           f"killed after {timeout_s:.0f} s; last output: {failure_reason(log_text)}")
    if rc != 0:
        return StageResult(stage.name, "failed", seconds, rc, log_path.name, outputs, failure_reason(log_text))
    return StageResult(stage.name, "ok", seconds, rc, log_path.name, outputs)


def results_row(info: dict, results: list[StageResult]) -> str:
    """The benchmarks/RESULTS.md row of this run (GPU, versions, backends, each stage's status)."""
    stage_cells = "; ".join(f"{r.name} {r.status}" + (f" ({r.note})" if r.status != "ok" and r.note else "")
                            for r in results if r.name != "environment")
    pytest_note = next((r.note for r in results if r.name == "pytest" and r.status == "ok"), "")
    return (f"| {utc_date()} | {info.get('gpu_name', 'no GPU')} | torch {info.get('torch')}, CUDA {info.get('cuda')}, "
            f"triton {info.get('triton')}, flash-attn {info.get('flash_attn') or 'none'} | "
            f"attention {info.get('attention_backend', '?')}, loss {info.get('loss_backend', '?')} | "
            f"{stage_cells}{'; pytest: ' + pytest_note if pytest_note else ''} |\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget_s", type=float, default=530.0, help="overall time budget in seconds")
    parser.add_argument("--out_dir", type=Path, default=None,
                        help="default: benchmarks/results/tmp/gpu-check-<date>-<gpu>/ (git-ignored)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these stages (names as in the summary)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()

    import torch

    gpu = slug(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else "no-gpu"
    out_dir = args.out_dir or STAGING_DIR / f"gpu-check-{utc_date()}-{gpu}"
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")  # no network on the lent machine: never try the hub

    print(f"gpu-check: results in {out_dir}", flush=True)
    results = [environment(out_dir)]
    gpu_gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else 0.0
    for stage in stages(sys.executable, out_dir):
        if args.only is not None and stage.name not in args.only:
            continue
        if stage.min_gpu_gib and gpu_gib < stage.min_gpu_gib:
            results.append(StageResult(stage.name, "skipped", 0.0,
                                       note=f"needs {stage.min_gpu_gib:.0f} GiB of GPU memory, has {gpu_gib:.0f}"))
            continue
        left = args.budget_s - (time.perf_counter() - t0)
        if left < max(stage.min_s, 5.0):
            results.append(StageResult(stage.name, "skipped", 0.0, note=f"{left:.0f} s of the budget left"))
            continue
        result = run_stage(stage, out_dir, min(stage.max_s, left), env)
        print(f"    -> {result.status} in {result.seconds:.0f} s" + (f": {result.note}" if result.note else ""),
              flush=True)
        results.append(result)

    total = time.perf_counter() - t0
    info = json.loads((out_dir / "environment.json").read_text())
    (out_dir / "results-row.md").write_text(results_row(info, results))
    write_json(out_dir / "summary.json", {"out_dir": str(out_dir), "total_s": total, "budget_s": args.budget_s,
                                          "stages": [asdict(r) for r in results]})
    print("\n" + format_table(["stage", "status", "seconds", "note"],
                              [[r.name, r.status, f"{r.seconds:.1f}", r.note[:160]] for r in results]))
    print(f"\ntotal {total:.0f} s; everything is in {out_dir} (RESULTS.md row: results-row.md)")
    return 0 if all(r.status in ("ok", "skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
