"""Training throughput and memory: fastalign's optimizer step against the original approach.

    python benchmarks/train_throughput.py --preset cpu-tiny [--plot]
    PYTHONPATH=. python benchmarks/train_throughput.py --preset gpu-1b --plot      (CUDA)
    ... --preset gpu-1b --build_model_dir DIR, then --model_dir DIR: build the checkpoint once, share it

Both sides load the same HF Llama checkpoint (random weights of the preset's shape, tokenizer
trained on the data; built in a temp dir) and train on the same optimizer steps: the same groups
(queries), the same sampled candidates, the same token ids (fastalign.data's GroupBatcher with
batch_size 1 and gradient_accumulation_steps = the preset's groups per step, as the original ran).

- baseline: benchmarks/baseline_original.py, one group per padded micro-batch, full logits + HF's
  own loss, per-response cross-entropy loop (the original `train_alignment.py` step);
- fastalign: the trainer's own step (`fastalign.trainer.Trainer`, set up as `python -m fastalign.train`
  would: the plain module in one fp32 process, FSDP2 under bf16 on CUDA; packed varlen
  Llama, streaming loss head, fused AdamW) on the same flags (per_device_train_batch_size 1,
  gradient_accumulation_steps 8), so its step-level packing cuts the step's groups into
  micro-batches of at most `max_tokens_per_batch` tokens (the preset states the budget) and the
  shared prefix runs each query once (`--share_prefix True`, the default);
- fastalign_unshared: the same with `--share_prefix False` (query + response per response), so
  the two levers' shares of the speed-up can be told apart.
Both use the published command's objective flags (rating_scale 7, margin 1, max_flow False,
ratio 0.2, passed explicitly to both), lr 2e-5, weight decay 0, gradient clipping at 1.0, on CPU
`--threads` threads per side (default 1: only one side computes at a time, and on a shared
machine multi-threaded timings suffer most from other users' load), `margin_mode=seed` (the
original's margin indexing; speed is the same in either mode), fp32 on CPU, bf16 autocast/mixed precision
with fp32 master weights on CUDA.

Method. Each side runs in its own child process (benchmarks.lib.workers.Worker), so its peak memory is
its own, over the measured steps: CUDA max_memory_allocated, or on CPU the peak RSS above the RSS
after imports and data preparation (weights, gradients, optimizer state and activations count;
load-time transients do not; see benchmarks/lib/memory.py). The parent first
checks that both sides compute the same loss on the first step's groups, then runs warm-up steps,
then alternates one optimizer step of A and one of B (A B A B ...); each child times its own step
(device synchronised) and the parent collects the times, so load changes on a shared machine hit
both sides alike. Reported per side: real tokens/s (query+response tokens of the step, padding not
counted, divided by the step's time; total over measured steps; also the median of the per-round
ratios and, on CPU, the ratio of process CPU seconds, both robust to other load on a shared
machine), median step time, peak memory,
MFU on CUDA (fastalign.hf_config.LlamaConfig.flops_per_token on real tokens over the peak dense bf16
FLOP/s in fastalign.hardware.GPUS), and the ratios fastalign / baseline.
A benchmark never asserts a time. JSON goes to benchmarks/results/train_throughput-<date>-<device>-
<preset>.json (and a PNG with --plot).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.lib.inputs import lengthened_records, realignment_records
from benchmarks.lib.machine import machine_summary, mfu
from benchmarks.lib.memory import PeakMemory
from benchmarks.lib.presets import TRAIN_PRESETS, TrainPreset
from benchmarks.lib.results import result_header, results_path, write_json
from benchmarks.lib.tables import fmt_bytes, format_table
from benchmarks.lib.timing import median, summarize_times, timed
from benchmarks.lib.workers import Worker, error_line, serve
from fastalign.errors import FastalignError

SIDES = ("baseline", "fastalign", "fastalign_unshared")
SHARE_PREFIX = {"fastalign": True, "fastalign_unshared": False}
LEARNING_RATE = 2e-5  # the original command's value; the same on both sides
MARGIN_MODE = "seed"  # the original's margin indexing, so both sides compute the same number


def objective():
    """The objective's flags, one set for both sides: the published command's values
    (rating_scale 7, margin 1, max_flow False, ratio 0.2) and the seed's margin indexing."""
    from benchmarks.baseline_original import AlignmentArgs

    return AlignmentArgs(margin_mode=MARGIN_MODE)


# ----------------------------------------------------------------------------- the shared steps


def shared_steps(spec: dict[str, Any]) -> list[list[Any]]:
    """The optimizer steps of the run, as lists of one-group PackedBatches (see original_steps)."""
    from benchmarks.baseline_original import original_steps

    preset = TRAIN_PRESETS[spec["preset"]]
    return original_steps(Path(spec["model_dir"]), Path(spec["data_path"]), preset, spec["num_steps"],
                          seed=spec["seed"])


def unpack_group(batch) -> Any:
    """The TokenizedGroup (query ids, sampled responses, scores) in a one-group PackedBatch."""
    from fastalign.data import TokenizedGroup

    bounds = batch.cu_seqlens.tolist()
    ids = batch.input_ids.tolist()
    # targets[t] != -100 from the last query token on: the query is everything up to there.
    query_len = int((batch.targets[bounds[0]:bounds[1]] != -100).nonzero()[0]) + 1
    return TokenizedGroup(record_index=batch.record_indices[0], query_ids=ids[bounds[0]:bounds[0] + query_len],
                          response_ids=[ids[a + query_len:b] for a, b in zip(bounds[:-1], bounds[1:])],
                          scores=batch.scores.tolist())


def fastalign_step(groups_batches: list[Any], max_tokens_per_batch: int, share_prefix: bool = True):
    """The same groups as one fastalign OptimizerStep, as the trainer plans it for batch size 1 and
    one accumulation step per group: step-level packing by the token budget, in either layout."""
    from fastalign.data import STAT_KEYS, GroupBatcher, TokenizedData

    groups = [unpack_group(b) for b in groups_batches]
    batcher = GroupBatcher(TokenizedData(groups=groups, stats=dict.fromkeys(STAT_KEYS, 0)), num_comp=None, seed=0,
                           batch_size=1, step_token_budget=max_tokens_per_batch, share_prefix=share_prefix,
                           gradient_accumulation_steps=len(groups), shuffle=False)
    (step,) = list(batcher.iter_steps(0))
    return step


# ----------------------------------------------------------------------------- the two sides


class BaselineSide:
    def __init__(self, spec: dict[str, Any], device, steps):
        from benchmarks.baseline_original import BaselineTrainer, pad_group

        self.device = device
        self.steps = [[pad_group(b) for b in step] for step in steps]
        self.memory = PeakMemory(device).start()
        self.trainer = BaselineTrainer(spec["model_dir"], device, precision=spec["precision"], args=objective(),
                                       learning_rate=LEARNING_RATE)

    def first_step_loss(self) -> float:
        groups = self.steps[0]
        return sum(self.trainer.group_loss(g) for g in groups) / len(groups)

    def step(self, i: int) -> None:
        self.trainer.step(self.steps[i])

    def layout(self, i: int) -> dict[str, Any]:
        step = self.steps[i]
        return {"micro_batches": len(step), "padded_tokens": sum(g.input_ids.numel() for g in step)}


class FastalignSide:
    def __init__(self, spec: dict[str, Any], device, steps, share_prefix: bool):
        import torch

        from fastalign import distributed as fdist
        from fastalign.alignment_model import run_batch
        from fastalign.config import parse_args
        from fastalign.metrics import Window
        from fastalign.trainer import Trainer

        preset = TRAIN_PRESETS[spec["preset"]]
        goal = objective()
        self.steps = [fastalign_step(step, spec["max_tokens_per_batch"], share_prefix) for step in steps]
        self.memory = PeakMemory(device).start()
        self.run_batch, self.Window = run_batch, Window
        # The published command's `--fsdp full_shard auto_wrap`; the trainer applies FSDP2 only where
        # it has something to do (several processes, bf16, offload), as it does for a user.
        args = parse_args([
            "--model_name_or_path", spec["model_dir"], "--data_path", spec["data_path"],
            "--output_dir", spec["output_dir"], "--bf16", str(spec["precision"] == "bf16"), "--tf32", "True",
            "--learning_rate", str(LEARNING_RATE), "--weight_decay", "0", "--max_grad_norm", "1.0",
            "--model_max_length", str(preset.model_max_length), "--num_comp", str(preset.num_comp),
            "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", str(len(steps[0])),
            "--max_tokens_per_batch", str(spec["max_tokens_per_batch"]), "--share_prefix", str(share_prefix),
            "--fsdp", "full_shard auto_wrap",
            "--rating_scale", str(goal.rating_scale), "--margin", str(goal.margin), "--ratio", str(goal.ratio),
            "--max_flow", str(goal.max_flow), "--margin_mode", goal.margin_mode,
            "--save_strategy", "no", "--logging_steps", "1000000",
            "--max_steps", "1000000", "--seed", str(spec["seed"])])
        self.env = fdist.init_distributed()
        if self.env.device.type != torch.device(device).type:
            raise RuntimeError(f"fastalign picked {self.env.device}, the benchmark runs on {device}")
        self.trainer = Trainer(args, self.env)
        self.trainer.setup()

    def first_step_loss(self) -> float:
        import torch

        step = self.steps[0]
        with torch.no_grad():
            total = sum(float(self.run_batch(self.trainer.model, b.to(self.env.device))["loss"]) * b.num_groups
                        for b in step.micro_batches)
        return total / step.global_groups

    def step(self, i: int) -> None:
        # The trainer's own optimizer step (forward/backward per micro-batch, clip, AdamW).
        self.trainer._train_step(self.steps[i], self.Window.new(self.env.device))

    def layout(self, i: int) -> dict[str, Any]:
        step = self.steps[i]
        return {"micro_batches": len(step.micro_batches),
                "padded_tokens": sum(b.num_tokens for b in step.micro_batches),
                "computed_tokens": sum(b.computed_tokens for b in step.micro_batches if b.num_groups)}


def worker_main(side: str, spec: dict[str, Any]) -> int:
    """Child process: build one side, then serve `loss`, `step`, `layout`, `memory` commands."""
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401  both sides import the same before start()

    import fastalign.train  # noqa: F401

    torch.manual_seed(spec["seed"])
    device = torch.device(spec["device"])
    if device.type == "cpu":
        torch.set_num_threads(spec["threads"])
    steps = shared_steps(spec)
    impl = BaselineSide(spec, device, steps) if side == "baseline" else FastalignSide(spec, device, steps,
                                                                                       SHARE_PREFIX[side])

    def step(i: int) -> dict[str, Any]:
        cpu_start = time.process_time()
        _, seconds = timed(lambda: impl.step(i), device)
        return {"seconds": seconds, "cpu_seconds": time.process_time() - cpu_start}

    return serve({
        "loss": lambda: {"loss": impl.first_step_loss()},
        "step": step,
        "layout": lambda i: impl.layout(i),
        "reset_memory": lambda: {"ok": bool(impl.memory.reset_peak())},
        "memory": lambda: {"peak_bytes": impl.memory.peak_bytes(), "method": impl.memory.describe()},
    })


# ----------------------------------------------------------------------------- the parent


def run(preset: TrainPreset, *, data_path: Path, model_dir: Path | None, device: str, warmup: int, measure: int,
        seed: int, threads: int, work_dir: Path) -> dict[str, Any]:
    from benchmarks.baseline_original import build_benchmark_dir
    from fastalign.hf_config import LlamaConfig

    precision = preset.precision if device == "cuda" else "fp32"
    built = model_dir is None
    if built:
        started = time.perf_counter()
        model_dir = build_benchmark_dir(preset, data_path, work_dir / "model", seed=seed)
        print(f"built a random {preset.name} checkpoint in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    spec = {"preset": preset.name, "max_tokens_per_batch": preset.max_tokens_per_batch,
            "model_dir": str(model_dir), "data_path": str(data_path), "seed": seed, "threads": threads,
            "num_steps": warmup + measure, "device": device, "precision": precision,
            "output_dir": str(work_dir / "fastalign-out")}
    steps = shared_steps(spec)
    seq_lens = [[int(n) for n in (b.cu_seqlens[1:] - b.cu_seqlens[:-1])] for b in sum(steps[warmup:], [])]
    real_tokens = [sum(b.num_tokens for b in step) for step in steps]
    config = LlamaConfig.from_pretrained(model_dir)
    flops = sum(config.flops_per_token(n) * n for seqs in seq_lens for n in seqs)  # measured steps, real tokens

    workers = {}
    try:
        for side in SIDES:  # both alive at once: each holds its own model; only one computes at a time
            env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if device == "cpu" else None
            workers[side] = Worker([str(Path(__file__).resolve()), "--worker", side, "--spec", json.dumps(spec)],
                                   env=env).start()
        losses = {side: w.call("loss")["loss"] for side, w in workers.items()}
        layouts = {side: w.call("layout", i=warmup) for side, w in workers.items()}
        times: dict[str, list[float]] = {side: [] for side in SIDES}
        cpu_times: dict[str, list[float]] = {side: [] for side in SIDES}
        for i in range(warmup + measure):
            if i == warmup:  # steady state from here: AdamW state exists, allocators are warm
                for w in workers.values():
                    w.call("reset_memory")
            for side in SIDES:  # A B A B ...
                reply = workers[side].call("step", i=i)
                if i >= warmup:
                    times[side].append(reply["seconds"])
                    cpu_times[side].append(reply["cpu_seconds"])
            print(f"step {i + 1}/{warmup + measure}{' (warm-up)' if i < warmup else ''}: "
                  + ", ".join(f"{s} {t[-1]:.3f} s" for s, t in times.items() if i >= warmup), file=sys.stderr)
        memory = {side: w.call("memory") for side, w in workers.items()}
    finally:
        for w in workers.values():
            w.close()

    measured_tokens = sum(real_tokens[warmup:])
    sides: dict[str, Any] = {}
    for side in SIDES:
        total_s = sum(times[side])
        sides[side] = {
            "tokens_per_s": measured_tokens / total_s,
            "step_time": summarize_times(times[side]),
            "step_times_s": times[side],
            "step_cpu_times_s": cpu_times[side],
            "peak_memory_bytes": memory[side]["peak_bytes"],
            "memory_method": memory[side]["method"],
            "mfu": mfu(flops / total_s, device),
            "first_step_loss": losses[side],
            "layout_first_measured_step": layouts[side],
        }

    def ratios(side: str) -> dict[str, Any]:
        base, fast = sides["baseline"], sides[side]
        # Per-round ratios: both steps of a round train the same groups back to back, so load changes
        # on a shared machine cancel out better than in the totals.
        paired = sorted(tb / tf for tb, tf in zip(times["baseline"], times[side]))
        return {
            "tokens_per_s": fast["tokens_per_s"] / base["tokens_per_s"],
            "tokens_per_s_paired_median": median(paired),
            "tokens_per_s_paired_range": [paired[0], paired[-1]],
            # CPU seconds of the side's process (all threads): what the step costs, whatever else the
            # machine runs; meaningful on CPU, where wall times suffer from other users' load.
            "cpu_time": sum(cpu_times[side]) / sum(cpu_times["baseline"]),
            "step_time": fast["step_time"]["median_s"] / base["step_time"]["median_s"],
            "peak_memory": fast["peak_memory_bytes"] / base["peak_memory_bytes"],
        }

    return {
        "precision": precision,
        "model": {"built_from_preset": built, **preset.model,
                  "parameters": config.num_parameters(), "tokenizer_vocab_asked": preset.tokenizer_vocab},
        "schedule": {"warmup_steps": warmup, "measured_steps": measure, "groups_per_step": preset.groups_per_step,
                     "num_comp": preset.num_comp, "model_max_length": preset.model_max_length,
                     "fastalign_max_tokens_per_batch": preset.max_tokens_per_batch, "order": "A B A B (baseline first)",
                     "cpu_threads_per_side": threads if device == "cpu" else None},
        "data_path": str(data_path),
        "method": {
            "processes": "each side in its own child process (benchmarks.lib.workers.Worker); both alive, "
                         "one computes at a time",
            "timing": "after warm-up, one optimizer step of each side in turn (A B A B ...); each child times its "
                      "own step with the device synchronised and reports it to the parent",
            "tokens": "real tokens: query+response tokens of the step's sequences, padding not counted; "
                      "tokens/s = measured tokens / summed step times",
            "memory": "peak over the measured steps: CUDA max_memory_allocated; CPU VmHWM minus the RSS after "
                      "imports and data preparation (see memory_method per side)",
            "mfu": "fastalign.hf_config.LlamaConfig.flops_per_token on real tokens / step time / peak bf16 FLOP/s "
                   "(fastalign.hardware.GPUS); CPU: none",
        },
        "real_tokens_per_step": real_tokens[warmup:],
        "model_flops_measured": flops,
        "objective_check": {**losses, "abs_diff": max(abs(losses["baseline"] - losses[side]) for side in SHARE_PREFIX)},
        "sides": sides,
        "load_avg_1m_at_end": os.getloadavg()[0],
        "ratios": ratios("fastalign"),  # the default: shared prefix + step-level packing
        "ratios_unshared": ratios("fastalign_unshared"),  # step-level packing alone
    }


def print_report(result: dict[str, Any]) -> None:
    rows = []
    for side in SIDES:
        s = result["sides"][side]
        rows.append([side, f"{s['tokens_per_s']:.0f}", f"{s['step_time']['median_s']:.3f} s",
                     fmt_bytes(s["peak_memory_bytes"]), "-" if s["mfu"] is None else f"{100 * s['mfu']:.1f}%",
                     s["layout_first_measured_step"]["micro_batches"], f"{s['first_step_loss']:.5f}"])
    for label, r in (("fastalign/baseline", result["ratios"]),
                     ("fastalign_unshared/baseline", result["ratios_unshared"])):
        rows.append([label, f"{r['tokens_per_s']:.2f}x", f"{r['step_time']:.2f}x", f"{r['peak_memory']:.2f}x",
                     "", "", ""])
        rows.append(["  per-round median", f"{r['tokens_per_s_paired_median']:.2f}x", "", "", "", "", ""])
        if result["machine"]["device"] == "cpu":
            rows.append(["  by process CPU time", f"{1 / r['cpu_time']:.2f}x", f"{r['cpu_time']:.2f}x", "", "", "", ""])
    print(f"\n{result['preset']} on {machine_summary(result['machine'])}, {result['precision']}")
    print(format_table(["side", "real tokens/s", "step time (median)", "peak memory", "MFU", "micro-batches/step",
                        "first-step loss"], rows))


def plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tok, ax_mem) = plt.subplots(1, 2, figsize=(9, 3.6))
    colors = ["#999999", "#1f77b4", "#aec7e8"]
    tok = [result["sides"][s]["tokens_per_s"] for s in SIDES]
    mem = [result["sides"][s]["peak_memory_bytes"] / 2**20 for s in SIDES]
    for ax, values, title in ((ax_tok, tok, "real tokens/s (higher is better)"),
                              (ax_mem, mem, "peak memory, MiB (lower is better)")):
        bars = ax.bar(SIDES, values, color=colors)
        ax.bar_label(bars, fmt="%.0f")
        ax.margins(y=0.15)
        ax.set_title(title, fontsize=10)
    r = result["ratios"]
    fig.suptitle(f"{result['preset']} ({machine_summary(result['machine'])}): "
                 f"{r['tokens_per_s']:.2f}x tokens/s, {r['peak_memory']:.2f}x memory", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu-tiny", choices=sorted(TRAIN_PRESETS))
    parser.add_argument("--data_path", type=Path, default=None, help="Sandbox records (default: bundled sample)")
    parser.add_argument("--model_dir", type=Path, default=None, help="HF Llama dir with tokenizer (default: random "
                        "weights of the preset's shape)")
    parser.add_argument("--build_model_dir", type=Path, default=None,
                        help="only build the preset's checkpoint (random weights + tokenizer) into this folder "
                             "and exit: several runs (gpu_check's stages) then share it with --model_dir")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps per side (default: the preset's)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per side (default: the preset's)")
    parser.add_argument("--max_tokens_per_batch", type=int, default=None,
                        help="fastalign's micro-batch token budget (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads per side (default 1: on a machine shared with other work, OpenMP "
                             "barriers make multi-threaded timings erratic; one side runs at a time)")
    parser.add_argument("--out_dir", type=Path, default=None, help="where the JSON/PNG go (default benchmarks/results)")
    parser.add_argument("--plot", action="store_true", help="also write a PNG of tokens/s and memory bars")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker, json.loads(args.spec))

    import torch

    from benchmarks.baseline_original import default_data_path

    preset = TRAIN_PRESETS[args.preset]
    if args.max_tokens_per_batch is not None:
        preset = dataclasses.replace(preset, max_tokens_per_batch=args.max_tokens_per_batch)
    if preset.device == "cuda" and not torch.cuda.is_available():
        print(f"error: --preset {preset.name} needs a CUDA device", file=sys.stderr)
        return 2
    device = preset.device
    data_path = (args.data_path or default_data_path()).resolve()
    if args.build_model_dir is not None:
        from benchmarks.baseline_original import build_benchmark_dir

        started = time.perf_counter()
        build_benchmark_dir(preset, data_path, args.build_model_dir, seed=args.seed)
        print(f"built a random {preset.name} checkpoint in {args.build_model_dir} in "
              f"{time.perf_counter() - started:.0f} s")
        return 0
    load_at_start = os.getloadavg()[0]  # other work on a shared machine: read the times with it
    with tempfile.TemporaryDirectory(prefix="fa-throughput-") as tmp:
        if preset.min_response_chars:
            data_path = lengthened_records(data_path, Path(tmp) / "lengthened.jsonl", preset.min_response_chars)
        if preset.realignment_queries:
            data_path = realignment_records(data_path, Path(tmp) / "realignment.jsonl")
        try:
            result = run(preset, data_path=data_path, model_dir=args.model_dir, device=device,
                         warmup=preset.warmup_steps if args.warmup is None else args.warmup,
                         measure=preset.measure_steps if args.steps is None else args.steps, seed=args.seed,
                         threads=args.threads, work_dir=Path(tmp))
        except RuntimeError as err:  # a side's worker failed: its traceback, then one line that names it
            print(err, file=sys.stderr)
            raise FastalignError(f"train_throughput --preset {preset.name}: a side failed: "
                                 f"{error_line(str(err))}") from None
    result = {**result_header("train_throughput", preset.name, device), "load_avg_1m_at_start": load_at_start,
              "note": preset.note, **result}
    # A non-default token budget gets its own file, so it never overwrites the preset's figures.
    label = preset.name if args.max_tokens_per_batch is None else f"{preset.name}-mtb{preset.max_tokens_per_batch}"
    path = write_json(results_path("train_throughput", label, device, args.out_dir), result)
    print_report(result)
    print(f"wrote {path}")
    if args.plot:
        try:
            print(f"wrote {plot(result, path.with_suffix('.png'))}")
        except ImportError:  # e.g. a lent GPU machine's image: the JSON has every number
            print("--plot: matplotlib is not installed, no PNG written", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from fastalign.cli import exit_process, run_main

    exit_process(run_main(main))
