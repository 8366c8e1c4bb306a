"""Will it fit, and how long will it take? Plan a training run before renting the GPUs.

Details: docs/design.md section 7.24.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from fastalign import distributed as fdist
from fastalign.cli import BOOLEAN_FLAG, number, positive_float, positive_int
from fastalign.config import add_lora_flags, refuse_quantized_bases
from fastalign.errors import ConfigError, ModelError
from fastalign.hardware import GPUS, Gpu
from fastalign.hf_config import LlamaConfig
from fastalign.lora import LoraSettings
from fastalign.plan import memory as pm
from fastalign.plan.workload import COUNT_FIELDS, Workload, step_budget, workload_from_data, workload_from_flags

GIB = 1 << 30


DEFAULT_MFU = 0.35  # assumed model-FLOPs utilisation while benchmarks/results/ has no GPU training benchmark
INTER_NODE_GB_S = 25.0  # assumed: one 200 Gb/s NIC per GPU
USABLE_FRACTION, RESERVED_GIB = 0.9, 1.0  # of the card: allocator slack; CUDA context, NCCL, cuBLAS
EXIT_DOES_NOT_FIT = 3  # exit status of a plan that does not fit (2 is a usage error, as everywhere)


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastalign.plan", allow_abbrev=False,
        usage="%(prog)s --model_name_or_path DIR | --config FILE --gpu NAME | --gpu_memory_gb X [FLAGS] (see --help)",
        description="Predict per-rank memory (does it fit?) and time of a fastalign training run, "
        "without GPUs: the trainer's own sharding on a fake process group, activations counted per tensor.")
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--model_name_or_path", help="HF model directory (its config.json; no weights are read).")
    model.add_argument("--config", help="An HF config.json (Llama, Mistral, Qwen2, Qwen3).")
    where = parser.add_argument_group("machines")
    where.add_argument("--nproc_per_node", type=positive_int, default=1, help="GPUs (ranks) per node. Default 1.")
    where.add_argument("--nnodes", type=positive_int, default=1, help="Nodes. Default 1.")
    where.add_argument("--gpu", choices=sorted(GPUS), help="GPU model: its memory, bf16 peak and assumed link speed.")
    where.add_argument("--gpu_memory_gb", type=positive_float, help="GPU memory in GiB (overrides --gpu's).")
    where.add_argument("--gpu_tflops", type=positive_float, help="Dense bf16 peak TFLOP/s (overrides --gpu's).")
    where.add_argument("--mfu", type=positive_float, default=None,
                       help=f"Assumed model-FLOPs utilisation (default {DEFAULT_MFU}, an assumption: no GPU rows in "
                            "benchmarks/RESULTS.md yet).")
    where.add_argument("--link_gb_s", type=positive_float,
                       help="GPU-to-GPU bus bandwidth within a node, GB/s (default: --gpu's assumption).")
    where.add_argument("--inter_node_gb_s", type=positive_float, default=INTER_NODE_GB_S,
                       help=f"Bandwidth per GPU between nodes, GB/s. Default {INTER_NODE_GB_S} (assumed).")
    where.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                       help="cuda (default): plan a GPU run (flash attention, Triton head, 256 MiB slices); cpu: a CPU "
                            "run (sdpa, torch head, 32 MiB slices).")
    train = parser.add_argument_group("training flags (as python -m fastalign.train reads them)")
    train.add_argument("--bf16", default=False, **BOOLEAN_FLAG)
    train.add_argument("--fsdp", default="",
                       help="As the trainer: 'full_shard auto_wrap', 'shard_grad_op', 'hybrid_shard', 'offload', ''.")
    train.add_argument("--gradient_checkpointing", default=False, **BOOLEAN_FLAG)
    train.add_argument("--per_device_train_batch_size", type=positive_int, default=8)
    train.add_argument("--gradient_accumulation_steps", type=positive_int, default=1)
    train.add_argument("--max_tokens_per_batch", type=number(int, low=0, what="an integer >= 0"), default=None,
                       help="The trainer's step-level packing budget (default 4096 with --device cpu; with cuda "
                            "per_device_train_batch_size x num_comp x model_max_length; 0: one micro-batch "
                            "per --per_device_train_batch_size groups).")
    train.add_argument("--model_max_length", type=positive_int, default=512)
    train.add_argument("--num_comp", type=positive_int, default=3)
    train.add_argument("--share_prefix", default=True, **BOOLEAN_FLAG,
                       help="Query computed once per group (default True); False: once per response.")
    train.add_argument("--num_train_epochs", type=positive_float, default=3.0)
    train.add_argument("--loss_backend", choices=("auto", "triton", "torch"), default="auto")
    add_lora_flags(parser)  # the trainer's LoRA flags: a frozen base, adapter gradients and states
    data = parser.add_argument_group("data (optional: without it the flags' worst case is planned)")
    data.add_argument("--data_path", help="Sandbox records; tokenized with --model_name_or_path's tokenizer.")
    data.add_argument("--num_records", type=positive_int, default=None,
                      help="Without --data_path: records per epoch, for epoch times (token lengths from the two flags "
                           "below).")
    data.add_argument("--mean_sequence_tokens", type=positive_float, default=None,
                      help="Without --data_path: assumed mean query+response tokens (default --model_max_length).")
    data.add_argument("--mean_query_tokens", type=positive_float, default=None,
                      help="Without --data_path: assumed mean query tokens (default half the sequence).")
    data.add_argument("--seed", type=int, default=42)
    data.add_argument("--rating_scale", type=positive_float, default=7.0)
    data.add_argument("--skip_invalid", default=False, **BOOLEAN_FLAG)
    data.add_argument("--stop_response", default=False, **BOOLEAN_FLAG)
    data.add_argument("--no_append_eos", default=False, **BOOLEAN_FLAG)
    parser.add_argument("--json", dest="json_path", help="Also write the plan as JSON to this file.")
    return parser


# ----------------------------------------------------------------------------- time


RESULTS_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "results"  # in a source checkout


def default_mfu(results: Path = RESULTS_DIR) -> tuple[float, str]:
    """Utilisation to assume: fastalign's measured MFU from a GPU training benchmark on file
    (benchmarks/train_throughput.py's JSON, gpu-7b-layers before gpu-1b, newest name first; not
    the git-ignored staging folder results/tmp/, which holds runs nobody has kept yet), else
    DEFAULT_MFU as a stated assumption."""
    for preset in ("gpu-7b-layers", "gpu-1b"):
        files = sorted(file for file in results.rglob(f"train_throughput-*-{preset}.json")
                       if "tmp" not in file.relative_to(results).parts[:-1]) if results.is_dir() else []
        for file in reversed(files):
            mfu = json.loads(file.read_text()).get("sides", {}).get("fastalign", {}).get("mfu")
            if mfu:
                return float(mfu), f"measured: {file.name}"
    return DEFAULT_MFU, "assumed: no GPU training benchmark in benchmarks/results/ yet"


def communication_bytes(state_numel: int, args, plan: fdist.FsdpPlan, micro_batches: float) -> tuple[float, float]:
    """(bytes within a node, bytes between nodes) each rank moves per optimizer step of
    `micro_batches` micro-batches per rank (the step-level packing's count, not
    --gradient_accumulation_steps).

    Ring collectives move (n - 1) / n of the buffer per rank. Over the shard dimension FSDP2
    all-gathers the parameters in the compute dtype on every micro-batch (forward, and again in
    backward under full/hybrid_shard) and reduce-scatters fp32 gradients. Over a replicate
    dimension (no_shard, hybrid) the trainer all-reduces the fp32 gradient shards once per
    optimizer step (`distributed.set_gradient_all_reduce`): 2 (n - 1) / n of them.
    """
    world, per_node, b = args.world_size, args.nproc_per_node, 2 if args.bf16 else 4
    if world == 1:
        return 0.0, 0.0
    micro = micro_batches
    gathers = 2 if plan.reshard_after_forward else 1

    def sharded(n: int) -> float:  # per step, over a shard dimension of n ranks
        return micro * (gathers * b + 4) * state_numel * (n - 1) / n

    def all_reduce(numel: float, n: int) -> float:  # once per step, over a replicate dimension of n
        return 2 * 4 * numel * (n - 1) / n

    if plan.strategy == "no_shard":
        volume = all_reduce(state_numel, world)
        return (volume, 0.0) if args.nnodes == 1 else (0.0, volume)
    if plan.strategy in ("full_shard", "shard_grad_op"):
        return (sharded(world), 0.0) if args.nnodes == 1 else (0.0, sharded(world))
    # hybrid: shard within the node, replicate across nodes
    return sharded(per_node), all_reduce(state_numel / per_node, args.nnodes)


# ----------------------------------------------------------------------------- the plan


def plan_memory(config, args, world_size: int, procs_per_node: int, fsdp_plan: fdist.FsdpPlan,
                gradient_checkpointing: bool, work: Workload) -> tuple[pm.StateBytes, pm.Phase]:
    state = pm.measure_state(config, world_size=world_size, procs_per_node=procs_per_node,
                             strategy=fsdp_plan.strategy, bf16=args.bf16,
                             gradient_checkpointing=gradient_checkpointing, offload=fsdp_plan.offload,
                             lora=LoraSettings.from_config(args) if args.use_peft else None)
    opts = options(args, fsdp_plan, gradient_checkpointing, work)
    return state, pm.peak_phase(config, state, work.largest, opts)


def options(args, fsdp_plan: fdist.FsdpPlan, gradient_checkpointing: bool, work: Workload) -> pm.Options:
    # accumulation: on average more than one micro-batch per step, or the largest step split
    split = work.largest_step_tokens > work.largest.tokens
    return pm.Options(bf16=args.bf16, strategy=fsdp_plan.strategy, offload=fsdp_plan.offload,
                      gradient_checkpointing=gradient_checkpointing, device_type=args.device,
                      loss_backend=args.loss_backend,
                      micro_batches_per_step=max(math.ceil(work.micro_batches_per_step), 1 + split))


def largest_budget_that_fits(config, state: pm.StateBytes, opts: pm.Options, usable: float, work: Workload) -> int:
    """The largest --max_tokens_per_batch whose micro-batches fit `usable` bytes, in the trainer's
    step-level sense: under a budget B no micro-batch exceeds B tokens (a larger group aside), nor
    one rank's groups of one step, so B fits when a micro-batch of B tokens (with the largest
    micro-batch's shares of targets, gathered key rows and mask elements, and accumulating over
    the micro-batches a smaller budget makes) does. Returns the
    largest fitting micro-batch, at most `work.largest_step_tokens` (then every budget fits);
    0: none fits."""
    shares = [getattr(work.largest, field) / max(work.largest.tokens, 1) for field in COUNT_FIELDS[1:4]]

    def fits(tokens: int) -> bool:
        batch = pm.MicroBatch(tokens, *(int(tokens * share) for share in shares))
        # a budget below the step's tokens cuts it into several micro-batches: gradients accumulate
        split = replace(opts, micro_batches_per_step=1 + (tokens < work.largest_step_tokens))
        return pm.peak_phase(config, state, batch, split).total <= usable

    cap = max(work.largest_step_tokens, 1)
    if fits(cap):
        return cap
    low, high = 0, cap  # fits(low), not fits(high)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def make_plan(args) -> dict:
    """Everything the report prints, as plain numbers (also written by --json)."""
    config = (LlamaConfig.from_pretrained(args.model_name_or_path) if args.model_name_or_path
              else LlamaConfig.from_hf_dict(_read_json(args.config), source=args.config))
    config.check_length(args.model_max_length)  # as the trainer: a shorter sliding window is refused
    fsdp_plan = fdist.parse_fsdp(args.fsdp)
    gpu = GPUS.get(args.gpu) if args.gpu else None
    memory_gib = args.gpu_memory_gb or (gpu.memory_gib if gpu else None)
    usable = USABLE_FRACTION * memory_gib * GIB - RESERVED_GIB * GIB
    work = workload_from_data(args, args.model_name_or_path) if args.data_path else workload_from_flags(args)

    state, peak = plan_memory(config, args, args.world_size, args.nproc_per_node, fsdp_plan,
                              args.gradient_checkpointing, work)
    opts = options(args, fsdp_plan, args.gradient_checkpointing, work)
    phases = pm.step_phases(config, state, work.largest, opts)
    budget = largest_budget_that_fits(config, state, opts, usable, work)
    step_budget_tokens = step_budget(args)
    result = {
        "model": {"config": args.model_name_or_path or args.config, "parameters": config.num_parameters(),
                  "layers": config.num_hidden_layers, "hidden": config.hidden_size, "vocab": config.vocab_size},
        "world": {"ranks": args.world_size, "nnodes": args.nnodes, "nproc_per_node": args.nproc_per_node,
                  "fsdp": fsdp_plan.strategy + (" + offload" if fsdp_plan.offload else ""),
                  "bf16": args.bf16, "gradient_checkpointing": args.gradient_checkpointing,
                  "use_peft": args.use_peft,
                  "share_prefix": args.share_prefix, "device": args.device, "epochs": args.num_train_epochs},
        "gpu": {"name": args.gpu, "memory_gib": memory_gib, "usable_gib": usable / GIB},
        "workload": {"source": work.source, "max_tokens_per_batch": step_budget_tokens or 0,
                     "largest_micro_batch_tokens": work.largest.tokens,
                     "largest_micro_batch_target_tokens": work.largest.target_tokens,
                     "largest_micro_batch_key_tokens": work.largest.key_tokens,
                     "largest_group_tokens": work.largest_group_tokens,
                     "largest_step_tokens_per_rank": work.largest_step_tokens,
                     "micro_batches_per_step": work.micro_batches_per_step},
        "memory": {"peak_bytes": peak.total, "peak_phase": peak.name, "parts_bytes": peak.parts,
                   "phases_bytes": {phase.name: phase.total for phase in phases},
                   "loss_head_slice_bytes": max(phase.parts["loss-head slice"] for phase in phases),
                   "host_offload_bytes_per_rank": pm.host_state_bytes(state, opts),
                   "fits": peak.total <= usable, "largest_max_tokens_per_batch_that_fits": budget,
                   "any_max_tokens_per_batch_fits": budget >= work.largest_step_tokens,
                   "largest_group_fits": budget >= work.largest_group_tokens},
        "time": estimate_time(config, args, fsdp_plan, work, gpu),
    }
    if not result["memory"]["fits"]:
        result["what_would_fit"] = what_would_fit(config, args, fsdp_plan, work, usable, budget)
    return result


def estimate_time(config, args, fsdp_plan: fdist.FsdpPlan, work: Workload, gpu: Gpu | None) -> dict:
    tflops = args.gpu_tflops or (gpu.tflops if gpu else None)
    if tflops is None:
        return {"note": "no --gpu or --gpu_tflops: no time estimate"}
    mfu, mfu_source = (args.mfu, "given by --mfu") if args.mfu else default_mfu()
    per_token, per_square = config.flops_per_token(0), config.flops_per_token(1) - config.flops_per_token(0)
    flops = per_token * work.tokens_per_step + per_square * work.attention_work_per_step  # the trainer's MFU count
    if args.gradient_checkpointing:  # one more forward of the decoder layers: 1/3 of their matmuls and attention
        layer_params = (config.num_parameters(include_embeddings=False) - config.hidden_size  # final norm
                        - config.vocab_size * config.hidden_size * (not config.tie_word_embeddings))  # lm_head
        flops += 2 * layer_params * work.tokens_per_step + per_square * work.attention_work_per_step / 3
    compute_s = flops / args.world_size / (tflops * 1e12 * mfu)
    link = args.link_gb_s or (gpu.link_gb_s if gpu else None) or 20.0
    inside, across = communication_bytes(config.num_parameters(), args, fsdp_plan, work.micro_batches_per_step)
    comm_s = inside / (link * 1e9) + across / (args.inter_node_gb_s * 1e9)
    step_s = max(compute_s, comm_s)  # FSDP2 overlaps its collectives with the layers' compute
    out = {"flops_per_step": flops, "tflops_peak": tflops, "mfu": mfu, "mfu_source": mfu_source,
           "link_gb_s": link, "inter_node_gb_s": args.inter_node_gb_s,
           "communication_bytes_per_step_per_rank": inside + across,
           "compute_s_per_step": compute_s, "communication_s_per_step": comm_s, "step_s": step_s,
           "tokens_per_s": work.tokens_per_step / step_s,
           "not_counted": ("the host's AdamW step and the PCIe copies of offloaded shards"
                           if fsdp_plan.offload else None)}
    if work.steps_per_epoch is not None:
        out["steps_per_epoch"] = work.steps_per_epoch
        out["epoch_hours"] = work.steps_per_epoch * step_s / 3600
        out["run_hours"] = math.ceil(args.num_train_epochs * work.steps_per_epoch) * step_s / 3600
    return out


def what_would_fit(config, args, fsdp_plan: fdist.FsdpPlan, work: Workload, usable: float, budget: int) -> list[str]:
    """Changes that make the plan fit (or why one cannot), each checked with the same memory count."""
    hints = []
    sharded = fdist.FsdpPlan("full_shard", fsdp_plan.offload) if fsdp_plan.strategy == "no_shard" else fsdp_plan
    _, here = plan_memory(config, args, args.world_size, args.nproc_per_node, sharded, args.gradient_checkpointing,
                          work)
    unsharded = here.total - sum(here.parts[p] for p in ("parameter shards", "gradients", "optimizer state"))
    if unsharded > usable:  # activations and gathered layers do not shrink with more ranks
        hints.append(f"does not fit on any number of GPUs of this size: the activations, gathered layers and "
                     f"buffers alone take {_gib(unsharded)}")
        factors = ()
    else:
        factors = (2, 4, 8, 16, 32, 64, 128)
    for factor in factors:  # more nodes like this one
        ranks = args.world_size * factor
        _, peak = plan_memory(config, args, ranks, args.nproc_per_node, sharded, args.gradient_checkpointing,
                              work)
        if peak.total <= usable:
            hints.append(f"fits on {ranks} GPUs of this size: {_gib(peak.total)} per rank"
                         + (f" with --fsdp {sharded.strategy}" if sharded is not fsdp_plan else ""))
            break
    else:
        if factors:
            hints.append(f"does not fit even on {args.world_size * 128} GPUs of this size with these flags")
    candidates = []
    if not args.gradient_checkpointing:
        candidates.append(("--gradient_checkpointing True", fsdp_plan, True))
    if not fsdp_plan.offload and args.device == "cuda":  # offload moves state from the GPU to the host
        offload = fdist.FsdpPlan(sharded.strategy, True)
        candidates.append((f"--fsdp '{sharded.strategy} offload'", offload, args.gradient_checkpointing))
        if not args.gradient_checkpointing:
            candidates.append((f"--fsdp '{sharded.strategy} offload' --gradient_checkpointing True", offload, True))
    fitted = False
    for label, plan, ac in candidates:
        if fitted and "offload" in label and "checkpointing" in label:
            break  # offload alone already fits
        state, peak = plan_memory(config, args, args.world_size, args.nproc_per_node, plan, ac, work)
        if peak.total <= usable:
            fitted = "offload" in label
            host = pm.host_state_bytes(state, options(args, plan, ac, work))
            hints.append(f"fits with {label}: {_gib(peak.total)} per GPU"
                         + (f", and {_gib(host * args.nproc_per_node)} of host RAM per node for the offloaded state"
                            if host else ""))
        else:
            hints.append(f"{label} alone is not enough: {_gib(peak.total)} per GPU")
    if budget >= work.largest_group_tokens:
        hints.append(f"fits with a smaller batch: --max_tokens_per_batch {budget} (the step's groups cut into "
                     f"micro-batches of at most {budget} tokens)")
    elif budget > 0:
        hints.append(f"a smaller batch alone is not enough: micro-batches up to {budget} tokens fit, but the "
                     f"largest group ({work.largest_group_tokens} tokens) cannot be split (lower --model_max_length "
                     "or --num_comp)")
    else:
        hints.append("a smaller batch alone is not enough: the parameters, gradients and optimizer state do not "
                     "fit by themselves")
    return hints


# ----------------------------------------------------------------------------- report


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.2f} s"


def format_report(plan: dict) -> str:
    m, w, g, load, mem, t = plan["model"], plan["world"], plan["gpu"], plan["workload"], plan["memory"], plan["time"]
    lines = [
        f"model: {m['config']} ({m['parameters'] / 1e9:.2f} B parameters, {m['layers']} layers, "
        f"hidden {m['hidden']}, vocab {m['vocab']})",
        f"world: {w['ranks']} rank{'s' * (w['ranks'] > 1)} ({w['nnodes']} node{'s' * (w['nnodes'] > 1)} x "
        f"{w['nproc_per_node']}), fsdp {w['fsdp']}, "
        f"{'bf16' if w['bf16'] else 'fp32'} compute, "
        f"activation checkpointing {'on' if w['gradient_checkpointing'] else 'off'}, "
        f"shared prefix {'on' if w['share_prefix'] else 'off'}"
        + (", LoRA adapters over a frozen base" if w.get("use_peft") else ""),
        f"GPU: {g['name'] or 'custom'}, {g['memory_gib']:g} GiB ({g['usable_gib']:.2f} GiB usable: "
        f"{USABLE_FRACTION:.0%} minus "
        f"{RESERVED_GIB:g} GiB for the CUDA context, NCCL and cuBLAS)",
        f"micro-batches: --max_tokens_per_batch {load['max_tokens_per_batch'] or '0 (off)'}, "
        f"{load['micro_batches_per_step']:.3g} per rank per step (the time's workload); the largest "
        f"{load['largest_micro_batch_tokens']} tokens "
        f"({load['largest_micro_batch_target_tokens']} with a target"
        + (f", {load['largest_micro_batch_key_tokens']} gathered key/value rows" if w['share_prefix'] else "")
        + f"), from {load['source']}",
        "",
        f"memory per rank at the peak ({mem['peak_phase']}):",
    ]
    for part in pm.PART_NAMES:
        lines.append(f"  {part:<18} {_gib(mem['parts_bytes'][part]):>12}")
    lines.append(f"  {'total':<18} {_gib(mem['peak_bytes']):>12}")
    phases = ", ".join(f"{name} {_gib(total)}" for name, total in mem["phases_bytes"].items())
    lines.append(f"  by moment of the step: {phases}"
                 + f" (the loss-head slice, {_gib(mem['loss_head_slice_bytes'])}, lives in its backward)")
    if mem["host_offload_bytes_per_rank"]:
        lines.append(f"  offloaded to host: {_gib(mem['host_offload_bytes_per_rank'])} per rank")
    verdict = "FITS" if mem["fits"] else "DOES NOT FIT"
    lines.append(f"verdict: {verdict} on {g['memory_gib']:g} GiB "
                 f"({mem['peak_bytes'] / GIB:.2f} of {g['usable_gib']:.2f} GiB usable)")
    budget = mem["largest_max_tokens_per_batch_that_fits"]
    if mem["any_max_tokens_per_batch_fits"]:
        lines.append(f"largest --max_tokens_per_batch that fits: any (a rank's whole step, {budget} tokens, "
                     "fits in one micro-batch)")
    else:
        lines.append(f"largest --max_tokens_per_batch that fits: {budget}" if budget else
                     "largest --max_tokens_per_batch that fits: none (the persistent state alone is too large)")
    if budget and not mem["largest_group_fits"]:
        lines.append(f"  (below the largest group, {load['largest_group_tokens']} tokens, which cannot be split)")
    if plan.get("what_would_fit"):
        lines.append("what would make it fit:")
    for hint in plan.get("what_would_fit", []):
        lines.append(f"  - {hint}")
    lines.append("")
    if "step_s" not in t:
        lines.append(f"time: {t['note']}")
    else:
        lines += [
            f"time (estimates): {t['flops_per_step']:.3g} FLOPs per step, each GPU at {t['mfu']:.0%} of "
            f"{t['tflops_peak']:g} TFLOP/s ({t['mfu_source']})",
            f"  compute {_duration(t['compute_s_per_step'])}/step, communication "
            f"{t['communication_bytes_per_step_per_rank'] / 1e9:.2f} GB/rank/step = "
            f"{_duration(t['communication_s_per_step'])} "
            f"at {t['link_gb_s']:g} GB/s (between nodes {t['inter_node_gb_s']:g} GB/s), assumed overlapped",
            f"  step ~{_duration(t['step_s'])}, ~{t['tokens_per_s']:,.0f} tokens/s (all ranks)"
            + (f"; not counted: {t['not_counted']}" if t["not_counted"] else ""),
        ]
        if "epoch_hours" in t:
            lines.append(f"  epoch ({t['steps_per_epoch']} steps) ~{_duration(t['epoch_hours'] * 3600)}; "
                         f"the run's {w['epochs']:g} epochs ~{_duration(t['run_hours'] * 3600)}")
        else:
            lines.append("  epoch time: give --data_path (or --num_records)")
    return "\n".join(lines)


def _read_json(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ModelError(f"--config {path}: no such file") from None
    except (OSError, ValueError) as err:
        raise ModelError(f"--config {path}: not readable JSON ({err})") from None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.gpu and not args.gpu_memory_gb:
        parser.error("give --gpu NAME or --gpu_memory_gb X (the GPU's memory)")
    if args.data_path and not args.model_name_or_path:
        parser.error("--data_path needs --model_name_or_path (its tokenizer counts the tokens)")
    if args.data_path and args.num_records:
        parser.error("--num_records describes data without --data_path: give one of them")
    sequence = args.mean_sequence_tokens or args.model_max_length
    if sequence > args.model_max_length:
        parser.error(f"--mean_sequence_tokens {sequence:g} exceeds --model_max_length {args.model_max_length}")
    if args.mean_query_tokens is not None and args.mean_query_tokens >= sequence:
        parser.error(f"--mean_query_tokens {args.mean_query_tokens:g} leaves no response tokens in a "
                     f"{sequence:g}-token sequence (--mean_sequence_tokens)")
    try:
        plan = fdist.parse_fsdp(args.fsdp)
    except ConfigError as err:
        parser.error(str(err))
    if plan.offload and args.device != "cuda":
        parser.error("--fsdp offload: needs CUDA (as in the trainer)")
    refuse_quantized_bases(parser, args)
    args.world_size = args.nproc_per_node * args.nnodes
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    plan = make_plan(args)
    print(format_report(plan))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(plan, indent=2) + "\n")
    return 0 if plan["memory"]["fits"] else EXIT_DOES_NOT_FIT
