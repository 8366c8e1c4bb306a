"""The trainer's optional modes against its eager run: `--compile`, `--fsdp "full_shard offload"`
and `--gradient_checkpointing`, each trained for a few steps and its losses compared step by step.

    PYTHONPATH=. python benchmarks/train_modes.py --mode compile --work_dir DIR [--out_dir DIR]
    python benchmarks/train_modes.py --mode checkpointing --preset cpu-smoke --work_dir DIR   (CPU)

Each run is the user's command, `python -m fastalign.train` in one process (a one-rank group), on
the bundled records with the published objective flags, per_device_train_batch_size 1 and
gradient_accumulation_steps 2 (so each step's token count varies with its groups), --logging_steps
1, no checkpoints; bf16 on CUDA, fp32 on CPU. The model is the preset's shape with random weights
(fastalign.tiny tokenizer), built once into --work_dir; the eager run is made once there too, so
gpu_check's three mode stages share both. Per mode: each step's loss against the eager run's
(the same groups in the same order: the same seed), the run's seconds and peak memory (its
metrics.jsonl), the token counts per step; for compile, the recompiles torch logged
(TORCH_LOGS=recompiles: "Recompiling function" lines), reported, not judged.
Exit status 0 when the mode trained and its losses agree with eager within the tolerance; else
an `error:` line and exit status 2. JSON: benchmarks/results/train_modes-<date>-<device>-<mode>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.lib.paths import REPO_ROOT
from benchmarks.lib.presets import TRAIN_PRESETS
from benchmarks.lib.results import result_header, results_path, write_json
from benchmarks.lib.tables import format_table
from benchmarks.lib.workers import error_line
from fastalign.errors import FastalignError

MODE_FLAGS = {
    "compile": ["--compile", "True"],
    "offload": ["--fsdp", "full_shard offload"],
    "checkpointing": ["--gradient_checkpointing", "True"],
}
NEEDS_CUDA = {"offload": "--fsdp offload keeps parameter shards in host memory for a CUDA device"}
# |loss - eager loss| <= RTOL * max(1, |eager loss|) at every step. fp32: only summation order
# differs. bf16: compiled kernels fuse and round differently, offload runs AdamW on the host.
RTOL = {"fp32": 1e-4, "bf16": 2e-2}
_RECOMPILE = re.compile(r"Recompiling function (\S+)")


def train_command(model_dir: Path, output_dir: Path, steps: int, bf16: bool, flags: list[str]) -> list[str]:
    from fastalign.data import sample_data_path

    return [sys.executable, "-m", "fastalign.train", "--model_name_or_path", str(model_dir),
            "--data_path", str(sample_data_path()), "--output_dir", str(output_dir), "--bf16", str(bf16),
            "--num_comp", "3", "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2",
            "--max_steps", str(steps), "--logging_steps", "1", "--save_strategy", "no", "--seed", "0",
            "--learning_rate", "2e-5", "--rating_scale", "7", "--margin", "1", "--ratio", "0.2",
            "--max_flow", "False", "--disable_tqdm", "True", "--overwrite_output_dir", "True", *flags]


def train(name: str, work_dir: Path, model_dir: Path, steps: int, bf16: bool, flags: list[str]) -> dict[str, Any]:
    """One training run in its own process; its metrics lines, seconds and log."""
    output_dir = work_dir / name
    log_path = work_dir / f"{name}.log"
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    if name == "compile":
        env["TORCH_LOGS"] = "recompiles"
    argv = train_command(model_dir, output_dir, steps, bf16, flags)
    print(f"{name}: {' '.join(argv[1:])}", flush=True)
    started = time.perf_counter()
    with open(log_path, "w") as log:
        status = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env).returncode
    seconds = time.perf_counter() - started
    text = log_path.read_text(errors="replace")
    if status != 0:
        sys.stderr.write(text[-4000:])
        raise FastalignError(f"the {name} run ({' '.join(flags) or 'eager'}) exited {status}: {error_line(text)} "
                             f"(log: {log_path})")
    lines = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps_logged = [line for line in lines if "loss" in line]
    return {"flags": flags, "seconds": seconds, "steps": steps_logged, "log": str(log_path),
            "recompiles": _RECOMPILE.findall(text)}


def prepare_model_dir(work_dir: Path, preset_name: str) -> tuple[Path, Path]:
    """(work_dir resolved and created, the preset's model directory in it, built from the bundled data
    when missing): the model every run of a work dir shares."""
    from benchmarks.baseline_original import build_benchmark_dir, default_data_path

    work_dir = work_dir.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    preset = TRAIN_PRESETS[preset_name]
    model_dir = work_dir / f"model-{preset.name}"
    if not (model_dir / "config.json").is_file():
        build_benchmark_dir(preset, default_data_path(), model_dir)
    return work_dir, model_dir


def eager_run(work_dir: Path, model_dir: Path, steps: int, bf16: bool) -> dict[str, Any]:
    """The eager run, made once per work_dir (the three mode stages share it)."""
    cached = work_dir / "eager.json"
    if cached.is_file():
        run = json.loads(cached.read_text())
        if len(run["steps"]) == steps and run["bf16"] == bf16:
            return run
    run = {**train("eager", work_dir, model_dir, steps, bf16, []), "bf16": bf16}
    write_json(cached, run)
    return run


def compare(eager: dict[str, Any], mode: dict[str, Any], rtol: float) -> dict[str, Any]:
    pairs = list(zip(eager["steps"], mode["steps"]))
    if len(pairs) != len(eager["steps"]) or len(mode["steps"]) != len(eager["steps"]):
        return {"agree": False, "why": f"{len(mode['steps'])} logged steps, eager logged {len(eager['steps'])}"}
    diffs = [abs(m["loss"] - e["loss"]) / max(1.0, abs(e["loss"])) for e, m in pairs]
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    return {"agree": diffs[worst] <= rtol, "rtol": rtol, "max_rel_diff": diffs[worst], "worst_step": worst + 1,
            "why": f"step {worst + 1}: loss {pairs[worst][1]['loss']:.6f} vs eager {pairs[worst][0]['loss']:.6f}"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", required=True, choices=sorted(MODE_FLAGS))
    parser.add_argument("--work_dir", type=Path, required=True,
                        help="the model and the eager run, shared by the modes (built there when missing)")
    parser.add_argument("--preset", default="cpu-tiny", choices=sorted(TRAIN_PRESETS),
                        help="the model's shape (default cpu-tiny: 4 layers, hidden 256, vocab 32000)")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run (default 6)")
    parser.add_argument("--out_dir", type=Path, default=None, help="where the JSON goes (default benchmarks/results)")
    args = parser.parse_args(argv)

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.mode in NEEDS_CUDA and device != "cuda":
        raise FastalignError(f"--mode {args.mode}: needs CUDA ({NEEDS_CUDA[args.mode]}); this machine has none")
    bf16 = device == "cuda"
    precision = "bf16" if bf16 else "fp32"
    preset = TRAIN_PRESETS[args.preset]
    work_dir, model_dir = prepare_model_dir(args.work_dir, preset.name)
    eager = eager_run(work_dir, model_dir, args.steps, bf16)
    run = train(args.mode, work_dir, model_dir, args.steps, bf16, MODE_FLAGS[args.mode])
    verdict = compare(eager, run, RTOL[precision])

    result = {**result_header("train_modes", args.mode, device), "mode": args.mode, "precision": precision,
              "model_preset": preset.name, "model": preset.model, "steps": args.steps, "comparison": verdict,
              "tokens_per_step": [s.get("sequence_tokens") for s in run["steps"]],
              "recompiles": len(run["recompiles"]) if args.mode == "compile" else None,
              "recompiled_functions": sorted(set(run["recompiles"])),
              "runs": {"eager": eager, args.mode: run}}
    path = write_json(results_path("train_modes", args.mode, device, args.out_dir), result)
    rows = [[name, f"{r['seconds']:.1f}", " ".join(f"{s['loss']:.5f}" for s in r["steps"]),
             max((s.get("peak_mem_gb") or 0 for s in r["steps"]), default=None)] for name, r in result["runs"].items()]
    print(format_table(["run", "seconds", "loss per step", "peak mem GB"], rows))
    print(f"tokens per step: {result['tokens_per_step']}")
    if args.mode == "compile":
        print(f"recompiles: {result['recompiles']} ({', '.join(result['recompiled_functions']) or 'none'})")
    print(f"max relative loss difference {verdict.get('max_rel_diff', float('nan')):.2e} "
          f"(tolerance {RTOL[precision]:.0e}); wrote {path}")
    if not verdict["agree"]:
        raise FastalignError(f"--mode {args.mode}: the loss differs from the eager run's: {verdict['why']}")
    return 0


if __name__ == "__main__":
    from fastalign.cli import run_main

    sys.exit(run_main(main))
