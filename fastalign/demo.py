"""End-to-end demo on a laptop CPU, offline: build, evaluate, train, evaluate again, generate.

Details: docs/design.md section 7.11.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fastalign.cli import run_main
from fastalign.errors import FastalignError
from fastalign.tiny import FAMILIES

# The model, evaluation and generation modules are imported where used: `python -m fastalign.demo --help`
# does not pay for them.


@dataclass(frozen=True)
class DemoSettings:
    model: dict  # fastalign.tiny.build_tiny_llama keyword arguments
    heldout_records: int
    train_flags: tuple[str, ...]  # fastalign.train flags besides paths and evaluation
    model_max_length: int
    generations: int
    max_new_tokens: int


# Chosen by measurement: enough optimizer steps to lift the held-out ranking metrics well above chance
# in minutes on a CPU (benchmarks/RESULTS.md, "The demo's settings").
FULL = DemoSettings(
    model=dict(vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=172,
               max_position_embeddings=256),
    heldout_records=40,
    train_flags=("--num_train_epochs", "3", "--per_device_train_batch_size", "8", "--learning_rate", "8e-3",
                 "--num_comp", "4", "--logging_steps", "5"),
    model_max_length=256,
    generations=3,
    max_new_tokens=40,
)
QUICK = DemoSettings(
    model=dict(vocab_size=384, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
               max_position_embeddings=128),
    heldout_records=12,
    train_flags=("--max_steps", "6", "--per_device_train_batch_size", "2", "--learning_rate", "5e-3",
                 "--num_comp", "3", "--logging_steps", "2"),
    model_max_length=128,
    generations=1,
    max_new_tokens=8,
)

# --use_peft: adapters on every projection, no dropout; alpha 64 over r 16 (scaling 4) so that the
# adapters move the tiny model within the same steps and learning rate as full training.
LORA_FLAGS = ("--use_peft", "True", "--lora_target_modules", "all-linear", "--lora_r", "16", "--lora_alpha", "64",
              "--lora_dropout", "0")

# Before/after rows of the summary: (metric key, label, format, what the untrained baseline is)
SUMMARY_ROWS = (
    ("pairwise_accuracy", "pairwise accuracy", "{:.3f}", "chance 0.5"),
    ("kendall_tau", "Kendall tau-b", "{:+.3f}", "chance 0"),
    ("top1_accuracy", "top-1 accuracy", "{:.3f}", "is the top-rated response the most likely?"),
    ("top1_chance", "top-1 by chance", "{:.3f}", "mean of 1/responses"),
    ("mean_margin", "margin (nats/token)", "{:+.3f}", "loglik(better) - loglik(worse)"),
    ("mean_loglik", "log-likelihood/token", "{:.3f}", ""),
)


def split_sample(sample: Path, out_dir: Path, heldout: int, seed: int) -> tuple[Path, Path, int]:
    """Write train.jsonl and heldout.jsonl (a seeded random choice of `heldout` lines, file order kept)."""
    lines = [line for line in sample.read_text(encoding="utf-8").splitlines() if line.strip()]
    chosen = set(random.Random(seed).sample(range(len(lines)), heldout))
    train, held = out_dir / "train.jsonl", out_dir / "heldout.jsonl"
    train.write_text("".join(line + "\n" for i, line in enumerate(lines) if i not in chosen), encoding="utf-8")
    held.write_text("".join(line + "\n" for i, line in enumerate(lines) if i in chosen), encoding="utf-8")
    return train, held, len(lines) - heldout


def evaluate_dir(model_dir: Path, records, settings: DemoSettings) -> dict:
    from fastalign.evaluate import evaluate_model
    from fastalign.model_dir import load_tokenizer
    from fastalign.peft_io import load_model

    model = load_model(model_dir)  # an HF model directory, or a LoRA adapter over its base
    return evaluate_model(model, load_tokenizer(model.source_dir), records, model_max_length=settings.model_max_length)


def sample_generations(model_dir: Path, records, settings: DemoSettings) -> list[str]:
    from fastalign.generate import generate
    from fastalign.model_dir import load_tokenizer
    from fastalign.peft_io import load_model

    model = load_model(model_dir)
    tokenizer = load_tokenizer(model.source_dir)
    return [generate(model, tokenizer, r.query, template=False, max_new_tokens=settings.max_new_tokens)
            for r in records[:settings.generations]]


def one_line(text: str, width: int = 110) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[:width - 3] + "..."


def instruction_of(query: str) -> str:
    return query.removeprefix("### Instruction:\n").removesuffix("\n\n### Response:").strip()


def summary_table(before: dict, after: dict) -> str:
    rows = [("", "before", "after", "")]
    for key, label, fmt, note in SUMMARY_ROWS:
        cells = ["-" if m.get(key) is None else fmt.format(m[key]) for m in (before, after)]
        rows.append((label, *cells, note))
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    lines = ["  ".join([r[0].ljust(widths[0]), r[1].rjust(widths[1]), r[2].rjust(widths[2]), r[3]]).rstrip()
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastalign.demo", allow_abbrev=False,
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", type=Path, default=Path("demo_output"),
                   help="Where everything goes. Default ./demo_output.")
    p.add_argument("--quick", action="store_true",
                   help="A seconds-long smoke run (tiny model, 6 steps); no learning to speak of.")
    p.add_argument("--family", choices=FAMILIES, default="llama",
                   help="Model family of the tiny model (fastalign.tiny --family). Default llama.")
    p.add_argument("--use_peft", action="store_true",
                   help="Train LoRA adapters (all-linear, r 16) over the frozen tiny model instead of all its weights.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the model init and the held-out split. Default 0.")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = QUICK if args.quick else FULL
    from fastalign.data import load_records, sample_data_path
    from fastalign.tiny import build_tiny_llama, sandbox_texts

    start = time.perf_counter()
    out = args.output_dir.resolve()
    tiny_dir, trained_dir = out / "tiny-llama", out / "trained"
    out.mkdir(parents=True, exist_ok=True)
    for previous in (tiny_dir, trained_dir):  # a rerun starts fresh (the trainer would resume otherwise)
        shutil.rmtree(previous, ignore_errors=True)

    def stage(number: int, text: str) -> None:
        print(f"\n[{number}/6 {time.perf_counter() - start:5.1f}s] {text}", flush=True)

    sample = sample_data_path()
    stage(1, f"building a tiny random {args.family} model + byte-level BPE tokenizer (trained on {sample.name}) "
             f"in {tiny_dir}")
    build_tiny_llama(tiny_dir, sandbox_texts(sample), seed=args.seed, family=args.family, **settings.model)
    from fastalign.hf_config import LlamaConfig

    print(f"    {LlamaConfig.from_pretrained(tiny_dir).num_parameters():,} parameters: {settings.model}")

    stage(2, "splitting the bundled sample into training and held-out records")
    train_file, heldout_file, num_train = split_sample(sample, out, settings.heldout_records, args.seed)
    heldout = load_records(heldout_file).records
    print(f"    {num_train} training records -> {train_file}\n    {len(heldout)} held-out records -> {heldout_file}")

    stage(3, "held-out ranking metrics BEFORE training (does the model prefer the higher-rated responses?)")
    before = evaluate_dir(tiny_dir, heldout, settings)
    print(f"    pairwise accuracy {before['metrics']['pairwise_accuracy']:.3f} over "
          f"{before['metrics']['num_pairs']} response pairs")
    generations_before = sample_generations(tiny_dir, heldout, settings)

    command = [sys.executable, "-m", "fastalign.train",
               "--model_name_or_path", str(tiny_dir), "--data_path", str(train_file), "--output_dir", str(trained_dir),
               "--bf16", "False", "--tf32", "False", "--gradient_accumulation_steps", "1",
               "--evaluation_strategy", "epoch", "--eval_data_path", str(heldout_file),
               "--per_device_eval_batch_size", "8", "--save_strategy", "epoch", "--save_total_limit", "1",
               "--weight_decay", "0.", "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine",
               "--model_max_length", str(settings.model_max_length), "--rating_scale", "7", "--margin", "1",
               "--max_flow", "False", "--ratio", "0.2", "--seed", str(args.seed), *settings.train_flags,
               *(LORA_FLAGS if args.use_peft else ())]
    shown = shlex.join(["python", *command[1:]]).replace(str(out) + "/", "")
    stage(4, f"training with the fastalign trainer's command line (paths relative to {out}):\n    {shown}")
    train_start = time.perf_counter()
    proc = subprocess.run(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        raise FastalignError(f"training failed (exit status {proc.returncode}); its messages are above")
    train_seconds = time.perf_counter() - train_start

    stage(5, "held-out ranking metrics AFTER training")
    after = evaluate_dir(trained_dir, heldout, settings)

    stage(6, f"greedy generations for {settings.generations} held-out questions (before -> after training)")
    print("    (a model this small, trained for minutes, writes word salad at best: the ranking metrics are the point)")
    generations_after = sample_generations(trained_dir, heldout, settings)
    for record, old, new in zip(heldout, generations_before, generations_after):
        best = max(range(len(record.scores)), key=lambda i: (record.scores[i], -i))
        print(f"\n  Q: {one_line(instruction_of(record.query))}")
        print(f"     top-rated reference ({record.scores[best]:g}/7): {one_line(record.responses[best])}")
        print(f"     before: {one_line(old)}")
        print(f"     after:  {one_line(new)}")

    total = time.perf_counter() - start
    results = {"settings": {"quick": args.quick, "seed": args.seed, "family": args.family, "model": settings.model,
                            "train_command": command},
               "before": before["metrics"], "after": after["metrics"],
               "before_by_category": before["by_category"], "after_by_category": after["by_category"],
               "generations": [{"query": r.query, "before": b, "after": a}
                               for r, b, a in zip(heldout, generations_before, generations_after)],
               "train_seconds": round(train_seconds, 1), "total_seconds": round(total, 1)}
    (out / "demo_results.json").write_text(json.dumps(results, indent=1) + "\n")

    print(f"\n=== held-out results: {len(heldout)} records, {after['metrics']['num_pairs']} rated pairs "
          f"(ties excluded) ===")
    print(summary_table(before["metrics"], after["metrics"]))
    print(f"\ntraining took {train_seconds:.0f}s; the whole demo {total:.0f}s")
    print(f"trained {'LoRA adapter (PEFT layout)' if args.use_peft else 'model (HF layout, loads in transformers)'}: "
          f"{trained_dir}")
    print(f"training metrics: {trained_dir / 'metrics.jsonl'}   plot them: python -m fastalign.plot {trained_dir}")
    print(f"demo results (metrics before/after, generations): {out / 'demo_results.json'}")
    print(f"evaluate again: python -m fastalign.evaluate --model_name_or_path {trained_dir} "
          f"--data_path {heldout_file}")
    print(f"talk to it:     python -m fastalign.generate --model_name_or_path {trained_dir} "
          f"--prompt \"How can I sleep better?\"")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
