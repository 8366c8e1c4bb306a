"""LoRA against full fine-tuning: the same command with and without `--use_peft`, in one run.

    python benchmarks/lora.py --work_dir DIR [--preset cpu-tiny] [--steps 6] [--out_dir DIR]

Each side is `python -m fastalign.train` in its own process (benchmarks/train_modes.py's command:
bundled records, the published objective flags, batch 1 x accumulation 2, fp32 on CPU and bf16 on
CUDA), the full run first, then `--use_peft True --lora_target_modules all-linear` (r 16, alpha 32,
no dropout). Per side: tokens/s (the median of the logged steps after the first) and the peak
memory the trainer logs (peak_mem_gb: RSS on CPU, allocated on CUDA), and the first step's loss,
which must agree (B starts at zero, so the first forward is the base model's). JSON:
benchmarks/results/lora-<date>-<device>-<preset>.json. A benchmark never asserts a time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.lib.presets import TRAIN_PRESETS  # noqa: E402
from benchmarks.lib.results import result_header, results_path, write_json  # noqa: E402
from benchmarks.lib.tables import format_table  # noqa: E402
from benchmarks.train_modes import prepare_model_dir, train  # noqa: E402
from fastalign.errors import FastalignError  # noqa: E402

LORA_FLAGS = ["--use_peft", "True", "--lora_target_modules", "all-linear", "--lora_r", "16", "--lora_alpha", "32",
              "--lora_dropout", "0"]


def summary(run: dict[str, Any]) -> dict[str, Any]:
    steps = run["steps"]
    return {"tokens_per_s": statistics.median(s["tokens_per_s"] for s in steps[1:] or steps),
            "peak_mem_gb": max(s.get("peak_mem_gb") or 0 for s in steps), "first_loss": steps[0]["loss"],
            "seconds": run["seconds"]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work_dir", type=Path, required=True, help="the model and both runs (built when missing)")
    parser.add_argument("--preset", default="cpu-tiny", choices=sorted(TRAIN_PRESETS))
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run (default 6)")
    parser.add_argument("--out_dir", type=Path, default=None, help="where the JSON goes (default benchmarks/results)")
    args = parser.parse_args(argv)

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = device == "cuda"
    preset = TRAIN_PRESETS[args.preset]
    work_dir, model_dir = prepare_model_dir(args.work_dir, preset.name)
    runs = {"full": train("full", work_dir, model_dir, args.steps, bf16, []),
            "lora": train("lora", work_dir, model_dir, args.steps, bf16, LORA_FLAGS)}
    sides = {name: summary(run) for name, run in runs.items()}
    if abs(sides["full"]["first_loss"] - sides["lora"]["first_loss"]) > 1e-4 * max(1.0, sides["full"]["first_loss"]):
        raise FastalignError(f"the first step's loss differs: full {sides['full']['first_loss']:.6f}, "
                             f"lora {sides['lora']['first_loss']:.6f} (the adapters must start at zero)")
    result = {**result_header("lora", preset.name, device), "precision": "bf16" if bf16 else "fp32",
              "model_preset": preset.name, "model": preset.model, "steps": args.steps, "lora_flags": LORA_FLAGS,
              "sides": sides, "runs": runs,
              "ratios": {"tokens_per_s": sides["lora"]["tokens_per_s"] / sides["full"]["tokens_per_s"],
                         "peak_mem": sides["lora"]["peak_mem_gb"] / sides["full"]["peak_mem_gb"]}}
    path = write_json(results_path("lora", preset.name, device, args.out_dir), result)
    rows = [[name, f"{s['tokens_per_s']:.0f}", f"{s['peak_mem_gb']:.3f}", f"{s['first_loss']:.5f}"]
            for name, s in sides.items()]
    print(format_table(["run", "tokens/s", "peak mem GB", "first loss"], rows))
    print(f"lora / full: tokens/s {result['ratios']['tokens_per_s']:.2f}x, peak memory "
          f"{result['ratios']['peak_mem']:.2f}x; wrote {path}")
    return 0


if __name__ == "__main__":
    from fastalign.cli import run_main

    sys.exit(run_main(main))
