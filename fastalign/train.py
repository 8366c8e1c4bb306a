"""Stable Alignment training: the command line and the loop.

    python -m fastalign.train --model_name_or_path DIR --data_path FILE --output_dir OUT ...
    torchrun --nproc_per_node=8 -m fastalign.train ...        (same flags as train_alignment.py)

A plain `python -m` run is a one-rank process group, so checkpointing (torch.distributed.
checkpoint) and the metrics reduction are the same at any world size. The model is wrapped in
FSDP2 when there are several processes, bf16 compute or CPU offload; one fp32 process trains the
plain module (same numbers, no gather/reduce copies).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import resource
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from fastalign import best_model
from fastalign import checkpoint as ckpt
from fastalign import distributed as fdist
from fastalign import resume_inputs
from fastalign.attention import BACKENDS as ATTN_BACKENDS
from fastalign.cli import BOOLEAN_FLAG, exit_process, nonneg_float, number, positive_float, positive_int, run_main
from fastalign.console import format_metrics_line, setup_logging
from fastalign.errors import ConfigError, DataError, FastalignError
from fastalign.preemption import StopOnSignal, Stopped
from fastalign.profiling import PAUSED, StepProfiler, region
from fastalign.reporting import open_reporters, parse_report_to
from fastalign.run_inputs import RunInputs, refuse_destroying_inputs
from fastalign.run_lock import hold_output_dir

log = logging.getLogger("fastalign.train")

LR_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
STRATEGIES = ("no", "steps", "epoch")
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")  # --optim values that mean AdamW (all fastalign runs)
# --fsdp_transformer_layer_cls_to_wrap values: each family's transformers layer class (all wrap DecoderLayer)
DECODER_LAYER_CLASSES = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")

# Dense bf16 peak of common training GPUs (TFLOP/s), for MFU; matched by substring, first wins.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200", 989.0), ("H100", 989.0),
    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10G", 70.0),
)


# ----------------------------------------------------------------------------- command line

# --max_tokens_per_batch when not given on CPU: a CPU core set is saturated by a few thousand tokens
# (the CPU figures in benchmarks/RESULTS.md were measured with it).
DEFAULT_CPU_STEP_TOKENS = 4096


def step_token_budget(flag: int | None, device: torch.device, *, batch_size: int, num_comp: int,
                      model_max_length: int) -> int | None:
    """The GroupBatcher step budget for --max_tokens_per_batch: None (0) turns step packing off.
    Not given on a GPU: the original approach's own padded micro-batch, batch_size x num_comp x
    model_max_length tokens. One pass then never holds more tokens than a pass of the original
    command, which ran on the same GPUs (a fixed larger default packed the published run's 8 groups
    into one 11,520-token pass, ~80 GiB per rank), while shorter groups still share a pass."""
    if flag is None:
        return DEFAULT_CPU_STEP_TOKENS if device.type == "cpu" else batch_size * num_comp * model_max_length
    return flag or None


# --save_steps / --logging_steps: a count of optimizer steps, or below 1 a fraction of the total
interval_steps = number(float, low=0.0, low_open=True, what="a number > 0 (< 1: a fraction of the total steps)")
unit_interval = number(float, low=0.0, high=1.0, what="a number in [0, 1)")  # AdamW betas (1 checked in parse_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastalign.train",
        description="Stable Alignment training (drop-in for train_alignment.py's command line). "
        "Boolean flags take True/False (a bare flag means True). Run under "
        "`torchrun --nproc_per_node=N -m fastalign.train` for N processes (FSDP2); multi-node: "
        "torchrun --nnodes=M --node_rank=R --rdzv_backend=c10d --rdzv_endpoint=HOST:PORT.",
        usage="%(prog)s --model_name_or_path DIR --data_path FILE --output_dir DIR [FLAGS] (see --help)",
        allow_abbrev=False,
    )

    orig = parser.add_argument_group("flags of the original train_alignment.py command")
    orig.add_argument("--model_name_or_path", required=True, help="HF model directory: Llama, Mistral, Qwen2 or Qwen3 (config.json, safetensors or .bin weights, tokenizer).")
    orig.add_argument("--data_path", required=True, help="Sandbox records: JSON array or JSONL (.gz welcome).")
    orig.add_argument("--output_dir", required=True, help="Where metrics.jsonl, checkpoint-<step>/ and the final HF model go. Must not be empty, nor --model_name_or_path or a directory inside it (unless --allow_output_in_model_dir True). One run at a time: a run holds OUTPUT_DIR/.fastalign.lock and a second trainer there is refused.")
    orig.add_argument("--bf16", default=False, help="bf16 compute with fp32 master weights and fp32 gradient reduction (FSDP2 MixedPrecisionPolicy).", **BOOLEAN_FLAG)
    orig.add_argument("--num_train_epochs", type=positive_float, default=3.0, help="Epochs (fractions allowed); ignored when --max_steps > 0. Default 3.")
    orig.add_argument("--per_device_train_batch_size", type=positive_int, default=8, help="Groups (query + its responses) per micro-batch per process. Default 8 (HF).")
    orig.add_argument("--per_device_eval_batch_size", type=positive_int, default=8, help="Groups per evaluation micro-batch per process. Default 8.")
    orig.add_argument("--gradient_accumulation_steps", type=positive_int, default=1, help="Micro-batches per optimizer step per process. Default 1.")
    orig.add_argument("--evaluation_strategy", "--eval_strategy", dest="evaluation_strategy", choices=STRATEGIES, default="no", help="Evaluate on --eval_data_path every --eval_steps (steps) or each epoch. Default no.")
    orig.add_argument("--save_strategy", choices=STRATEGIES, default="steps", help="Write a resumable checkpoint every --save_steps (steps), each epoch, or never (no). Default steps.")
    orig.add_argument("--save_steps", type=interval_steps, default=500, help="Optimizer steps between checkpoints (< 1: fraction of total steps). Default 500.")
    orig.add_argument("--save_total_limit", type=positive_int, default=None, help="Keep at most this many checkpoints (oldest deleted). Default: keep all.")
    orig.add_argument("--learning_rate", type=nonneg_float, default=5e-5, help="Peak AdamW learning rate. Default 5e-5.")
    orig.add_argument("--weight_decay", type=nonneg_float, default=0.0, help="AdamW weight decay (not applied to norms and biases, as HF). Default 0.")
    orig.add_argument("--warmup_ratio", type=number(float, low=0.0, high=1.0, what="a number in [0, 1]"), default=0.0, help="Linear warmup over ceil(ratio * total steps). Default 0.")
    orig.add_argument("--lr_scheduler_type", choices=LR_SCHEDULERS, default="linear", help="Decay after warmup. Default linear.")
    orig.add_argument("--logging_steps", type=interval_steps, default=500, help="Optimizer steps between metrics.jsonl lines (< 1: fraction of total). Default 500.")
    orig.add_argument("--fsdp", default="", help="HF FSDP options, e.g. 'full_shard auto_wrap'. full_shard: FSDP2, params re-gathered in backward; shard_grad_op: kept gathered forward->backward; hybrid_shard[_zero2]: shard per node, replicate across nodes; no_shard or empty: replicate; offload: CPU offload; auto_wrap: always on (one FSDP unit per decoder layer). Default empty.")
    orig.add_argument("--fsdp_transformer_layer_cls_to_wrap", default=None, help="Accepted for compatibility when it names the family's decoder layer (LlamaDecoderLayer, MistralDecoderLayer, Qwen2DecoderLayer, Qwen3DecoderLayer): fastalign always wraps each decoder layer as one FSDP unit.")
    orig.add_argument("--tf32", default=False, help="Allow TF32 matmuls on CUDA (fp32 parts of the computation). Default False (as HF; the published command passes True).", **BOOLEAN_FLAG)
    orig.add_argument("--model_max_length", type=positive_int, default=512, help="Longest query+response in tokens; responses are cut from the end. Default 512.")
    orig.add_argument("--rating_scale", type=positive_float, default=7.0, help="Highest rating; also validates scores (1..rating_scale). Default 7.")
    orig.add_argument("--margin", type=float, default=1.0, help="Margin multiplier m in (s_best - s_j)/rating_scale * m. Default 1.")
    orig.add_argument("--max_flow", default=False, help="Penalty = max over the other responses instead of their mean. Default False.", **BOOLEAN_FLAG)
    orig.add_argument("--ratio", type=nonneg_float, default=0.5, help="Weight of the penalty term. Default 0.5 (as the original script; its published command passes 0.2).")
    orig.add_argument("--optim", default="adamw_torch", help=f"HF optimizer name; fastalign always trains with AdamW, so only {' / '.join(OPTIMIZERS)} are accepted. Default adamw_torch.")
    orig.add_argument("--cache_dir", default=None, help="Accepted for compatibility and ignored: fastalign reads --model_name_or_path from a local directory and caches nothing.")
    orig.add_argument("--overwrite_output_dir", default=False, help="Delete --output_dir's checkpoint-* directories and metrics.jsonl before a fresh start (unlike HF, which deletes nothing). Without it a fresh start into a directory holding checkpoints stops with an error. Refused (nothing deleted) when the model or a data file lies in what it would delete. Default False.", **BOOLEAN_FLAG)
    orig.add_argument("--num_comp", type=positive_int, default=3, help="Responses per query used in a step (sampled, seeded, when a record has more). Default 3.")

    own = parser.add_argument_group("fastalign flags")
    own.add_argument("--seed", type=int, default=42, help="Seed for shuffling and candidate sampling. Default 42.")
    own.add_argument("--max_steps", type=int, default=-1, help="Total optimizer steps; overrides --num_train_epochs when > 0. Default -1.")
    own.add_argument("--max_tokens_per_batch", type=number(int, low=0, what="an integer >= 0"), default=None, help=f"Step-level packing: the groups of one optimizer step on a process (per_device_train_batch_size x gradient_accumulation_steps) are cut into as few micro-batches of at most this many packed tokens as fit (a larger group goes alone); the step's groups and loss do not change. 0: one micro-batch per --per_device_train_batch_size groups (the original's passes). Default {DEFAULT_CPU_STEP_TOKENS} on CPU; on CUDA per_device_train_batch_size x num_comp x model_max_length (the original's padded micro-batch, so no pass holds more tokens than one of its passes).")
    own.add_argument("--share_prefix", default=True, help="Pack each group's query once and let every response attend to it (same loss, nll and gradients as query+response per response, fewer tokens computed); False: one query+response sequence per response. Default True.", **BOOLEAN_FLAG)
    own.add_argument("--gradient_checkpointing", default=False, help="Recompute each decoder layer in backward (less memory, ~30%% more compute). Default False.", **BOOLEAN_FLAG)
    own.add_argument("--compile", default=False, help="torch.compile each decoder layer. Default False.", **BOOLEAN_FLAG)
    own.add_argument("--attn_implementation", choices=("auto",) + ATTN_BACKENDS + ("flash_attention_2",), default="auto", help="Packed attention backend; auto: flash_attn, then torch_varlen, then sdpa. Default auto.")
    own.add_argument("--loss_backend", choices=("auto", "triton", "torch"), default="auto", help="Loss head: fused Triton kernel or its PyTorch twin; auto: triton on CUDA. Default auto.")
    own.add_argument("--margin_mode", choices=("paper", "seed"), default="paper", help="paper: margin from each response's own rating; seed: the original code's index pairing (reproduces the released model). Default paper.")
    own.add_argument("--skip_invalid", default=False, help="Drop invalid records (counted per reason) instead of stopping. Default False.", **BOOLEAN_FLAG)
    own.add_argument("--stop_response", default=False, help="Cut responses at the first '\\n\\nHuman:' / '\\n\\nAssistant:' marker. Default False.", **BOOLEAN_FLAG)
    own.add_argument("--no_append_eos", default=False, help="Do not append EOS to responses. Default False.", **BOOLEAN_FLAG)
    own.add_argument("--resume_from_checkpoint", default=None, metavar="PATH|auto", help="Resume from a checkpoint-<step> directory, or the latest complete one in --output_dir (auto; a fresh start when there is none).")
    own.add_argument("--allow_data_change", default=False, help="Resume although the data file, eval data, tokenizer files or --model_max_length differ from the checkpoint's (otherwise refused, naming each change): training continues at the checkpoint's step and data position on the new data. Default False.", **BOOLEAN_FLAG)
    own.add_argument("--max_grad_norm", type=nonneg_float, default=1.0, help="Clip the global gradient norm to this (0: no clipping). Default 1.")
    own.add_argument("--warmup_steps", type=int, default=0, help="Warmup steps; overrides --warmup_ratio when > 0. Default 0.")
    own.add_argument("--eval_data_path", default=None, help="Held-out Sandbox records for --evaluation_strategy steps|epoch.")
    own.add_argument("--allow_output_in_model_dir", default=False, help="Allow --output_dir to be --model_name_or_path or inside it (the final model then replaces the base weights). Default False.", **BOOLEAN_FLAG)
    own.add_argument("--eval_steps", type=interval_steps, default=None, help="Steps between evaluations (default: --logging_steps).")
    own.add_argument("--profile_steps", type=number(int, low=0, what="an integer >= 0"), default=0, help="Profile this many optimizer steps after the first (torch.profiler): a Chrome/Perfetto trace per rank in OUTPUT_DIR/profile/ and a table of where the step time goes (data, forward, loss head, backward, optimizer, communication, host waits) in the log and profile/summary.json. Default 0 (off).")
    own.add_argument("--token_cache_dir", default=None, help="Where tokenized data is cached between runs, keyed on data file, tokenizer and tokenization flags (rank 0 tokenizes, the other ranks read). 'none': no cache. Default: $XDG_CACHE_HOME/fastalign/tokens or ~/.cache/fastalign/tokens.")

    hf = parser.add_argument_group("HF Trainer flags (same meaning as in transformers' TrainingArguments)")
    hf.add_argument("--adam_beta1", type=unit_interval, default=0.9, help="AdamW beta1. Default 0.9.")
    hf.add_argument("--adam_beta2", type=unit_interval, default=0.999, help="AdamW beta2. Default 0.999.")
    hf.add_argument("--adam_epsilon", type=positive_float, default=1e-8, help="AdamW epsilon. Default 1e-8.")
    hf.add_argument("--save_only_model", default=False, help="Checkpoints hold the HF model only (loadable with from_pretrained; no optimizer, scheduler or data position), so they cannot be resumed. Default False.", **BOOLEAN_FLAG)
    hf.add_argument("--logging_first_step", default=False, help="Also write a metrics line after the first step. Default False.", **BOOLEAN_FLAG)
    hf.add_argument("--load_best_model_at_end", default=False, help="Keep the checkpoint with the best --metric_for_best_model out of rotation and export its weights at the end instead of the last step's (needs --save_strategy equal to --evaluation_strategy; --save_steps a multiple of --eval_steps). Default False.", **BOOLEAN_FLAG)
    hf.add_argument("--metric_for_best_model", default=None, help="Evaluation metric that picks the best checkpoint: eval_pairwise_accuracy, eval_kendall_tau, eval_top1_accuracy, eval_loss, eval_nll_best, eval_penalty, eval_penalty_active_frac (the eval_ prefix may be left out). Default eval_pairwise_accuracy.")
    hf.add_argument("--greater_is_better", default=None, help="Whether a larger --metric_for_best_model is better. Default: False for a metric ending in 'loss', else True (as HF).", **BOOLEAN_FLAG)
    hf.add_argument("--logging_dir", default=None, help="TensorBoard log directory. Default: output_dir/runs.")
    hf.add_argument("--report_to", nargs="+", default=["none"], metavar="none|tensorboard|wandb|all", help="Also log to these (space- or comma-separated): tensorboard (--logging_dir), wandb (offline when there is no login or network), all (the installed ones). Default none.")
    hf.add_argument("--run_name", default=None, help="Name of the run in TensorBoard's args and in wandb. Default: --output_dir.")
    hf.add_argument("--disable_tqdm", default=False, help="No progress bar (log lines and metrics.jsonl only). Default False.", **BOOLEAN_FLAG)
    hf.add_argument("--ddp_timeout", type=positive_int, default=1800, help="Seconds a collective may wait for the other processes before the run fails. Default 1800.")
    hf.add_argument("--dataloader_num_workers", type=number(int, low=0, what="an integer >= 0"), default=0, help="Accepted and ignored: batches are packed in the training process from token ids tokenized once at start-up (no DataLoader, no worker processes). Default 0.")
    hf.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=-1, help="Set by the deprecated torch.distributed.launch; same as its LOCAL_RANK environment variable (torchrun sets that itself). Default -1.")
    hf.add_argument("--fp16", default=False, help="Refused when True: fastalign computes in bf16 (--bf16 True) with fp32 master weights; fp16 would need loss scaling.", **BOOLEAN_FLAG)
    hf.add_argument("--push_to_hub", default=False, help="Refused when True: fastalign uploads nothing; upload --output_dir (an HF model directory) yourself.", **BOOLEAN_FLAG)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and cross-check flags; errors exit with status 2 and a message naming the flag."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.evaluation_strategy != "no" and not args.eval_data_path:
        parser.error(f"--evaluation_strategy {args.evaluation_strategy} needs --eval_data_path")
    if args.warmup_steps < 0:
        parser.error(f"argument --warmup_steps: must be >= 0, got {args.warmup_steps}")
    if args.max_steps == 0 or args.max_steps < -1:
        parser.error(f"argument --max_steps: must be > 0 (or -1 to use --num_train_epochs), got {args.max_steps}")
    if args.optim not in OPTIMIZERS:
        parser.error(f"argument --optim: fastalign always trains with AdamW; supported values: "
                     f"{', '.join(OPTIMIZERS)}; got {args.optim!r}")
    if not args.output_dir.strip():
        parser.error("argument --output_dir: must not be empty (the model would be written into the current directory)")
    output, model_dir = Path(args.output_dir).resolve(), Path(args.model_name_or_path).resolve()
    if (output == model_dir or model_dir in output.parents) and not args.allow_output_in_model_dir:
        parser.error(f"argument --output_dir: {args.output_dir} is {'' if output == model_dir else 'inside '}"
                     f"--model_name_or_path {args.model_name_or_path}; the trained model would overwrite "
                     "the base model's files. Choose another directory, or pass "
                     "--allow_output_in_model_dir True to write there anyway")
    if args.overwrite_output_dir and args.resume_from_checkpoint is not None:
        parser.error("argument --overwrite_output_dir: True deletes the checkpoints that "
                     "--resume_from_checkpoint would resume from; give only one of them")
    try:
        fdist.parse_fsdp(args.fsdp)
        args.report_to = parse_report_to(args.report_to)
        best_model.settle_flags(args)
    except ConfigError as err:
        parser.error(str(err))
    for flag in ("adam_beta1", "adam_beta2"):
        if getattr(args, flag) >= 1:
            parser.error(f"argument --{flag}: must be < 1, got {getattr(args, flag)}")
    if args.fp16:
        parser.error("argument --fp16: fastalign does not train in fp16 (it would need loss scaling); "
                     "use --bf16 True (bf16 compute, fp32 master weights; Ampere or newer GPUs)")
    if args.push_to_hub:
        parser.error(f"argument --push_to_hub: fastalign uploads nothing; after training, "
                     f"{args.output_dir} is an HF model directory: upload it with "
                     f"`huggingface-cli upload <repo_id> {args.output_dir}`")
    local_rank_env = os.environ.get("LOCAL_RANK")
    if args.local_rank >= 0 and local_rank_env is not None and int(local_rank_env) != args.local_rank:
        parser.error(f"argument --local_rank: {args.local_rank} differs from LOCAL_RANK={local_rank_env} "
                     "set by the launcher")
    args.run_name = args.run_name or args.output_dir
    if args.token_cache_dir is None:
        from fastalign.data.token_cache import default_cache_dir

        args.token_cache_dir = str(default_cache_dir())
    args.logging_dir = args.logging_dir or str(Path(args.output_dir) / "runs")
    if args.fsdp_transformer_layer_cls_to_wrap not in (None, "", *DECODER_LAYER_CLASSES):
        parser.error(f"argument --fsdp_transformer_layer_cls_to_wrap: fastalign wraps each decoder layer of "
                     f"its supported families ({', '.join(DECODER_LAYER_CLASSES)}); "
                     f"got {args.fsdp_transformer_layer_cls_to_wrap!r}")
    return args


def interval(value: float | None, total_steps: int) -> int:
    """HF's step intervals: an integer count, or a fraction (< 1) of the total steps."""
    if value is None:
        return 0
    return max(1, math.ceil(value * total_steps)) if value < 1 else int(value)


# ----------------------------------------------------------------------------- schedule


def lr_lambda_for(kind: str, warmup_steps: int, total_steps: int):
    """The multiplier of the peak LR at optimizer step `step` (0-based), as HF's schedules."""

    def factor(step: int) -> float:
        if kind == "constant":
            return 1.0
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        if kind == "constant_with_warmup":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))  # cosine

    return factor


def warmup_steps_for(args: argparse.Namespace, total_steps: int) -> int:
    return args.warmup_steps if args.warmup_steps > 0 else math.ceil(args.warmup_ratio * total_steps)


# ----------------------------------------------------------------------------- model + loss


class AlignmentModel(nn.Module):
    """Llama and the Stable Alignment loss head in one forward.

    FSDP2 gathers the root's parameters (embedding, final norm, lm_head) only around the root's
    forward; computing the loss inside it lets the loss read the gathered `lm_head.weight`.
    Returns a dict of tensors (FSDP hooks traverse dicts): loss (scalar), nll [S], penalty [G],
    best [G].
    """

    def __init__(self, llama: nn.Module, *, rating_scale: float, margin: float, ratio: float,
                 max_flow: bool, margin_mode: str, loss_backend: str):
        super().__init__()
        self.llama = llama
        self.loss_kwargs = dict(rating_scale=rating_scale, margin=margin, ratio=ratio,
                                max_flow=max_flow, margin_mode=margin_mode, backend=loss_backend)

    def forward(self, input_ids, position_ids, cu_seqlens, max_seqlen: int, targets,
                response_index, scores, group_index, num_groups: int | None = None, loss_plan=None,
                kv_index=None, cu_seqlens_k=None, max_seqlen_k: int | None = None) -> dict[str, torch.Tensor]:
        from fastalign.loss import stable_alignment_loss

        hidden = self.llama(input_ids, position_ids, cu_seqlens, max_seqlen, kv_index, cu_seqlens_k,
                            max_seqlen_k)  # [T, H]
        with region("loss_head"):
            out = stable_alignment_loss(hidden, self.llama.lm_head.weight, targets, response_index,
                                        scores, group_index, num_groups=num_groups, plan=loss_plan,
                                        **self.loss_kwargs)
        return {"loss": out.loss, "nll": out.nll, "penalty": out.penalty, "best": out.best}


PREFIX = "llama."  # AlignmentModel's parameter names = "llama." + the HF names without "model."


def run_batch(model: nn.Module, batch, loss_plan=None) -> dict[str, torch.Tensor]:
    """One micro-batch through the model and the loss; loss_plan: `loss_plan_for(batch)`, made
    from the host copy, so that the loss does not wait for the device (else it plans itself)."""
    return model(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen,
                 batch.targets, batch.response_index, batch.scores, batch.group_index,
                 num_groups=len(batch.record_indices),  # groups it holds: 1 for a filler
                 loss_plan=loss_plan,
                 kv_index=batch.kv_index, cu_seqlens_k=batch.cu_seqlens_k, max_seqlen_k=batch.max_seqlen_k)


def loss_plan_for(batch, vocab: int):
    """The loss's validated token/group plan of a (host) micro-batch: no device sync."""
    from fastalign.loss import plan_loss

    return plan_loss(batch.targets, batch.response_index, batch.scores, batch.group_index,
                     vocab=vocab, num_groups=len(batch.record_indices))


def uses_fsdp(args, env: fdist.DistEnv, plan: fdist.FsdpPlan) -> bool:
    """FSDP2 wraps the model when there is something to shard or reduce (several processes), to
    compute in bf16 over fp32 master weights (its MixedPrecisionPolicy), or to offload. One fp32
    process trains the plain module: the same numbers without gather/reduce copies."""
    return env.world_size > 1 or args.bf16 or plan.offload


def build_model(args, env: fdist.DistEnv, plan: fdist.FsdpPlan):
    """Meta-device Llama -> AC -> compile -> FSDP2 -> materialise -> load local shards.

    Returns (model, llama, attention backend).
    """
    from fastalign.hf_config import LlamaConfig
    from fastalign.hf_weights import CheckpointReader
    from fastalign.model import Llama

    if plan.offload and env.device.type != "cuda":
        raise ConfigError("--fsdp offload: needs CUDA (it keeps parameter shards in host memory "
                          "while the GPUs compute); without a GPU everything is in host memory already")
    config = LlamaConfig.from_pretrained(args.model_name_or_path)
    config.check_length(args.model_max_length)  # a sliding window shorter than the sequences: refuse now
    if args.model_max_length > config.max_position_embeddings and env.is_main:
        log.warning("--model_max_length %d is above the model's max_position_embeddings (%d): "
                    "positions past it were never trained (RoPE extrapolates poorly)",
                    args.model_max_length, config.max_position_embeddings)
    reader = CheckpointReader(args.model_name_or_path)
    with torch.device("meta"):
        llama = Llama(config)  # fp32 parameters: the master weights
    llama.check_checkpoint(reader)  # names every missing / unknown / misshapen weight up front
    backend = llama.set_attention_backend(
        args.attn_implementation, device=env.device,
        dtype=torch.bfloat16 if args.bf16 else torch.float32)
    model = AlignmentModel(llama, rating_scale=args.rating_scale, margin=args.margin,
                           ratio=args.ratio, max_flow=args.max_flow, margin_mode=args.margin_mode,
                           loss_backend=args.loss_backend)
    if args.gradient_checkpointing:
        fdist.apply_ac(llama.layers)
    if args.compile:
        fdist.apply_compile(llama.layers)
    if uses_fsdp(args, env, plan):
        mesh = fdist.build_mesh(env, plan)
        fdist.apply_fsdp(model, llama.layers, mesh,
                         param_dtype=torch.bfloat16 if args.bf16 else None,
                         reshard_after_forward=plan.reshard_after_forward, offload=plan.offload)
    model.to_empty(device="cpu" if plan.offload else env.device)
    fdist.load_sharded_weights(model, reader, prefix=PREFIX)
    llama.init_buffers()
    fdist.move_buffers(model, env.device)  # with CPU offload only the parameters stay on the host
    return model, llama, backend


def check_loss_backend(requested: str, device: torch.device) -> None:
    """Refuse --loss_backend triton at start-up where the Triton kernels cannot run (no CUDA and
    no interpreter, or no triton), rather than at the first step."""
    if requested != "triton":
        return
    from fastalign.loss import LossInputError, _resolve_backend

    try:
        _resolve_backend("triton", device)
    except LossInputError as err:
        raise ConfigError(f"--loss_backend triton: cannot run on this machine ({err}); "
                          "use --loss_backend auto or torch") from None


def loss_backend_name(requested: str, device: torch.device) -> str:
    """What `--loss_backend` runs as here (stable_alignment_loss's `auto`: Triton on CUDA only)."""
    return requested if requested != "auto" else ("triton" if device.type == "cuda" else "torch")


def build_optimizer(model: nn.Module, args) -> torch.optim.AdamW:
    """AdamW; like HF, no weight decay on biases and norm weights (the 1-D parameters)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel (one pass over each parameter's p, grad, m, v) on CUDA and on CPU (torch
    # >= 2.4; plain tensors and FSDP2's DTensor shards alike, gloo included): on CPU 3-4x faster
    # than the multi-tensor path for the 19.5 M-parameter benchmark model (25-36 vs 106 ms per
    # step, 1 thread), parameters equal to it within 6e-8 after 6 steps.
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                             eps=args.adam_epsilon, fused=True)


# ----------------------------------------------------------------------------- data


def tokenize_file(path: str, tokenizer, args):
    """Read, validate and tokenize a data file as the trainer's flags say -> (TokenizedData,
    LoadedRecords). No cache: `load_groups` wraps this in one."""
    from fastalign.data import load_records, tokenize_records

    loaded = load_records(path, rating_scale=args.rating_scale, skip_invalid=args.skip_invalid)
    tokenized = tokenize_records(loaded.records, tokenizer, model_max_length=args.model_max_length,
                                 append_eos=not args.no_append_eos, stop_response=args.stop_response)
    return tokenized, loaded


def load_groups(path: str, tokenizer: Callable[[], object], args, what: str, env: fdist.DistEnv):
    """Records -> tokenized groups, with the statistics that go into the log.

    Tokenized once per run and cached across runs (fastalign.token_cache); `tokenizer()` returns
    the tokenizer, loaded only when something has to be tokenized.
    """
    from fastalign.data.packing import packed_tokens
    from fastalign.data.token_cache import cached_groups
    from fastalign.hf_config import LlamaConfig

    def tokenize():
        tokenized, loaded = tokenize_file(path, tokenizer(), args)
        return tokenized, {"valid_records": len(loaded.records), "skipped": loaded.skipped}

    settings = {"model_max_length": args.model_max_length, "append_eos": not args.no_append_eos,
                "stop_response": args.stop_response, "rating_scale": args.rating_scale,
                "skip_invalid": args.skip_invalid}
    cache_dir = Path(args.token_cache_dir) if args.token_cache_dir not in ("", "none") else None
    tokenized, meta, how = cached_groups(tokenize, data_path=path, tokenizer_dir=args.model_name_or_path,
                                         settings=settings, cache_dir=cache_dir, rank=env.rank,
                                         broadcast=fdist.broadcast_object,
                                         vocab_size=LlamaConfig.from_pretrained(args.model_name_or_path).vocab_size)
    skipped = meta["skipped"]
    if not tokenized.groups:
        raise DataError(f"{path}: no usable {what} records (skipped: {skipped or 'none'}, "
                        f"tokenization: {tokenized.stats})")
    skipped_text = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items())) or "none"
    stats = ", ".join(f"{k}={v}" for k, v in tokenized.stats.items())
    # Over every response (before candidate sampling): what each layout runs through the layers.
    computed = sum(packed_tokens(len(g.query_ids), [len(r) for r in g.response_ids], args.share_prefix)
                   for g in tokenized.groups)
    sequences = tokenized.stats["tokens"]
    summary = (f"{what} data {path} ({how}): {meta['valid_records']} valid records, skipped {skipped_text}; "
               f"{len(tokenized.groups)} groups; {stats}; share_prefix {args.share_prefix}: "
               f"{computed} computed of {sequences} sequence tokens ({1 - computed / sequences:.1%} saved)")
    return tokenized, summary


# ----------------------------------------------------------------------------- metrics


@dataclass
class Window:
    """Statistics of the optimizer steps since the last metrics line.

    `device_sums` stays on the device (no host sync per micro-batch): [sum loss_g, sum nll_best,
    sum penalty, active penalties]; host-side counts come from the batches' shapes.
    """

    device_sums: torch.Tensor
    groups: int = 0
    tokens: int = 0  # sequence tokens: query + response per response, as the unshared layout counts
    computed_tokens: int = 0  # positions run through the layers (fewer with --share_prefix)
    tokens_x_len: int = 0  # sum over segments of Lq * (2 Lk - Lq) (= length^2 unshared; attention FLOPs)
    lr: float = 0.0  # the LR of the window's last step
    started: float = 0.0
    paused: float = 0.0  # seconds of evaluation and checkpointing inside the window (not training)

    def training_seconds(self) -> float:
        return time.perf_counter() - self.started - self.paused

    @classmethod
    def new(cls, device) -> "Window":
        return cls(torch.zeros(4, dtype=torch.float64, device=device), started=time.perf_counter())


@dataclass
class PendingLog:
    """A logging step's statistics, reduced over ranks, on their way to the host."""

    step: int
    epoch: float
    lr: float
    elapsed: float  # training seconds of the window (host clock; evaluation and saving excluded)
    values: torch.Tensor  # float64 [10 + world size], see Trainer._start_log
    ready: "torch.cuda.Event | None"  # CUDA: recorded after the copy to the host


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return tflops * 1e12
    return None


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


METRICS_FILE = "metrics.jsonl"


def _logged_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class MetricsLog:
    """metrics.jsonl (+ the --report_to integrations, fastalign.reporting) on rank 0."""

    def __init__(self, output_dir: Path, enabled: bool, args: argparse.Namespace, resume_step: int | None):
        self.enabled = enabled
        self.path = output_dir / METRICS_FILE
        self.reporters: list = []
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            # Keep the lines up to the checkpoint: the interrupted run's later lines (and a line it
            # may have left half written) are redone.
            kept = [line for line in self.path.read_text().splitlines()
                    if _logged_step(line) is not None and _logged_step(line) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.reporters = open_reporters(args.report_to, output_dir=output_dir,
                                        logging_dir=Path(args.logging_dir), run_name=args.run_name,
                                        config=vars(args))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for reporter in self.reporters:
            reporter.write(record)

    def close(self) -> None:
        """Finish the reporters (once: the trainer closes on success, main() on every exit)."""
        reporters, self.reporters = self.reporters, []
        for reporter in reporters:
            reporter.close()


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    def __init__(self, args: argparse.Namespace, env: fdist.DistEnv):
        self.args = args
        self.env = env
        self.output_dir = Path(args.output_dir)
        self.plan = fdist.parse_fsdp(args.fsdp)
        self.stop = StopOnSignal()  # main() installs it around train()
        self.metrics: MetricsLog | None = None  # setup() opens it

    # -- setup ---------------------------------------------------------------------------------

    def setup(self) -> None:
        args, env = self.args, self.env
        from fastalign.data import GroupBatcher
        from fastalign.evaluate import record_categories
        from fastalign.model_dir import load_tokenizer

        torch.manual_seed(args.seed)
        if env.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = args.tf32
            torch.backends.cudnn.allow_tf32 = args.tf32
        check_loss_backend(args.loss_backend, env.device)
        self.run_inputs = RunInputs.from_args(args)
        refuse_destroying_inputs(self.output_dir, self.run_inputs, overwrite=args.overwrite_output_dir,
                                 save_total_limit=args.save_total_limit if args.save_strategy != "no" else None,
                                 save_only_model=args.save_only_model, run_files=(METRICS_FILE,))
        ckpt.prepare_output_dir(self.output_dir, fresh_start=args.resume_from_checkpoint is None,
                                overwrite=args.overwrite_output_dir, run_files=(METRICS_FILE,))
        if args.eval_data_path and args.evaluation_strategy == "no":
            log.warning("--eval_data_path %s is unused: evaluation runs only with "
                        "--evaluation_strategy steps|epoch", args.eval_data_path)
        if args.dataloader_num_workers:
            log.info("--dataloader_num_workers %d: ignored; batches are packed in this process from "
                     "token ids tokenized at start-up (no DataLoader workers needed)",
                     args.dataloader_num_workers)
        if args.save_only_model and args.save_strategy != "no":
            log.info("--save_only_model: checkpoints hold the model only (HF format) and cannot be "
                     "resumed with --resume_from_checkpoint")

        tokenizer = functools.cache(lambda: load_tokenizer(args.model_name_or_path))  # not needed on a cache hit
        train_data, summary = load_groups(args.data_path, tokenizer, args, "train", env)
        log.info("%s", summary)
        self.batcher = GroupBatcher(
            train_data, num_comp=args.num_comp, seed=args.seed, batch_size=args.per_device_train_batch_size,
            step_token_budget=step_token_budget(args.max_tokens_per_batch, env.device,
                                                batch_size=args.per_device_train_batch_size,
                                                num_comp=args.num_comp, model_max_length=args.model_max_length),
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            world_size=env.world_size, rank=env.rank, shuffle=True, share_prefix=args.share_prefix,
            seed_compat=args.margin_mode == "seed")  # the original collator's order and int() scores
        self.input_digests = resume_inputs.recorded_inputs(args, self.batcher.step_token_budget, rank=env.rank,
                                                           broadcast=fdist.broadcast_object)
        self.eval_batcher = None
        if args.evaluation_strategy != "no":
            eval_data, summary = load_groups(args.eval_data_path, tokenizer, args, "eval", env)
            log.info("%s", summary)
            self.eval_batcher = GroupBatcher(
                eval_data, num_comp=args.num_comp, seed=args.seed,
                batch_size=args.per_device_eval_batch_size, gradient_accumulation_steps=1,
                world_size=env.world_size, rank=env.rank, shuffle=False, share_prefix=args.share_prefix,
                seed_compat=args.margin_mode == "seed")
            self.eval_categories = (record_categories(args.eval_data_path, rating_scale=args.rating_scale,
                                                      skip_invalid=args.skip_invalid) if env.is_main else {})

        self.total_steps = self._total_steps()
        self.logging_steps = interval(args.logging_steps, self.total_steps)
        self.save_steps = interval(args.save_steps, self.total_steps)
        self.eval_steps = interval(args.eval_steps, self.total_steps) or self.logging_steps
        self.best = None  # --load_best_model_at_end: the best checkpoint so far
        if args.load_best_model_at_end:
            best_model.check_intervals(self.save_steps, self.eval_steps, args.save_strategy)
            self.best = best_model.BestCheckpoint(args.metric_for_best_model, args.greater_is_better)

        self.model, self.llama, attn_backend = build_model(args, env, self.plan)
        config = self.llama.config
        # FLOPs of a sequence of length s: s * flops_per_token(s), linear in s, so a micro-batch
        # needs only sum(s) and sum(s^2). Counted on the unsharded model.
        self.flops_per_token = config.flops_per_token(0)
        self.flops_per_token_x_len = config.flops_per_token(1) - config.flops_per_token(0)
        self.peak_flops = peak_flops(env.device)

        self.optimizer = build_optimizer(self.model, args)
        warmup = warmup_steps_for(args, self.total_steps)
        self.lr_lambda = lr_lambda_for(args.lr_scheduler_type, warmup, self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_lambda)

        log.info(
            "world size %d (%s on %s), fsdp %s%s, %s parameters, dtype: fp32 master weights, %s "
            "compute, fp32 gradient reduction, attention: %s, loss backend: %s, activation "
            "checkpointing %s, compile %s",
            env.world_size, env.backend, env.device.type,
            self.plan.strategy if uses_fsdp(args, env, self.plan) else "off (one fp32 process: plain module)",
            " + cpu offload" if self.plan.offload else "", f"{config.num_parameters():,}",
            "bf16" if args.bf16 else "fp32", attn_backend,
            loss_backend_name(args.loss_backend, env.device),
            "on" if args.gradient_checkpointing else "off", "on" if args.compile else "off")
        budget = self.batcher.step_token_budget
        log.info("%d optimizer steps (%d in epoch 0; %d groups x %d processes per step, %s), "
                 "warmup %d, %s schedule, logging every %d, %s", self.total_steps,
                 self.batcher.steps_per_epoch(0), args.per_device_train_batch_size * args.gradient_accumulation_steps,
                 env.world_size, f"packed into micro-batches of <= {budget} tokens" if budget
                 else f"{args.gradient_accumulation_steps} micro-batches of {args.per_device_train_batch_size} groups",
                 warmup, args.lr_scheduler_type, self.logging_steps,
                 f"checkpoint every {self.save_steps} steps" if args.save_strategy == "steps"
                 else f"checkpoint {'each epoch' if args.save_strategy == 'epoch' else 'never'}")

        self.position = (0, 0, 0)  # (global step, epoch, step in epoch) of the next step
        # Collective: every rank gets rank 0's pick (the newest checkpoint that verifies) or error.
        resume = ckpt.resolve_resume(args.resume_from_checkpoint, self.output_dir)
        if resume is not None:
            self._check_resumable(resume, ckpt.read_trainer_state(resume))
            state = ckpt.load_checkpoint(resume, self.model, self.optimizer, self.scheduler)
            ckpt.start_branch(self.output_dir, state["step"], resume, self.run_inputs)  # later ones: abandoned
            self.position = (state["step"], state["epoch"], state["step_in_epoch"])
            if state["step_in_epoch"] > self.batcher.steps_per_epoch(state["epoch"]):
                self.position = (state["step"], state["epoch"] + 1, 0)  # changed data, shorter epoch
            if self.best is not None:
                self.best.restore(state.get(best_model.STATE_KEY))
            planned = state.get("total_steps", state.get("batch_layout", {}).get("total_steps"))
            if planned is not None and planned != self.total_steps:
                log.warning("resuming a run planned for %s steps as a run of %d steps: the LR "
                            "schedule from step %d on is computed for the new total",
                            planned, self.total_steps, state["step"])
            # The LR is a closed form of the step: recompute it for this run's total and this run's
            # --learning_rate / --weight_decay (the loaded param groups carry the checkpoint's, so
            # resuming with a lower learning rate after a divergence takes effect).
            decay_group, _ = self.optimizer.param_groups
            decay_group["weight_decay"] = args.weight_decay
            for group in self.optimizer.param_groups:
                group["initial_lr"] = args.learning_rate
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_lambda,
                                                               last_epoch=state["step"] - 1)
            log.info("resumed from %s at step %d (epoch %d, step %d of the epoch)", resume, *self.position)
        elif args.resume_from_checkpoint is not None:
            log.info("--resume_from_checkpoint %s: no checkpoint in %s, starting fresh",
                     args.resume_from_checkpoint, self.output_dir)
        self.metrics = MetricsLog(self.output_dir, env.is_main, args,
                                  self.position[0] if resume is not None else None)

    def _total_steps(self) -> int:
        """--max_steps, or HF's ceil(num_train_epochs x steps per epoch)."""
        if self.args.max_steps > 0:
            return self.args.max_steps
        epochs = self.args.num_train_epochs
        whole = int(epochs)
        total = sum(self.batcher.steps_per_epoch(e) for e in range(whole))
        total += math.ceil((epochs - whole) * self.batcher.steps_per_epoch(whole)) if epochs > whole else 0
        return max(1, total)

    def _batch_layout(self) -> dict:
        """What fixes the sequence of batches: a resumed run must match it exactly."""
        a = self.args
        return {"world_size": self.env.world_size, "gradient_accumulation_steps": a.gradient_accumulation_steps,
                "per_device_train_batch_size": a.per_device_train_batch_size,
                # not --max_tokens_per_batch / --share_prefix: they change how a step is computed,
                # not which groups it holds
                "num_comp": a.num_comp, "seed": a.seed,
                "steps_in_epoch_0": self.batcher.steps_per_epoch(0)}

    def _check_resumable(self, resume: Path, state: dict) -> None:
        """Refuse to continue on other batches than the checkpoint's (fastalign.resume_inputs)."""
        for warning in resume_inputs.check(state, resume, layout=self._batch_layout(), inputs=self.input_digests,
                                           allow_data_change=self.args.allow_data_change):
            if self.env.is_main:
                log.warning("%s", warning)

    # -- the loop --------------------------------------------------------------------------------

    def train(self) -> None:
        from tqdm import tqdm

        step = self.position[0]
        # disable=None: no bar when stderr is not a terminal (a log file gets the log lines only)
        bar = tqdm(total=self.total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
                   disable=True if not self.env.is_main or self.args.disable_tqdm else None)
        try:
            with StepProfiler(self.args.profile_steps, self.output_dir, self.env.rank) as self.profiler:
                step = self._loop(bar)
        finally:  # also on an error: the message that follows must not land on the bar's line
            bar.close()
        self._check_finite(self.nonfinite, step)
        if self.best is not None:
            best_model.load_for_export(self.best, self.output_dir, self.model, PREFIX, step)
        log.info("training done at step %d; writing the model to %s", step, self.output_dir)
        ckpt.export_hf(self.model, self.llama.config, self.output_dir, self.args.model_name_or_path,
                       prefix=PREFIX)
        self.metrics.close()

    def _loop(self, bar) -> int:
        """The optimizer steps from self.position to the total; returns the last step's number."""
        args, env = self.args, self.env
        step, epoch, first = self.position
        window = Window.new(env.device)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=env.device)
        pending: PendingLog | None = None  # CUDA: a logging step's numbers, read one step later
        while step < self.total_steps:
            steps_in_epoch = self.batcher.steps_per_epoch(epoch)
            for opt_step in self.profiler.data(self.batcher.iter_steps(epoch, first)):
                if step >= self.total_steps:
                    break
                grad_norm = self._train_step(opt_step, window)
                self.nonfinite |= ~torch.isfinite(grad_norm)
                step += 1
                bar.update(1)
                done_in_epoch = opt_step.step_in_epoch + 1
                epoch_done = done_in_epoch == steps_in_epoch
                epoch_float = epoch + done_in_epoch / steps_in_epoch
                if (step % self.logging_steps == 0 or step == self.total_steps
                        or (args.logging_first_step and step == 1)):
                    current = self._start_log(step, epoch_float, window, grad_norm, self.nonfinite)
                    window = Window.new(env.device)
                    if pending is not None:
                        self._finish_log(pending, bar)
                        pending = None
                    if current.ready is None:  # gloo on CPU: the numbers are on the host already
                        self._finish_log(current, bar)
                    else:
                        pending = current
                evaluate = self.eval_batcher is not None and (
                    (args.evaluation_strategy == "steps" and step % self.eval_steps == 0)
                    or (args.evaluation_strategy == "epoch" and epoch_done))
                save = (args.save_strategy == "steps" and step % self.save_steps == 0) or (
                    args.save_strategy == "epoch" and epoch_done)
                if pending is not None and (evaluate or save):  # they sync anyway; keep lines in order
                    self._finish_log(pending, bar)
                    pending = None
                paused = time.perf_counter()  # evaluation and saving are not training time
                next_position = (epoch + 1, 0) if epoch_done else (epoch, done_in_epoch)
                with region(PAUSED):
                    eval_record = self._evaluate(step, epoch_float) if evaluate else None
                    if save:
                        if self.best is not None and eval_record is not None:
                            self.best.offer(step, eval_record)
                        self._save(step, next_position, self.nonfinite)
                self.profiler.step()  # writing a finished profile is not training time either
                window.paused += time.perf_counter() - paused
                if signum := self.stop.requested():  # SIGTERM/SIGINT on any rank
                    if pending is not None:
                        self._finish_log(pending, bar)
                    self._stop_on_signal(signum, step, next_position, self.nonfinite, saved=save)
            epoch, first = epoch + 1, 0
        if pending is not None:
            self._finish_log(pending, bar)
        return step

    def _train_step(self, opt_step, window: Window) -> torch.Tensor:
        """Forward+backward every micro-batch, clip, update. Returns the (device) grad norm.

        Each micro-batch's loss (the mean over its groups) is scaled by its share of the global
        batch's groups, so the gradient is that of the mean over all groups of the step on all
        ranks. FSDP averages gradients over ranks; the world-size factor undoes that average.
        """
        env = self.env
        scale = env.world_size / opt_step.global_groups
        # All of the step's (small) index tensors are queued for the device up front, with the
        # loss's plan of each, made on the host: no micro-batch waits for the device before its
        # forward is queued.
        vocab = self.llama.config.vocab_size
        with region("data"):
            on_device = [b.to(env.device, non_blocking=True) for b in opt_step.micro_batches]
            plans = [loss_plan_for(b, vocab).to(env.device, non_blocking=True)
                     for b in opt_step.micro_batches]
        last = len(on_device) - 1  # the same on every rank: fillers keep the counts equal
        for index, (host_batch, batch, plan) in enumerate(zip(opt_step.micro_batches, on_device,
                                                               plans)):
            fdist.set_gradient_all_reduce(self.model, self.plan, enabled=index == last)
            if batch.num_groups:  # real tokens only: a filler batch's work is thrown away
                window.tokens += host_batch.sequence_tokens
                window.computed_tokens += host_batch.computed_tokens
                window.tokens_x_len += host_batch.attention_work
            try:
                with region("forward"):
                    out = run_batch(self.model, batch, plan)
                with region("backward"):
                    (out["loss"] * (batch.num_groups * scale)).backward()
            except torch.OutOfMemoryError as err:
                raise FastalignError(
                    f"out of memory on rank {env.rank} in a micro-batch of {batch.num_tokens} tokens: "
                    "lower --max_tokens_per_batch or --per_device_train_batch_size, or use "
                    "--gradient_checkpointing True or more processes. "
                    f"The last complete checkpoint in {self.output_dir} is intact.") from err
            if batch.num_groups:  # filler micro-batches (num_groups 0) only keep collectives matched
                window.device_sums += group_sums(out, batch.num_groups)
                window.groups += batch.num_groups
        with region("optimizer"):
            params = [p for p in self.model.parameters() if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            if isinstance(grad_norm, DTensor):
                grad_norm = grad_norm.full_tensor()
            if self.args.max_grad_norm > 0:
                torch.nn.utils.clip_grads_with_norm_(params, self.args.max_grad_norm, grad_norm)
            window.lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return grad_norm.to(env.device, non_blocking=True)  # CPU-offloaded grads: norm on the host

    def _start_log(self, step: int, epoch: float, window: Window, grad_norm: torch.Tensor,
                   nonfinite: torch.Tensor) -> "PendingLog":
        """Reduce the window's statistics over ranks in one collective and start their copy to the
        host. On CUDA nothing here waits for the device: `_finish_log` reads the numbers after the
        next step has been queued, so logging (even every step) leaves no bubble on the GPU."""
        env = self.env
        memory = [0.0] * env.world_size  # each rank fills its own slot: the sum gathers them
        memory[env.rank] = peak_memory_gb(env.device)
        host = torch.tensor([window.groups, window.tokens, window.computed_tokens, window.tokens_x_len, *memory],
                            dtype=torch.float64, device=env.device)
        sums = torch.cat([window.device_sums, grad_norm.double().view(1) / env.world_size,
                          nonfinite.double().view(1), host])
        dist.all_reduce(sums)  # NCCL: queued on the stream, the host goes on
        ready = None
        if env.device.type == "cuda":
            sums = sums.to("cpu", non_blocking=True)  # into pinned memory
            ready = torch.cuda.Event()
            ready.record()
        return PendingLog(step=step, epoch=epoch, lr=window.lr,
                          elapsed=window.training_seconds(), values=sums, ready=ready)

    def _finish_log(self, pending: "PendingLog", bar) -> None:
        """Write the metrics line of a logging step; NaN/inf stops the run."""
        if pending.ready is not None:
            pending.ready.synchronize()
        values = pending.values.tolist()
        loss, nll_best, penalty, active, grad_norm, bad, groups, tokens, computed, tokens_x_len = values[:10]
        if bad or not math.isfinite(loss):
            self._fail_nonfinite(pending.step)
        tokens_per_s = tokens / pending.elapsed if pending.elapsed > 0 else 0.0
        mfu = None
        if self.peak_flops and computed:  # the FLOPs actually run: computed tokens, not sequence tokens
            flops = self.flops_per_token * computed + self.flops_per_token_x_len * tokens_x_len
            mfu = flops / pending.elapsed / (self.peak_flops * self.env.world_size)
        record = {
            "step": pending.step,
            "epoch": round(pending.epoch, 4),
            "loss": loss / groups,
            "nll_best": nll_best / groups,
            "penalty": penalty / groups,
            "penalty_active_frac": active / groups,
            "lr": pending.lr,
            "grad_norm": grad_norm,
            "tokens_per_s": round(tokens_per_s, 1),
            "sequence_tokens": int(tokens),
            "computed_tokens": int(computed),
            "mfu": mfu,
            "peak_mem_gb": round(max(values[10:]), 3),
        }
        self.metrics.write(record)
        log.info("%s", format_metrics_line(record, self.total_steps))
        bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{tokens_per_s:.0f}")

    def _check_finite(self, nonfinite: torch.Tensor, step: int) -> None:
        """Before a checkpoint or the export: stop if a logged loss / grad norm was non-finite or
        if the weights are (an update can overflow after a finite gradient), on any rank."""
        weights_bad = fdist.local_shards_nonfinite(self.model).to(self.env.device)
        flag = (nonfinite | weights_bad).double().view(1)
        dist.all_reduce(flag)
        if flag.item():
            self._fail_nonfinite(step)

    def _fail_nonfinite(self, step: int) -> None:
        last = ckpt.latest_checkpoint(self.output_dir)
        raise FastalignError(
            f"the loss, gradient norm or weights became NaN/inf by step {step}; stopped without saving. "
            + (f"The last good checkpoint is {last}." if last else "No checkpoint was written.")
            + " Try a lower --learning_rate or check the data and model weights.")

    @torch.no_grad()
    def _evaluate(self, step: int, epoch: float) -> dict:
        """eval_loss & co. and the ranking metrics of fastalign.evaluate, from one forward per
        micro-batch; written to the metrics and returned (the same on every rank)."""
        from fastalign.evaluate import ranking_record, score_batch

        env = self.env
        sums = torch.zeros(4, dtype=torch.float64, device=env.device)
        groups = 0
        scored = []  # (host batch, device nll [S]): read once, after the last forward is queued
        for opt_step in self.eval_batcher.iter_steps(0):
            for batch in opt_step.micro_batches:
                out = run_batch(self.model, batch.to(env.device))  # fillers too: collectives match
                if batch.num_groups:
                    sums += group_sums(out, batch.num_groups)
                    groups += batch.num_groups
                    scored.append((batch, out["nll"]))
        if isinstance(self.model, FSDPModule):
            self.model.reshard()  # the root stays gathered after a forward without backward
        sums = torch.cat([sums, torch.tensor([float(groups)], dtype=torch.float64, device=env.device)])
        dist.all_reduce(sums)
        loss, nll_best, penalty, active, groups = sums.tolist()
        results = [r for batch, nll in scored for r in score_batch(batch, nll)]
        gathered: list = [None] * env.world_size
        dist.all_gather_object(gathered, results)
        results = sorted((r for part in gathered for r in part), key=lambda r: r.index)
        for result in results:  # rank 0 knows the categories (per-category keys: its lines only)
            result.category = self.eval_categories.get(result.index)
        record = {"step": step, "epoch": round(epoch, 4),
                  "eval_loss": loss / groups, "eval_nll_best": nll_best / groups,
                  "eval_penalty": penalty / groups, "eval_penalty_active_frac": active / groups,
                  **ranking_record(results)}
        self.metrics.write(record)
        log.info("%s", format_metrics_line(record, self.total_steps))
        return record

    def _save(self, step: int, next_position: tuple[int, int], nonfinite: torch.Tensor) -> None:
        self._check_finite(nonfinite, step)  # never checkpoint non-finite weights
        state = {"step": step, "epoch": next_position[0], "step_in_epoch": next_position[1],
                 "total_steps": self.total_steps, "batch_layout": self._batch_layout(),
                 resume_inputs.INPUTS_KEY: self.input_digests, "args": vars(self.args)}
        best = None
        if self.best is not None:
            state[best_model.STATE_KEY] = self.best.state()
            best = self.best.path(self.output_dir)
        if self.args.save_only_model:
            path = ckpt.save_model_only_checkpoint(
                self.output_dir, step, self.model, self.llama.config, self.args.model_name_or_path,
                state, prefix=PREFIX, save_total_limit=self.args.save_total_limit, best=best)
            log.info("saved %s (model only)", path)
            return
        path = ckpt.save_checkpoint(self.output_dir, step, self.model, self.optimizer, self.scheduler,
                                    state, save_total_limit=self.args.save_total_limit, best=best)
        log.info("saved %s", path)

    def _stop_on_signal(self, signum: int, step: int, next_position: tuple[int, int],
                        nonfinite: torch.Tensor, saved: bool) -> None:
        """After the step a signal arrived in: checkpoint it (unless --save_strategy no) and stop."""
        if self.args.save_strategy != "no" and not saved:
            self._save(step, next_position, nonfinite)
        model_only = ckpt.list_model_only_checkpoints(self.output_dir) if self.args.save_only_model else []
        last = ckpt.latest_checkpoint(self.output_dir)
        if model_only:
            where = (f"the last checkpoint is {model_only[-1]}, model only (--save_only_model): it cannot be "
                     f"resumed; load it with from_pretrained, or start a new run from it with "
                     f"--model_name_or_path {model_only[-1]}")
        elif last:
            where = (f"the last checkpoint is {last}; continue with --resume_from_checkpoint auto "
                     f"(same --output_dir) or --resume_from_checkpoint {last}")
        else:
            where = "no checkpoint was written (--save_strategy no): a new run starts from step 0"
        raise Stopped(f"{signal.Signals(signum).name} received: stopped after step {step} of "
                      f"{self.total_steps}; {where}", signum)


def group_sums(out: dict[str, torch.Tensor], num_groups: int) -> torch.Tensor:
    """float64 [4] on the device: sum of loss_g, of nll_best, of penalty, active penalties."""
    penalty = out["penalty"].detach().double()
    return torch.stack([out["loss"].detach().double() * num_groups,
                        out["nll"].detach().double()[out["best"]].sum(),
                        penalty.sum(), (penalty > 0).double().sum()])


# ----------------------------------------------------------------------------- entry point


_PEER_FAILURE_HINTS = ("connection reset", "connection closed", "broken pipe", "socket timeout",
                       "timed out", "nccl", "gloo")


def is_peer_failure(err: BaseException) -> bool:
    """A collective failed because another process died or hung (not a bug in this one)."""
    if isinstance(err, dist.DistError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(hint in text for hint in _PEER_FAILURE_HINTS)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.local_rank >= 0:  # torch.distributed.launch without --use-env passes only the flag
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    env = fdist.init_distributed(timeout_minutes=args.ddp_timeout / 60,
                                 cpu_collectives=fdist.parse_fsdp(args.fsdp).offload)
    setup_logging(env.is_main)
    trainer = Trainer(args, env)
    lock = hold_output_dir(args.output_dir)  # one run per directory, before anything in it changes
    try:
        trainer.setup()
        with trainer.stop:
            trainer.train()
    except (RuntimeError, dist.DistError) as err:
        if env.world_size == 1 or not is_peer_failure(err):
            raise
        last = ckpt.latest_checkpoint(args.output_dir)
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FastalignError(
            f"rank {env.rank}: a collective with the other processes failed, most likely because "
            f"another rank died (see its own error above/below; torchrun names it): {first_line}. "
            + (f"The last complete checkpoint is {last}; " if last else "No checkpoint was completed; ")
            + "restart with --resume_from_checkpoint auto.") from err
    finally:
        # On every exit, stopped and failed runs too: the process may end through os._exit
        # (cli.exit_process), which runs no atexit handler, so wandb/TensorBoard finish here.
        if trainer.metrics is not None:
            trainer.metrics.close()
        lock.release()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    exit_process(run_main(main))
