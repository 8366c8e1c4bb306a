"""The trainer's command line: the parser, its cross-checks, and the typed `TrainConfig` built once
from the flags (docs/design.md)."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fastalign import best_model
from fastalign import distributed as fdist
from fastalign.attention import BACKENDS as ATTN_BACKENDS
from fastalign.cli import BOOLEAN_FLAG, nonneg_float, number, positive_float, positive_int
from fastalign.errors import ConfigError
from fastalign.reporting import parse_report_to

if TYPE_CHECKING:
    import torch

# fastalign.data.token_cache is imported where used: a refused flag does not pay for it.

LR_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
STRATEGIES = ("no", "steps", "epoch")
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")  # --optim values that mean AdamW (all fastalign runs)
# --fsdp_transformer_layer_cls_to_wrap values: each family's transformers layer class (all wrap DecoderLayer)
DECODER_LAYER_CLASSES = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")


# --max_tokens_per_batch when not given on CPU: a CPU core set is saturated by a few thousand tokens
# (the CPU figures in benchmarks/RESULTS.md were measured with it).
DEFAULT_CPU_STEP_TOKENS = 4096


def step_token_budget(flag: int | None, device: torch.device, *, batch_size: int, num_comp: int,
                      model_max_length: int) -> int | None:
    """The GroupBatcher step budget for --max_tokens_per_batch: None (0) turns step packing off.
    Not given on a GPU: the original approach's own padded micro-batch, batch_size x num_comp x
    model_max_length tokens. One pass then never holds more tokens than a pass of the original
    command, which ran on the same GPUs (a larger fixed budget would pack the published run's 8 groups
    into one pass that does not fit: benchmarks/RESULTS.md, "Estimate"), while shorter groups still
    share a pass."""
    if flag is None:
        return DEFAULT_CPU_STEP_TOKENS if device.type == "cpu" else batch_size * num_comp * model_max_length
    return flag or None


# --save_steps / --logging_steps: a count of optimizer steps, or below 1 a fraction of the total
interval_steps = number(float, low=0.0, low_open=True, what="a number > 0 (< 1: a fraction of the total steps)")
unit_interval = number(float, low=0.0, high=1.0, what="a number in [0, 1)")  # AdamW betas (1 checked in parse_args)


@dataclass
class TrainConfig:
    """Every flag of `build_parser`, typed, as `parse_args` settles them (defaults filled in, cross-checked).
    `vars(config)` is the flags as a dict: the checkpoints' trainer_state "args" and the reporters' config."""

    # flags of the original train_alignment.py command
    model_name_or_path: str
    data_path: str
    output_dir: str
    bf16: bool
    num_train_epochs: float
    per_device_train_batch_size: int
    per_device_eval_batch_size: int
    gradient_accumulation_steps: int
    evaluation_strategy: str  # one of STRATEGIES
    save_strategy: str  # one of STRATEGIES
    save_steps: float  # a count of optimizer steps, or below 1 a fraction of the total (`interval`)
    save_total_limit: int | None
    learning_rate: float
    weight_decay: float
    warmup_ratio: float
    lr_scheduler_type: str  # one of LR_SCHEDULERS
    logging_steps: float  # as save_steps
    fsdp: str  # HF's option words: fdist.parse_fsdp reads them
    fsdp_transformer_layer_cls_to_wrap: str | None
    tf32: bool
    model_max_length: int
    rating_scale: float
    margin: float
    max_flow: bool
    ratio: float
    optim: str  # one of OPTIMIZERS
    cache_dir: str | None
    overwrite_output_dir: bool
    num_comp: int
    # fastalign flags
    seed: int
    max_steps: int  # -1: --num_train_epochs decides
    max_tokens_per_batch: int | None  # None: the device default of `step_token_budget`; 0: no step packing
    share_prefix: bool
    gradient_checkpointing: bool
    compile: bool
    attn_implementation: str
    loss_backend: str
    margin_mode: str
    skip_invalid: bool
    stop_response: bool
    no_append_eos: bool
    resume_from_checkpoint: str | None  # a checkpoint directory or "auto"
    allow_data_change: bool
    max_grad_norm: float
    warmup_steps: int
    eval_data_path: str | None
    allow_output_in_model_dir: bool
    eval_steps: float | None  # None: --logging_steps
    profile_steps: int
    token_cache_dir: str  # "none" or "": no cache
    # HF Trainer flags
    adam_beta1: float
    adam_beta2: float
    adam_epsilon: float
    save_only_model: bool
    logging_first_step: bool
    load_best_model_at_end: bool
    metric_for_best_model: str  # with its eval_ prefix
    greater_is_better: bool
    logging_dir: str
    report_to: list[str]  # the reporters' names, "none" resolved away
    run_name: str
    disable_tqdm: bool
    ddp_timeout: int  # seconds
    dataloader_num_workers: int
    local_rank: int
    fp16: bool
    push_to_hub: bool
    # LoRA (TRL ModelConfig flags; fastalign.lora)
    use_peft: bool
    lora_r: int
    lora_alpha: float
    lora_dropout: float
    lora_target_modules: list[str] | None  # None: fastalign.lora.DEFAULT_TARGETS
    lora_modules_to_save: list[str] | None
    use_rslora: bool
    load_in_4bit: bool
    load_in_8bit: bool


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
    orig.add_argument("--model_name_or_path", required=True,
                      help="HF model directory: Llama, Mistral, Qwen2 or Qwen3 (config.json, safetensors or .bin "
                           "weights, tokenizer).")
    orig.add_argument("--data_path", required=True, help="Sandbox records: JSON array or JSONL (.gz welcome).")
    orig.add_argument("--output_dir", required=True,
                      help="Where metrics.jsonl, checkpoint-<step>/ and the final HF model go. Must not be empty, nor "
                           "--model_name_or_path or a directory inside it (unless --allow_output_in_model_dir True). "
                           "One run at a time: a run holds OUTPUT_DIR/.fastalign.lock and a second trainer there is "
                           "refused.")
    orig.add_argument("--bf16", default=False,
                      help="bf16 compute with fp32 master weights and fp32 gradient reduction (FSDP2 "
                           "MixedPrecisionPolicy).", **BOOLEAN_FLAG)
    orig.add_argument("--num_train_epochs", type=positive_float, default=3.0,
                      help="Epochs (fractions allowed); ignored when --max_steps > 0. Default 3.")
    orig.add_argument("--per_device_train_batch_size", type=positive_int, default=8,
                      help="Groups (query + its responses) per micro-batch per process. Default 8 (HF).")
    orig.add_argument("--per_device_eval_batch_size", type=positive_int, default=8,
                      help="Groups per evaluation micro-batch per process. Default 8.")
    orig.add_argument("--gradient_accumulation_steps", type=positive_int, default=1,
                      help="Micro-batches per optimizer step per process. Default 1.")
    orig.add_argument("--evaluation_strategy", "--eval_strategy", dest="evaluation_strategy",
                      choices=STRATEGIES, default="no",
                      help="Evaluate on --eval_data_path every --eval_steps (steps) or each epoch. Default no.")
    orig.add_argument("--save_strategy", choices=STRATEGIES, default="steps",
                      help="Write a resumable checkpoint every --save_steps (steps), each epoch, or never (no). "
                           "Default steps.")
    orig.add_argument("--save_steps", type=interval_steps, default=500,
                      help="Optimizer steps between checkpoints (< 1: fraction of total steps). Default 500.")
    orig.add_argument("--save_total_limit", type=positive_int, default=None,
                      help="Keep at most this many checkpoints (oldest deleted). Default: keep all.")
    orig.add_argument("--learning_rate", type=nonneg_float, default=5e-5,
                      help="Peak AdamW learning rate. Default 5e-5.")
    orig.add_argument("--weight_decay", type=nonneg_float, default=0.0,
                      help="AdamW weight decay (not applied to norms and biases, as HF). Default 0.")
    orig.add_argument("--warmup_ratio", type=number(float, low=0.0, high=1.0, what="a number in [0, 1]"), default=0.0,
                      help="Linear warmup over ceil(ratio * total steps). Default 0.")
    orig.add_argument("--lr_scheduler_type", choices=LR_SCHEDULERS, default="linear",
                      help="Decay after warmup. Default linear.")
    orig.add_argument("--logging_steps", type=interval_steps, default=500,
                      help="Optimizer steps between metrics.jsonl lines (< 1: fraction of total). Default 500.")
    orig.add_argument("--fsdp", default="",
                      help="HF FSDP options, e.g. 'full_shard auto_wrap'. full_shard: FSDP2, params re-gathered in "
                           "backward; shard_grad_op: kept gathered forward->backward; hybrid_shard[_zero2]: shard per "
                           "node, replicate across nodes; no_shard or empty: replicate; offload: CPU offload; "
                           "auto_wrap: always on (one FSDP unit per decoder layer). Default empty.")
    orig.add_argument("--fsdp_transformer_layer_cls_to_wrap", default=None,
                      help="Accepted for compatibility when it names the family's decoder layer (LlamaDecoderLayer, "
                           "MistralDecoderLayer, Qwen2DecoderLayer, Qwen3DecoderLayer): fastalign always wraps each "
                           "decoder layer as one FSDP unit.")
    orig.add_argument("--tf32", default=False,
                      help="Allow TF32 matmuls on CUDA (fp32 parts of the computation). Default False (as HF; the "
                           "published command passes True).", **BOOLEAN_FLAG)
    orig.add_argument("--model_max_length", type=positive_int, default=512,
                      help="Longest query+response in tokens; responses are cut from the end. Default 512.")
    orig.add_argument("--rating_scale", type=positive_float, default=7.0,
                      help="Highest rating; also validates scores (1..rating_scale). Default 7.")
    orig.add_argument("--margin", type=float, default=1.0,
                      help="Margin multiplier m in (s_best - s_j)/rating_scale * m. Default 1.")
    orig.add_argument("--max_flow", default=False,
                      help="Penalty = max over the other responses instead of their mean. "
                           "Default False.", **BOOLEAN_FLAG)
    orig.add_argument("--ratio", type=nonneg_float, default=0.5,
                      help="Weight of the penalty term. Default 0.5 (as the original script; its published command "
                           "passes 0.2).")
    orig.add_argument("--optim", default="adamw_torch",
                      help=f"HF optimizer name; fastalign always trains with AdamW, so only {' / '.join(OPTIMIZERS)} "
                           "are accepted. Default adamw_torch.")
    orig.add_argument("--cache_dir", default=None,
                      help="Accepted for compatibility and ignored: fastalign reads --model_name_or_path from a local "
                           "directory and caches nothing.")
    orig.add_argument("--overwrite_output_dir", default=False,
                      help="Delete --output_dir's checkpoint-* directories and metrics.jsonl before a fresh start "
                           "(unlike HF, which deletes nothing). Without it a fresh start into a directory holding "
                           "checkpoints stops with an error. Refused (nothing deleted) when the model or a data file "
                           "lies in what it would delete. Default False.", **BOOLEAN_FLAG)
    orig.add_argument("--num_comp", type=positive_int, default=3,
                      help="Responses per query used in a step (sampled, seeded, when a record has more). Default 3.")

    own = parser.add_argument_group("fastalign flags")
    own.add_argument("--seed", type=int, default=42, help="Seed for shuffling and candidate sampling. Default 42.")
    own.add_argument("--max_steps", type=int, default=-1,
                     help="Total optimizer steps; overrides --num_train_epochs when > 0. Default -1.")
    own.add_argument("--max_tokens_per_batch", type=number(int, low=0, what="an integer >= 0"), default=None,
                     help="Step-level packing: the groups of one optimizer step on a process "
                          "(per_device_train_batch_size x gradient_accumulation_steps) are cut into as few "
                          "micro-batches of at most this many packed tokens as fit (a larger group goes alone); the "
                          "step's groups and loss do not change. 0: one micro-batch per --per_device_train_batch_size "
                          f"groups (the original's passes). Default {DEFAULT_CPU_STEP_TOKENS} on CPU; on CUDA "
                          "per_device_train_batch_size x num_comp x model_max_length (the original's padded "
                          "micro-batch, so no pass holds more tokens than one of its passes).")
    own.add_argument("--share_prefix", default=True,
                     help="Pack each group's query once and let every response attend to it (same loss, nll and "
                          "gradients as query+response per response, fewer tokens computed); False: one query+response "
                          "sequence per response. Default True.", **BOOLEAN_FLAG)
    own.add_argument("--gradient_checkpointing", default=False,
                     help="Recompute each decoder layer in backward (less memory, ~30%% more compute). "
                          "Default False.", **BOOLEAN_FLAG)
    own.add_argument("--compile", default=False,
                     help="torch.compile each decoder layer. Default False.", **BOOLEAN_FLAG)
    own.add_argument("--attn_implementation",
                     choices=("auto",) + ATTN_BACKENDS + ("flash_attention_2",), default="auto",
                     help="Packed attention backend; auto: flash_attn, then torch_varlen, then sdpa. Default auto.")
    own.add_argument("--loss_backend", choices=("auto", "triton", "torch"), default="auto",
                     help="Loss head: fused Triton kernel or its PyTorch twin; auto: triton on CUDA. Default auto.")
    own.add_argument("--margin_mode", choices=("paper", "seed"), default="paper",
                     help="paper: margin from each response's own rating; seed: the original code's index pairing "
                          "(reproduces the released model). Default paper.")
    own.add_argument("--skip_invalid", default=False,
                     help="Drop invalid records (counted per reason) instead of stopping. "
                          "Default False.", **BOOLEAN_FLAG)
    own.add_argument("--stop_response", default=False,
                     help="Cut responses at the first '\\n\\nHuman:' / '\\n\\nAssistant:' marker. "
                          "Default False.", **BOOLEAN_FLAG)
    own.add_argument("--no_append_eos", default=False,
                     help="Do not append EOS to responses. Default False.", **BOOLEAN_FLAG)
    own.add_argument("--resume_from_checkpoint", default=None, metavar="PATH|auto",
                     help="Resume from a checkpoint-<step> directory, or the latest complete one in --output_dir "
                          "(auto; a fresh start when there is none).")
    own.add_argument("--allow_data_change", default=False,
                     help="Resume although the data file, eval data, tokenizer files or --model_max_length differ from "
                          "the checkpoint's (otherwise refused, naming each change): training continues at the "
                          "checkpoint's step and data position on the new data. Default False.", **BOOLEAN_FLAG)
    own.add_argument("--max_grad_norm", type=nonneg_float, default=1.0,
                     help="Clip the global gradient norm to this (0: no clipping). Default 1.")
    own.add_argument("--warmup_steps", type=int, default=0,
                     help="Warmup steps; overrides --warmup_ratio when > 0. Default 0.")
    own.add_argument("--eval_data_path", default=None,
                     help="Held-out Sandbox records for --evaluation_strategy steps|epoch.")
    own.add_argument("--allow_output_in_model_dir", default=False,
                     help="Allow --output_dir to be --model_name_or_path or inside it (the final model then replaces "
                          "the base weights). Default False.", **BOOLEAN_FLAG)
    own.add_argument("--eval_steps", type=interval_steps, default=None,
                     help="Steps between evaluations (default: --logging_steps).")
    own.add_argument("--profile_steps", type=number(int, low=0, what="an integer >= 0"), default=0,
                     help="Profile this many optimizer steps after the first (torch.profiler): a Chrome/Perfetto trace "
                          "per rank in OUTPUT_DIR/profile/ and a table of where the step time goes (data, forward, "
                          "loss head, backward, optimizer, communication, host waits) in the log and "
                          "profile/summary.json. Default 0 (off).")
    own.add_argument("--token_cache_dir", default=None,
                     help="Where tokenized data is cached between runs, keyed on data file, tokenizer and tokenization "
                          "flags (rank 0 tokenizes, the other ranks read). 'none': no cache. Default: "
                          "$XDG_CACHE_HOME/fastalign/tokens or ~/.cache/fastalign/tokens.")

    hf = parser.add_argument_group("HF Trainer flags (same meaning as in transformers' TrainingArguments)")
    hf.add_argument("--adam_beta1", type=unit_interval, default=0.9, help="AdamW beta1. Default 0.9.")
    hf.add_argument("--adam_beta2", type=unit_interval, default=0.999, help="AdamW beta2. Default 0.999.")
    hf.add_argument("--adam_epsilon", type=positive_float, default=1e-8, help="AdamW epsilon. Default 1e-8.")
    hf.add_argument("--save_only_model", default=False,
                    help="Checkpoints hold the HF model only (loadable with from_pretrained; no optimizer, scheduler "
                         "or data position), so they cannot be resumed. Default False.", **BOOLEAN_FLAG)
    hf.add_argument("--logging_first_step", default=False,
                    help="Also write a metrics line after the first step. Default False.", **BOOLEAN_FLAG)
    hf.add_argument("--load_best_model_at_end", default=False,
                    help="Keep the checkpoint with the best --metric_for_best_model out of rotation and export its "
                         "weights at the end instead of the last step's (needs --save_strategy equal to "
                         "--evaluation_strategy; --save_steps a multiple of --eval_steps). "
                         "Default False.", **BOOLEAN_FLAG)
    hf.add_argument("--metric_for_best_model", default=None,
                    help="Evaluation metric that picks the best checkpoint: eval_pairwise_accuracy, eval_kendall_tau, "
                         "eval_top1_accuracy, eval_loss, eval_nll_best, eval_penalty, eval_penalty_active_frac (the "
                         "eval_ prefix may be left out). Default eval_pairwise_accuracy.")
    hf.add_argument("--greater_is_better", default=None,
                    help="Whether a larger --metric_for_best_model is better. Default: False for a metric ending in "
                         "'loss', else True (as HF).", **BOOLEAN_FLAG)
    hf.add_argument("--logging_dir", default=None, help="TensorBoard log directory. Default: output_dir/runs.")
    hf.add_argument("--report_to", nargs="+", default=["none"], metavar="none|tensorboard|wandb|all",
                    help="Also log to these (space- or comma-separated): tensorboard (--logging_dir), wandb (offline "
                         "when there is no login or network), all (the installed ones). Default none.")
    hf.add_argument("--run_name", default=None,
                    help="Name of the run in TensorBoard's args and in wandb. Default: --output_dir.")
    hf.add_argument("--disable_tqdm", default=False,
                    help="No progress bar (log lines and metrics.jsonl only). Default False.", **BOOLEAN_FLAG)
    hf.add_argument("--ddp_timeout", type=positive_int, default=1800,
                    help="Seconds a collective may wait for the other processes before the run fails. Default 1800.")
    hf.add_argument("--dataloader_num_workers", type=number(int, low=0, what="an integer >= 0"), default=0,
                    help="Accepted and ignored: batches are packed in the training process from token ids tokenized "
                         "once at start-up (no DataLoader, no worker processes). Default 0.")
    hf.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=-1,
                    help="Set by the deprecated torch.distributed.launch; same as its LOCAL_RANK environment variable "
                         "(torchrun sets that itself). Default -1.")
    hf.add_argument("--fp16", default=False,
                    help="Refused when True: fastalign computes in bf16 (--bf16 True) with fp32 master weights; fp16 "
                         "would need loss scaling.", **BOOLEAN_FLAG)
    hf.add_argument("--push_to_hub", default=False,
                    help="Refused when True: fastalign uploads nothing; upload --output_dir (an HF model directory) "
                         "yourself.", **BOOLEAN_FLAG)
    add_lora_flags(parser)
    return parser


def add_lora_flags(parser: argparse.ArgumentParser) -> None:
    """TRL's ModelConfig flags for LoRA (docs/lora.md)."""
    lora = parser.add_argument_group("LoRA flags (same meaning as in TRL's ModelConfig; docs/lora.md)")
    lora.add_argument("--use_peft", default=False, **BOOLEAN_FLAG,
                      help="Train LoRA adapters over a frozen base model and write a PEFT adapter "
                      "(adapter_config.json, adapter_model.safetensors) to --output_dir. Default False.")
    lora.add_argument("--lora_r", type=positive_int, default=16, help="LoRA rank. Default 16.")
    lora.add_argument("--lora_alpha", type=positive_float, default=32.0,
                      help="LoRA alpha: the update is scaled by alpha / r (alpha / sqrt(r) with --use_rslora). "
                      "Default 32.")
    lora.add_argument("--lora_dropout", type=number(float, low=0.0, high=1.0, what="a number in [0, 1]"),
                      default=0.05, help="Dropout on the adapters' input. Default 0.05.")
    lora.add_argument("--lora_target_modules", nargs="+", default=None, metavar="NAME|all-linear",
                      help="Linear modules that get adapters, e.g. q_proj v_proj, or all-linear (every "
                      "decoder linear). Default q_proj v_proj (PEFT's default for these families).")
    lora.add_argument("--lora_modules_to_save", nargs="+", default=None, metavar="lm_head|embed_tokens",
                      help="Modules trained in full beside the adapters and saved with them. Default none.")
    lora.add_argument("--use_rslora", default=False, **BOOLEAN_FLAG,
                      help="Rank-stabilised LoRA: scale by alpha / sqrt(r). Default False.")
    lora.add_argument("--load_in_4bit", default=False, **BOOLEAN_FLAG,
                      help="Refused when True: quantized base models are not supported (--use_peft with "
                      "--bf16 True holds the frozen base in bf16).")
    lora.add_argument("--load_in_8bit", default=False, **BOOLEAN_FLAG, help="Refused when True, as --load_in_4bit.")


def refuse_quantized_bases(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for flag in ("load_in_4bit", "load_in_8bit"):
        if getattr(args, flag):
            parser.error(f"argument --{flag}: quantized base models are not supported; use --use_peft True "
                         "--bf16 True (the frozen base is held in bf16, the adapters train in fp32)")


def check_lora_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    refuse_quantized_bases(parser, args)
    if not args.use_peft:
        return
    if args.save_only_model:
        parser.error("argument --save_only_model: not supported with --use_peft (checkpoints hold the "
                     "adapters and the optimizer; the final adapter is written to --output_dir)")
    if args.load_best_model_at_end:
        parser.error("argument --load_best_model_at_end: not supported with --use_peft yet")
    if args.lora_target_modules and "all-linear" in args.lora_target_modules and len(args.lora_target_modules) > 1:
        parser.error("argument --lora_target_modules: all-linear stands alone, not beside module names")


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
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
    check_lora_flags(parser, args)
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
    return TrainConfig(**vars(args))


def interval(value: float | None, total_steps: int) -> int:
    """HF's step intervals: an integer count, or a fraction (< 1) of the total steps."""
    if value is None:
        return 0
    return max(1, math.ceil(value * total_steps)) if value < 1 else int(value)
