"""fastalign against TRL: training throughput and peak memory on the same preference pairs.

    pip install -e '.[peers]'                    # trl: this benchmark only, never the trainer
    OMP_NUM_THREADS=1 python benchmarks/peer_trl.py --preset cpu-tiny                 (CPU, fp32)
    PYTHONPATH=. python3 benchmarks/peer_trl.py --model_dir DIR --out_dir OUT     (CUDA, bf16)

The workload. From each record of the data (default: the bundled Sandbox sample) with at least
two distinct ratings: its best- and worst-rated responses, one pair (records in file order, as
many as the steps need). Both sides train the same model (a Llama of the preset's shape with
random weights and a tokenizer trained on the data, or --model_dir) on those pairs, in file order
(no shuffling), with the same batch flags (per_device_train_batch_size, gradient_accumulation_steps,
lr 2e-5, no weight decay, clipping at 1.0, sequences cut at --max_length tokens) and the same
precision: fp32 on CPU (TRL's DPOConfig defaults to bf16=True, which on a CPU without bf16 units
is slow emulated autocast, so it is set off), on CUDA bf16 autocast over fp32 weights on both
sides (fastalign --bf16 True; TRL bf16=True with the model loaded in fp32).

- trl: TRL's DPOTrainer (sigmoid DPO, beta 0.1) with the reference log-probs precomputed before
  training (precompute_ref_log_probs=True, outside the timed steps), so each step is the policy's
  forward and backward over chosen and rejected (prompt + completion each, padded per batch) and
  the optimizer step; TRL's own chunked LM head.
- fastalign: `fastalign.trainer.Trainer`'s own optimizer step with `--num_comp 2` on records holding
  exactly those two responses (so each group is the pair), its defaults otherwise (shared prefix:
  the prompt runs once per pair; step-level packing by the token budget).
- liger (CUDA only, when liger-kernel imports): the HF model's decoder and Liger-Kernel's fused
  linear DPO loss (LigerFusedLinearDPOLoss: LM head + DPO in chunks) with its reference log-probs
  precomputed, the same pairs, batches and AdamW.

Method. Each side runs in its own process per repeat; the repeats alternate the order (A B B A
...) so load changes on a shared machine hit both sides alike. Each process runs --warmup steps,
then --steps timed optimizer steps (device synchronised at both ends; TRL's step is timed from its
on_step_begin to on_step_end callbacks, after its batch is fetched). Tokens per step are counted
the same for every side: prompt + chosen + prompt + rejected tokens of the step's pairs (fastalign's
tokenization), so the tokens/s ratio is the inverse ratio of time per pair. Peak memory: CUDA
max_memory_allocated over the timed steps; CPU the peak RSS over the timed steps above the RSS
after imports (benchmarks.lib.memory.PeakMemory). Reported: per side the median over repeats of
tokens/s (with min and max) and of tokens per process CPU second (on a shared CPU machine the
wall time also measures the neighbours), the median step time, peak memory; the ratios
fastalign / trl. The
objectives differ (DPO against Stable Alignment's ranking loss), the work per pair is the same
kind: two sequences' forward and backward through the model and the LM head. JSON:
benchmarks/results/peer_trl-<date>-<device>-<preset>.json.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.lib.machine import machine_summary
from benchmarks.lib.memory import CPU_MEMORY_ENV, PeakMemory
from benchmarks.lib.paths import REPO_ROOT
from benchmarks.lib.presets import TRAIN_PRESETS
from benchmarks.lib.results import result_header, results_path, write_json
from benchmarks.lib.tables import fmt_bytes, format_table
from benchmarks.lib.timing import median, summarize_times, synchronize
from benchmarks.lib.workers import error_line
from fastalign.errors import FastalignError

LEARNING_RATE = 2e-5
_RESULT = "@@peer-trl-result@@ "


# ----------------------------------------------------------------------------- the pairs


def best_worst_pairs(src: Path, count: int) -> list[dict[str, Any]]:
    """The first `count` (prompt, best, worst) of the records with two distinct ratings, cycling
    through the file when it has fewer."""
    from fastalign.data import load_records

    pairs = []
    for record in load_records(str(src), skip_invalid=True).records:
        best = max(range(len(record.scores)), key=lambda i: record.scores[i])
        worst = min(range(len(record.scores)), key=lambda i: record.scores[i])
        if record.scores[best] > record.scores[worst]:
            pairs.append({"prompt": record.query, "chosen": record.responses[best],
                          "rejected": record.responses[worst],
                          "scores": [record.scores[best], record.scores[worst]]})
    if not pairs:
        raise FastalignError(f"{src}: no record has two differently rated responses")
    return [pairs[i % len(pairs)] for i in range(count)]


def write_pairs(pairs: list[dict[str, Any]], path: Path) -> Path:
    """The pairs as fastalign records: the query and exactly its two responses."""
    with open(path, "w") as out:
        for pair in pairs:
            out.write(json.dumps({"query": pair["prompt"], "responses": [pair["chosen"], pair["rejected"]],
                                  "scores": pair["scores"]}) + "\n")
    return path


def tokens_per_step(model_dir: Path, pairs_path: Path, max_length: int, pairs_per_step: int) -> list[int]:
    """prompt + chosen + prompt + rejected tokens of each step's pairs (fastalign's tokenization)."""
    from transformers import AutoTokenizer

    from fastalign.data import load_records, tokenize_records

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    groups = tokenize_records(load_records(str(pairs_path)), tokenizer,
                              model_max_length=max_length).groups
    per_pair = [2 * len(g.query_ids) + sum(len(r) for r in g.response_ids) for g in groups]
    return [sum(per_pair[i:i + pairs_per_step]) for i in range(0, len(per_pair) - pairs_per_step + 1, pairs_per_step)]


# ----------------------------------------------------------------------------- the sides (child processes)


def run_trl(spec: dict[str, Any], memory: PeakMemory) -> list[tuple[float, float]]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    pairs = [json.loads(line) for line in Path(spec["pairs_path"]).read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": p["query"], "chosen": p["responses"][0], "rejected": p["responses"][1]}
                                 for p in pairs])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"], trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = spec["device"]
    times: list[tuple[float, float]] = []  # (wall, process CPU) seconds per optimizer step

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            synchronize(device)
            self.started = (time.perf_counter(), time.process_time())

        def on_step_end(self, args, state, control, **kwargs):
            synchronize(device)
            times.append((time.perf_counter() - self.started[0], time.process_time() - self.started[1]))
            if len(times) == spec["warmup"]:
                memory.reset_peak()

    config = DPOConfig(
        output_dir=spec["output_dir"], per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=spec["grad_accum"], max_steps=spec["warmup"] + spec["steps"],
        learning_rate=LEARNING_RATE, weight_decay=0.0, max_grad_norm=1.0, lr_scheduler_type="constant",
        bf16=spec["precision"] == "bf16", use_cpu=device == "cpu", precompute_ref_log_probs=True,
        max_length=spec["max_length"], train_sampling_strategy="sequential", logging_steps=10**6,
        save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0, seed=spec["seed"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, trust_remote_code=False)
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[StepTimer()])
    if spec["warmup"] == 0:
        memory.reset_peak()
    trainer.train()
    return times


def run_fastalign(spec: dict[str, Any], memory: PeakMemory) -> list[tuple[float, float]]:
    import itertools

    import torch

    from fastalign import distributed as fdist
    from fastalign.config import parse_args
    from fastalign.metrics import Window
    from fastalign.trainer import Trainer

    args = parse_args([
        "--model_name_or_path", spec["model_dir"], "--data_path", spec["pairs_path"],
        "--output_dir", spec["output_dir"], "--num_comp", "2", "--bf16", str(spec["precision"] == "bf16"),
        "--per_device_train_batch_size", str(spec["batch_size"]),
        "--gradient_accumulation_steps", str(spec["grad_accum"]), "--model_max_length", str(spec["max_length"]),
        "--learning_rate", str(LEARNING_RATE), "--weight_decay", "0", "--max_grad_norm", "1.0",
        "--save_strategy", "no", "--logging_steps", "1000000", "--max_steps", "1000000", "--seed", str(spec["seed"]),
        "--disable_tqdm", "True"])
    env = fdist.init_distributed()
    if env.device.type != torch.device(spec["device"]).type:
        raise RuntimeError(f"fastalign picked {env.device}, the benchmark runs on {spec['device']}")
    trainer = Trainer(args, env)
    trainer.setup()
    trainer.batcher.shuffle = False  # file order, as TRL's sequential sampler
    steps = list(itertools.islice(trainer.batcher.iter_steps(0), spec["warmup"] + spec["steps"]))
    window = Window.new(env.device)
    times = []
    for i, step in enumerate(steps):
        if i == spec["warmup"]:
            memory.reset_peak()
        synchronize(env.device)
        started = (time.perf_counter(), time.process_time())
        trainer._train_step(step, window)
        synchronize(env.device)
        times.append((time.perf_counter() - started[0], time.process_time() - started[1]))
    return times


def run_liger(spec: dict[str, Any], memory: PeakMemory) -> list[tuple[float, float]]:
    """The HF model's decoder + Liger-Kernel's fused linear DPO loss (CUDA)."""
    from benchmarks.peer_liger import LigerDPO

    return LigerDPO(spec, memory).train()


SIDES = {"trl": run_trl, "fastalign": run_fastalign, "liger": run_liger}
# Imported before the memory baseline, so a side's peak counts its training, not its libraries.
IMPORTS = {"trl": ("trl", "trl.trainer.dpo_trainer", "datasets", "transformers.models.llama.modeling_llama"),
           "fastalign": ("fastalign.train", "transformers.models.llama.modeling_llama"),
           "liger": ("liger_kernel.chunked_loss", "transformers.models.llama.modeling_llama")}


def child_main(side: str, spec: dict[str, Any]) -> int:
    import torch

    torch.manual_seed(spec["seed"])
    if spec["device"] == "cpu":
        torch.set_num_threads(spec["threads"])
    for module in IMPORTS[side]:
        importlib.import_module(module)
    memory = PeakMemory(spec["device"]).start()
    times = SIDES[side](spec, memory)
    print(_RESULT + json.dumps({"times": times, "peak_bytes": memory.peak_bytes(), "memory": memory.describe()}),
          flush=True)
    return 0


# ----------------------------------------------------------------------------- the parent


def run_side(side: str, spec: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    if spec["device"] == "cpu":
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    env.update(CPU_MEMORY_ENV)
    spec = {**spec, "output_dir": str(Path(spec["work_dir"]) / f"{side}-out")}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--side", side, "--spec", json.dumps(spec)],
                          capture_output=True, text=True, cwd=REPO_ROOT, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(_RESULT)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-6000:])
        raise FastalignError(f"peer_trl: the {side} side failed (exit {proc.returncode}): "
                             f"{error_line(proc.stderr or proc.stdout)}")
    return json.loads(lines[-1][len(_RESULT):])


def summarize(side_runs: list[dict[str, Any]], warmup: int, step_tokens: list[int]) -> dict[str, Any]:
    measured_tokens = sum(step_tokens[warmup:])
    per_repeat = [measured_tokens / sum(wall for wall, _ in run["times"][warmup:]) for run in side_runs]
    # Process CPU seconds (one thread): what a step costs whatever else the machine runs.
    per_repeat_cpu = [measured_tokens / sum(cpu for _, cpu in run["times"][warmup:]) for run in side_runs]
    step_times = [wall for run in side_runs for wall, _ in run["times"][warmup:]]
    peaks = [run["peak_bytes"] for run in side_runs]
    return {"tokens_per_s": median(per_repeat), "tokens_per_s_range": [min(per_repeat), max(per_repeat)],
            "tokens_per_s_per_repeat": per_repeat, "tokens_per_cpu_s": median(per_repeat_cpu),
            "tokens_per_cpu_s_per_repeat": per_repeat_cpu, "step_time": summarize_times(step_times),
            "peak_memory_bytes": median(peaks), "peak_memory_range": [min(peaks), max(peaks)],
            "memory_method": side_runs[0]["memory"], "step_times_s": [run["times"] for run in side_runs]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu-tiny", choices=sorted(TRAIN_PRESETS),
                        help="the model's shape when no --model_dir (default cpu-tiny: 4 layers, hidden 256, "
                             "vocab 32000)")
    parser.add_argument("--model_dir", type=Path, default=None, help="an HF Llama folder with its tokenizer")
    parser.add_argument("--data_path", type=Path, default=None, help="Sandbox records (default: the bundled sample)")
    parser.add_argument("--per_device_train_batch_size", type=int, default=1)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=480, help="tokens per prompt + completion (default 480)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per process (default 1)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per process (default 4)")
    parser.add_argument("--repeats", type=int, default=2, help="processes per side, order alternating (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per side (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out_dir", type=Path, default=None, help="where the JSON goes (default benchmarks/results)")
    parser.add_argument("--side", choices=sorted(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:
        return child_main(args.side, json.loads(args.spec))

    import torch

    from benchmarks.baseline_original import build_benchmark_dir, default_data_path

    if importlib.util.find_spec("trl") is None:
        raise FastalignError("peer_trl: trl is not installed; pip install -e '.[peers]' (or pip install trl)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sides = ["trl", "fastalign"]
    skipped = {}
    if device == "cuda" and importlib.util.find_spec("liger_kernel") is not None:
        sides.append("liger")
    else:
        skipped["liger"] = "needs CUDA" if device != "cuda" else "liger-kernel is not installed"
    preset = TRAIN_PRESETS[args.preset]
    data_path = (args.data_path or default_data_path()).resolve()
    pairs_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
    load_at_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="fa-peer-trl-") as tmp:
        work = Path(tmp)
        pairs_path = write_pairs(best_worst_pairs(data_path, pairs_per_step * (args.warmup + args.steps)),
                                 work / "pairs.jsonl")
        model_dir = args.model_dir.resolve() if args.model_dir else \
            build_benchmark_dir(preset, data_path, work / "model", seed=args.seed)
        step_tokens = tokens_per_step(model_dir, pairs_path, args.max_length, pairs_per_step)
        spec = {"model_dir": str(model_dir), "pairs_path": str(pairs_path), "device": device,
                "precision": "bf16" if device == "cuda" else "fp32", "batch_size": args.per_device_train_batch_size,
                "grad_accum": args.gradient_accumulation_steps, "max_length": args.max_length, "warmup": args.warmup,
                "steps": args.steps, "threads": args.threads, "seed": args.seed, "work_dir": tmp}
        runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
        order = []
        for repeat in range(args.repeats):  # A B, B A, A B, ...
            for side in (sides if repeat % 2 == 0 else sides[::-1]):
                print(f"repeat {repeat + 1}/{args.repeats}: {side}", file=sys.stderr, flush=True)
                runs[side].append(run_side(side, spec))
                order.append(side)
    summary = {side: summarize(side_runs, args.warmup, step_tokens) for side, side_runs in runs.items()}
    base = summary["trl"]
    ratios = {side: {"tokens_per_s": s["tokens_per_s"] / base["tokens_per_s"],
                     "tokens_per_s_per_repeat": [a / b for a, b in zip(s["tokens_per_s_per_repeat"],
                                                                       base["tokens_per_s_per_repeat"])],
                     "tokens_per_cpu_s": s["tokens_per_cpu_s"] / base["tokens_per_cpu_s"],
                     "peak_memory": s["peak_memory_bytes"] / base["peak_memory_bytes"]}
              for side, s in summary.items() if side != "trl"}
    model_name = f"{args.model_dir.name} (given)" if args.model_dir else f"{preset.name} shape, random weights"
    result = {**result_header("peer_trl", args.preset if not args.model_dir else "model_dir", device),
              "versions": {name: _version(name) for name in ("trl", "transformers", "torch", "liger_kernel")},
              "load_avg_1m_at_start": load_at_start, "load_avg_1m_at_end": os.getloadavg()[0],
              "model": model_name, "precision": spec["precision"],
              "batch": {"per_device_train_batch_size": args.per_device_train_batch_size,
                        "gradient_accumulation_steps": args.gradient_accumulation_steps,
                        "pairs_per_step": pairs_per_step, "max_length": args.max_length},
              "schedule": {"warmup_steps": args.warmup, "timed_steps": args.steps, "repeats": args.repeats,
                           "order": order, "cpu_threads_per_side": args.threads if device == "cpu" else None},
              "tokens_per_step": step_tokens, "sides": summary, "ratios_vs_trl": ratios, "skipped": skipped}
    path = write_json(results_path("peer_trl", result["preset"], device, args.out_dir), result)
    rows = [[side, f"{s['tokens_per_s']:.0f}", f"{s['tokens_per_s_range'][0]:.0f}-{s['tokens_per_s_range'][1]:.0f}",
             f"{s['step_time']['median_s']:.3f} s", fmt_bytes(s["peak_memory_bytes"]),
             f"{ratios[side]['tokens_per_s']:.2f}x" if side in ratios else "1.00x",
             f"{ratios[side]['tokens_per_cpu_s']:.2f}x" if side in ratios else "1.00x",
             f"{ratios[side]['peak_memory']:.2f}x" if side in ratios else "1.00x"] for side, s in summary.items()]
    rows += [[side, None, None, None, None, None, None, why] for side, why in skipped.items()]
    print(f"\n{model_name}, {spec['precision']}, {pairs_per_step} pairs/step, on {machine_summary(result['machine'])}")
    print(format_table(["side", "tokens/s (median)", "range", "step time", "peak memory", "tokens/s vs trl",
                        "by CPU time", "memory vs trl"], rows))
    print(f"wrote {path}")
    return 0


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module.replace("_", "-"))
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    from fastalign.cli import run_main

    sys.exit(run_main(main))
