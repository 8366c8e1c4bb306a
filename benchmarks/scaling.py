"""Scaling note: fastalign on 1 and 2 processes (gloo, CPU) with the same global batch, and an
estimate of the original's published 8xA100 run under fastalign.

    python benchmarks/scaling.py --preset cpu-tiny            (about 3 minutes on 2 cores)

Part 1, measured. `torchrun --standalone --nproc_per_node=N` runs fastalign's own trainer
(`fastalign.trainer.Trainer`: FSDP2 `full_shard`, one unit per decoder layer) for N = 1 and 2 on the
same checkpoint and data, with the same global batch: `groups_per_step` groups per optimizer step
(N=1: one micro-batch of 8 groups; N=2: 4 groups per rank). Each rank runs one thread
(`--threads_per_rank`), so N processes use N cores: tokens/s shows the data-parallel speed-up net
of what sharding costs (gloo all-gather / reduce-scatter on every layer). Per rank it reports the bytes of its
parameter shard and its optimizer-state shard (AdamW exp_avg + exp_avg_sq), which must fall as
~1/N (gradients are sharded like the parameters and freed by each step), and its peak RSS above the
RSS after imports (which also holds the gathered layers, activations, the gloo buffers and the
data, so it falls more slowly). tokens/s counts real tokens of all ranks.

Part 2, estimated (arithmetic written out in the JSON and printed): the original's published run,
2 epochs over the Sandbox data on a 7B Llama in 3 hours on 8xA100, and what fastalign would take
for the same run, from the measured fastalign/baseline tokens/s ratio (best available: a GPU
7B-layer result, else gpu-1b, else the CPU one, named in the output) and a FLOPs cross-check.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.lib.machine import machine_summary, peak_bf16_tflops
from benchmarks.lib.memory import CPU_MEMORY_ENV, PeakMemory
from benchmarks.lib.paths import RESULTS_DIR
from benchmarks.lib.presets import TRAIN_PRESETS
from benchmarks.lib.results import result_header, results_path, write_json
from benchmarks.lib.tables import fmt_bytes, format_table
from benchmarks.lib.timing import summarize_times

WORLD_SIZES = (1, 2)

# The original's published run (socially-good-lm model card; Stable-Alignment README).
ORIGINAL_RUN = {
    "hardware": "8x A100 (FSDP full_shard, bf16, tf32)",
    "hours": 3.0,
    "epochs": 2,
    "model": "Llama-7B (hh-rlhf SFT start)",
    "params": 6.74e9,
    "num_comp": 3,
    "model_max_length": 480,
    "records_full_v1_set": 93_800,  # Stable-Alignment README: sandbox_v1 full set (the released file samples it)
}


# ----------------------------------------------------------------------------- rank worker


def tensor_bytes(t) -> int:
    from torch.distributed.tensor import DTensor

    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def rank_main(spec: dict[str, Any]) -> int:
    """One torchrun rank: build fastalign's trainer, run the steps, write this rank's JSON."""
    import torch
    import torch.distributed as dist

    from fastalign import distributed as fdist
    from fastalign.config import parse_args
    from fastalign.metrics import Window
    from fastalign.trainer import Trainer

    world = int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(spec["threads_per_rank"])
    memory = PeakMemory("cpu").start()
    args = parse_args([
        "--model_name_or_path", spec["model_dir"], "--data_path", spec["data_path"],
        "--output_dir", spec["output_dir"], "--bf16", "False", "--tf32", "True", "--learning_rate", "2e-5",
        "--weight_decay", "0",
        "--model_max_length", str(spec["model_max_length"]), "--num_comp", str(spec["num_comp"]),
        "--per_device_train_batch_size", str(spec["groups_per_step"] // world), "--gradient_accumulation_steps", "1",
        "--fsdp", "full_shard auto_wrap", "--save_strategy", "no", "--logging_steps", "1000000",
        "--rating_scale", "7", "--margin", "1", "--ratio", "0.2", "--max_flow", "False",  # the published command
        "--max_steps", "1000000", "--seed", str(spec["seed"])])
    env = fdist.init_distributed()
    trainer = Trainer(args, env)
    trainer.setup()

    times, tokens = [], []
    steps = trainer.batcher.iter_steps(0)
    for i in range(spec["warmup"] + spec["measure"]):
        if i == spec["warmup"]:
            memory.reset_peak()
        step = next(steps)
        local_tokens = sum(b.num_tokens for b in step.micro_batches if b.num_groups)
        dist.barrier()
        start = time.perf_counter()
        trainer._train_step(step, Window.new(env.device))  # the trainer's own step
        dist.barrier()
        seconds = time.perf_counter() - start
        total = torch.tensor([local_tokens], dtype=torch.float64)
        dist.all_reduce(total)
        if i >= spec["warmup"]:
            times.append(seconds)
            tokens.append(int(total.item()))
    params = list(trainer.model.parameters())
    state_bytes = sum(tensor_bytes(v) for s in trainer.optimizer.state.values() for v in s.values()
                      if hasattr(v, "numel") and v.dim() > 0)
    result = {
        "rank": env.rank, "world_size": env.world_size, "threads": torch.get_num_threads(),
        "step_times_s": times, "tokens_per_step": tokens,
        "param_shard_bytes": sum(tensor_bytes(p) for p in params),
        "optimizer_state_bytes": state_bytes,
        "peak_rss_bytes": memory.peak_bytes(),
        "memory_method": memory.describe(),
        "parameters_unsharded": sum(p.numel() for p in params),
    }
    Path(spec["out"], f"rank{env.rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()
    return 0


# ----------------------------------------------------------------------------- parent


def run_world(n: int, spec: dict[str, Any], work: Path, timeout_s: float) -> dict[str, Any]:
    out = work / f"world{n}"
    out.mkdir()
    spec = {**spec, "out": str(out), "output_dir": str(work / f"train-out{n}")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           str(Path(__file__).resolve()), "--rank_worker", json.dumps(spec)]
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads_per_rank"]), TOKENIZERS_PARALLELISM="false",
               **CPU_MEMORY_ENV)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")]))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"world size {n} failed (status {proc.returncode}):\n{proc.stderr[-4000:]}")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]
    times = ranks[0]["step_times_s"]
    return {
        "world_size": n,
        "threads_per_rank": ranks[0]["threads"],
        "tokens_per_s": sum(ranks[0]["tokens_per_step"]) / sum(times),
        "step_time": summarize_times(times),
        "per_rank": ranks,
        "max_rank": {key: max(r[key] for r in ranks) for key in
                     ("param_shard_bytes", "optimizer_state_bytes", "peak_rss_bytes")},
    }


def latest_ratio() -> dict[str, Any] | None:
    """The measured fastalign/baseline tokens/s ratio to scale the original's run by: the most
    7B-like result on file (gpu-7b-layers, then gpu-1b, then cpu-tiny), newest first."""
    for preset in ("gpu-7b-layers", "gpu-1b", "cpu-tiny"):
        files = sorted(RESULTS_DIR.rglob(f"train_throughput-*-{preset}.json"), key=lambda p: p.stat().st_mtime)
        if files:
            data = json.loads(files[-1].read_text())
            return {"preset": preset, "file": str(files[-1].relative_to(RESULTS_DIR.parent.parent)),
                    "machine": machine_summary(data["machine"]), "tokens_per_s_ratio": data["ratios"]["tokens_per_s"],
                    "mfu_fastalign": data["sides"]["fastalign"].get("mfu"),
                    "mfu_baseline": data["sides"]["baseline"].get("mfu")}
    return None


def estimate(tokens_per_sequence: float) -> dict[str, Any]:
    """The arithmetic of part 2, as numbers and as the lines that print it."""
    o = ORIGINAL_RUN
    a100_peak = peak_bf16_tflops("A100") * 1e12
    seconds = o["hours"] * 3600
    sequences = o["records_full_v1_set"] * o["num_comp"] * o["epochs"]
    tokens = sequences * tokens_per_sequence
    flops_per_token = 6 * o["params"]  # attention adds ~2% at these lengths; left out of this rough check
    flops = tokens * flops_per_token
    implied_mfu = flops / (seconds * 8 * a100_peak)
    lines = [
        f"original: {o['epochs']} epochs, {o['hours']:.0f} h on {o['hardware']}",
        f"tokens (upper bound, the full v1 set): {o['records_full_v1_set']:,} records x {o['num_comp']} candidates x "
        f"{o['epochs']} epochs x {tokens_per_sequence:.0f} tokens/sequence (assumed) = {tokens:.3g} tokens",
        f"FLOPs: 6 x {o['params']:.3g} params x {tokens:.3g} tokens = {flops:.3g}",
        f"implied original throughput: {tokens / seconds:,.0f} tokens/s on 8 GPUs = {tokens / seconds / 8:,.0f} "
        f"tokens/s/GPU; implied MFU {flops:.3g} / ({seconds:.0f} s x 8 x 312e12) = {100 * implied_mfu:.1f}% "
        "(an upper bound: the released file is a sample of the full set)",
    ]
    result: dict[str, Any] = {"original": o, "assumed_tokens_per_sequence": tokens_per_sequence,
                              "tokens_upper_bound": tokens, "flops_upper_bound": flops,
                              "implied_original_mfu_upper_bound": implied_mfu}
    ratio = latest_ratio()
    result["measured_ratio"] = ratio
    if ratio is not None:
        hours = o["hours"] / ratio["tokens_per_s_ratio"]
        result["fastalign_hours_from_ratio"] = hours
        lines.append(f"fastalign, from the measured tokens/s ratio {ratio['tokens_per_s_ratio']:.2f}x "
                     f"({ratio['preset']} on {ratio['machine']}, {ratio['file']}): {o['hours']:.0f} h / "
                     f"{ratio['tokens_per_s_ratio']:.2f} = {hours:.2f} h"
                     + ("  [CPU ratio: a weak proxy for 8xA100; rerun after `make gpu-check`]"
                        if ratio["preset"].startswith("cpu") else ""))
    for mfu_assumed in (0.35, 0.45):
        hours = flops / (8 * a100_peak * mfu_assumed) / 3600
        result[f"fastalign_hours_at_mfu_{mfu_assumed}"] = hours
        lines.append(f"fastalign at {100 * mfu_assumed:.0f}% MFU on 8xA100 (FLOPs bound, full set): "
                     f"{flops:.3g} / (8 x 312e12 x {mfu_assumed}) = {hours:.2f} h")
    lines.append("both scale linearly with the true record count and tokens/sequence; the ratio-based figure "
                 "does not depend on them")
    result["arithmetic"] = lines
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu-tiny", choices=[p for p in TRAIN_PRESETS if p.startswith("cpu")])
    parser.add_argument("--data_path", type=Path, default=None)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None, help="measured steps (default: the preset's)")
    parser.add_argument("--tokens_per_sequence", type=float, default=250.0,
                        help="assumed mean query+response tokens of a Sandbox sequence (for part 2)")
    parser.add_argument("--threads_per_rank", type=int, default=1,
                        help="torch threads per process (default 1, so 2 processes use 2 cores)")
    parser.add_argument("--timeout_s", type=float, default=900.0, help="per world size")
    parser.add_argument("--out_dir", type=Path, default=None)
    parser.add_argument("--rank_worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank_worker:
        return rank_main(json.loads(args.rank_worker))

    from benchmarks.baseline_original import build_benchmark_dir, default_data_path

    preset = TRAIN_PRESETS[args.preset]
    data_path = (args.data_path or default_data_path()).resolve()
    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="fa-scaling-"))
    try:
        model_dir = build_benchmark_dir(preset, data_path, work / "model")
        spec = {"model_dir": str(model_dir), "data_path": str(data_path), "seed": 0, "cores": cores,
                "threads_per_rank": args.threads_per_rank,
                "model_max_length": preset.model_max_length, "num_comp": preset.num_comp,
                "groups_per_step": preset.groups_per_step, "warmup": args.warmup,
                "measure": preset.measure_steps if args.steps is None else args.steps}
        worlds = [run_world(n, spec, work, args.timeout_s) for n in WORLD_SIZES]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    one = worlds[0]
    for w in worlds:
        w["vs_1_process"] = {key: w["max_rank"][key] / one["max_rank"][key] if one["max_rank"][key] else None
                             for key in one["max_rank"]}
        w["vs_1_process"]["tokens_per_s"] = w["tokens_per_s"] / one["tokens_per_s"]
    result = {**result_header("scaling", preset.name, "cpu"),
              "setup": {"global_groups_per_step": preset.groups_per_step, "fsdp": "full_shard auto_wrap",
                        "precision": "fp32", "backend": "gloo", "cores": cores,
                        "threads_per_rank": args.threads_per_rank, "model": preset.model},
              "worlds": worlds, "estimate_8xA100": estimate(args.tokens_per_sequence)}
    path = write_json(results_path("scaling", preset.name, "cpu", args.out_dir), result)

    print(format_table(
        ["processes", "threads/rank", "real tokens/s", "step (median)", "param shard/rank", "AdamW state/rank",
         "peak RSS/rank"],
        [[w["world_size"], w["threads_per_rank"], f"{w['tokens_per_s']:.0f}", f"{w['step_time']['median_s']:.3f} s",
          fmt_bytes(w["max_rank"]["param_shard_bytes"]),
          fmt_bytes(w["max_rank"]["optimizer_state_bytes"]), fmt_bytes(w["max_rank"]["peak_rss_bytes"])]
         for w in worlds]))
    two = worlds[-1]["vs_1_process"]
    print(f"2 vs 1 process: params/rank {two['param_shard_bytes']:.2f}x, AdamW state/rank "
          f"{two['optimizer_state_bytes']:.2f}x, peak RSS/rank {two['peak_rss_bytes']:.2f}x, tokens/s "
          f"{two['tokens_per_s']:.2f}x")
    print("\nEstimate for the original's published run:\n  " + "\n  ".join(result["estimate_8xA100"]["arithmetic"]))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    from fastalign.cli import exit_process, run_main

    exit_process(run_main(main))
