"""`make gpu-check`: everything that needs CUDA, in one command, for a lent GPU machine.

    PYTHONPATH=. python benchmarks/gpu_check.py [--budget_s 530] [--out_dir DIR]

No network and no install: it runs from the source tree with the machine's python (which must
have torch, triton, transformers, safetensors, numpy and pytest). Stages, each with its own
timeout inside an overall budget (default 530 s, under 9 minutes); a stage that fails or times out
is recorded and the next one still runs:

  1. environment   GPU name, memory, capability, driver (nvidia-smi), torch / CUDA / triton /
                   transformers versions, flash-attn if installed
  2. pytest        `pytest -m gpu -x` (the CUDA tests: Triton kernels, model, FSDP on GPU)
  3. loss_head     `benchmarks/loss_head.py --preset gpu` (fused loss head vs full logits)
  4. train_gpu-1b  `benchmarks/train_throughput.py --preset gpu-1b --plot` (fastalign vs baseline)
  5. train_gpu-7b-layers   the same for 4 layers of Llama-7B's shape, when time and GPU memory
                   (60 GiB) are left

Everything lands in one folder, benchmarks/results/gpu-check-<date>-<gpu>/: one `<stage>.log`
per stage (stdout + stderr), the JSON (and PNG) each benchmark wrote, `pytest.xml` (JUnit),
`environment.json` and `summary.json`. A summary table is printed at the end; the exit status is
0 when no stage failed or timed out (a stage skipped for lack of time or GPU memory is listed as
skipped).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    REPO_ROOT, RESULTS_DIR, format_table, machine_info, slug, utc_date, write_json)


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
    note: str = ""


def stages(python: str, out_dir: Path) -> list[Stage]:
    bench = REPO_ROOT / "benchmarks"
    return [
        Stage("pytest", [python, "-m", "pytest", "-m", "gpu", "-x", "-q", "-p", "no:cacheprovider",
                         f"--junitxml={out_dir / 'pytest.xml'}", "tests"], max_s=180),
        Stage("loss_head", [python, str(bench / "loss_head.py"), "--preset", "gpu"], max_s=120, min_s=30,
              writes_results=True),
        Stage("train_gpu-1b", [python, str(bench / "train_throughput.py"), "--preset", "gpu-1b", "--plot"],
              max_s=220, min_s=90, writes_results=True, min_gpu_gib=44),  # 2 processes x ~20 GiB
        Stage("train_gpu-7b-layers", [python, str(bench / "train_throughput.py"), "--preset", "gpu-7b-layers",
                                      "--plot"], max_s=200, min_s=100, writes_results=True,
              min_gpu_gib=60),  # two processes, each ~17 GiB of fp32 weights, grads and AdamW + activations
    ]


def environment(out_dir: Path) -> StageResult:
    start = time.perf_counter()
    import torch

    info: dict = {"cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info.update(machine_info("cuda"))
    else:
        info.update(machine_info("cpu"))
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            info["nvidia_smi"] = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                                                 "--format=csv,noheader"], capture_output=True, text=True,
                                                timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as err:
            info["nvidia_smi"] = f"failed: {err}"
    write_json(out_dir / "environment.json", info)
    lines = [f"{k}: {v}" for k, v in info.items()]
    print("\n".join("  " + line for line in lines), flush=True)
    status = "ok" if info["cuda_available"] else "failed"
    return StageResult("environment", status, time.perf_counter() - start, outputs=["environment.json"],
                       note="" if info["cuda_available"] else "no CUDA device visible to torch")


def run_stage(stage: Stage, out_dir: Path, timeout_s: float, env: dict[str, str]) -> StageResult:
    start_wall = time.time()
    start = time.perf_counter()
    argv = list(stage.argv)
    if stage.writes_results:
        argv += ["--out_dir", str(out_dir)]
    log_path = out_dir / f"{stage.name}.log"
    print(f"\n=== {stage.name} (timeout {timeout_s:.0f} s): {' '.join(argv)}", flush=True)
    with open(log_path, "w") as log:
        # Own process group, so a timeout ends the stage's children (e.g. benchmark workers) too.
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                cwd=REPO_ROOT, start_new_session=True)

        def copy_output() -> None:  # to the log and the console, line by line
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                log.flush()
                sys.stdout.write(line)
                sys.stdout.flush()

        reader = threading.Thread(target=copy_output, daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(timeout=10)
    seconds = time.perf_counter() - start
    outputs = [log_path.name]
    if stage.writes_results:
        outputs += sorted(p.name for p in out_dir.iterdir() if p.is_file() and p.stat().st_mtime >= start_wall
                          and p.name != log_path.name)
    if timed_out:
        return StageResult(stage.name, "timeout", seconds, None, log_path.name, outputs, f"killed after {timeout_s:.0f} s")
    rc = proc.returncode
    note = "no tests selected" if stage.name == "pytest" and rc == 5 else ""
    status = "ok" if rc == 0 or note else "failed"
    return StageResult(stage.name, status, seconds, rc, log_path.name, outputs, note)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget_s", type=float, default=530.0, help="overall time budget in seconds")
    parser.add_argument("--out_dir", type=Path, default=None,
                        help="default: benchmarks/results/gpu-check-<date>-<gpu>/")
    parser.add_argument("--only", nargs="*", default=None, help="run only these stages (names as in the summary)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()

    import torch

    gpu = slug(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else "no-gpu"
    out_dir = args.out_dir or RESULTS_DIR / f"gpu-check-{utc_date()}-{gpu}"
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
        results.append(run_stage(stage, out_dir, min(stage.max_s, left), env))

    total = time.perf_counter() - t0
    write_json(out_dir / "summary.json", {"out_dir": str(out_dir), "total_s": total, "budget_s": args.budget_s,
                                          "stages": [asdict(r) for r in results]})
    print("\n" + format_table(["stage", "status", "seconds", "note", "outputs"],
                              [[r.name, r.status, f"{r.seconds:.1f}", r.note, ", ".join(r.outputs)] for r in results]))
    print(f"\ntotal {total:.0f} s; everything is in {out_dir}")
    return 0 if all(r.status in ("ok", "skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
