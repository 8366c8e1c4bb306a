"""The baseline: the original Stable Alignment training step, re-created faithfully in a minimal loop.

The original is `train_alignment.py` of the Stable-Alignment repository, an HF `Trainer` subclass
launched with `torchrun --nproc_per_node=8 train_alignment.py ... --per_device_train_batch_size 1
--gradient_accumulation_steps 8 --bf16 True --tf32 True --num_comp 3` on 8xA100 with FSDP. Per
optimizer step it does, and this file does the same on one device:

- one query per micro-batch: its `num_comp` sampled responses, each tokenized as query+response,
  right-padded into a [k, L] batch with an attention mask; labels = input ids with the query and
  the padding set to -100;
- `LlamaForCausalLM(input_ids, attention_mask, labels=labels)`: full [k, L, V] logits, and because
  labels are passed transformers also computes its own LM loss on the padded batch (upcast to
  fp32), which the original never uses but pays for in time and memory;
- shift (a contiguous copy of [k, L-1, V]), a Python loop of `CrossEntropyLoss(ignore_index=-100)`
  over the k responses (nll_r), best = top rating, margin penalty with the original's rating
  indexing (docs/design.md section 1, `margin_mode=seed`), loss = nll_best + ratio * penalty;
- loss / gradient_accumulation_steps, backward per micro-batch; then gradient clipping at 1.0
  (the HF default), AdamW (`adamw_torch`), zero grads;
- `--bf16 True` on one device: fp32 weights, autocast to bf16; `--tf32 True`: TF32 matmuls.

Deliberate differences, none of which slows the baseline:
- one device, no FSDP (nothing to shard on one device);
- the original switches on `torch.autograd.set_detect_anomaly(True)` at import, which slows every
  op; it is off here (a debugging switch, not the approach; `--detect_anomaly` turns it on);
- attention is transformers' current default (SDPA) rather than 2023's eager attention;
- ties in the ratings: stable sort (lowest index is best), as in fastalign;
- token ids: the groups, their sampled candidates and their token ids come from fastalign.data
  (BOS + query ids + response ids + EOS), so both sides of a comparison see identical tokens; the
  original re-tokenized the joined string and padded with an added [PAD] token (here id 0,
  masked and labelled -100, so the embedding is not resized and the weights stay identical);
  batches are built before timing, whereas the original tokenized in its collator during training.

Run alone it times the baseline and writes benchmarks/results/baseline_original-<date>-<device>-
<preset>.json; `benchmarks/train_throughput.py` imports it for the interleaved comparison.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.nn import CrossEntropyLoss
from torch.nn.utils.rnn import pad_sequence

from benchmarks.lib.inputs import build_llama_checkpoint
from benchmarks.lib.memory import PeakMemory
from benchmarks.lib.presets import TRAIN_PRESETS, TrainPreset
from benchmarks.lib.results import result_header, results_path, write_json
from benchmarks.lib.tables import fmt_bytes, format_table
from benchmarks.lib.timing import summarize_times, timed

IGNORE_INDEX = -100
PAD_TOKEN_ID = 0  # any id works: padded positions are masked out of attention and labelled -100


@dataclass(frozen=True)
class AlignmentArgs:
    """The objective's flags, with the original command's values as defaults."""

    rating_scale: float = 7.0
    margin: float = 1.0
    ratio: float = 0.2
    max_flow: bool = False
    margin_mode: str = "seed"  # the original's indexing; "paper" to compare with the formula


@dataclass
class PaddedGroup:
    """One micro-batch of the original: one query's k candidates, right-padded."""

    input_ids: torch.Tensor  # int64 [k, L]
    attention_mask: torch.Tensor  # bool [k, L]
    labels: torch.Tensor  # int64 [k, L]: response tokens, -100 on the query and the padding
    scores: torch.Tensor  # float32 [1, k]
    real_tokens: int  # tokens that are not padding

    def to(self, device: torch.device | str) -> PaddedGroup:
        return PaddedGroup(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                           self.scores.to(device), self.real_tokens)


def pad_group(batch) -> PaddedGroup:
    """The original collator's batch for the single group of a fastalign `PackedBatch`.

    The packed `targets[t]` is the id of token t+1 when that token is a response token of the same
    sequence (else -100), so the original's labels are `labels[t+1] = targets[t]`, `labels[0] = -100`.
    """
    if int(batch.group_index.max()) != 0:
        raise ValueError("pad_group: the original trains one query per micro-batch; got several groups")
    bounds = batch.cu_seqlens.tolist()
    ids, labels, masks = [], [], []
    for start, end in zip(bounds[:-1], bounds[1:]):
        ids.append(batch.input_ids[start:end])
        labels.append(torch.cat([torch.tensor([IGNORE_INDEX]), batch.targets[start:end - 1]]))
        masks.append(torch.ones(end - start, dtype=torch.bool))
    return PaddedGroup(
        input_ids=pad_sequence(ids, batch_first=True, padding_value=PAD_TOKEN_ID),
        attention_mask=pad_sequence(masks, batch_first=True, padding_value=False),
        labels=pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX),
        scores=batch.scores.float().view(1, -1),
        real_tokens=bounds[-1],
    )


def original_alignment_loss(logits: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor,
                            args: AlignmentArgs) -> torch.Tensor:
    """`AlignmentTrainer.stable_alignment` of the original: logits [k, L-1, V] (shifted), labels
    [k, L-1], scores [1, k]. Returns the group loss nll_best + ratio * penalty."""
    ratings = scores.squeeze()
    sorted_ratings, indices = torch.sort(ratings, descending=True, stable=True)
    best_idx = indices[0] if indices.dim() != 0 else indices.item()
    best_score = sorted_ratings[0] if indices.dim() != 0 else sorted_ratings.item()
    loss_fct = CrossEntropyLoss(ignore_index=IGNORE_INDEX)

    # nll_r: one cross-entropy per response, in a Python loop as the original did.
    batch_losses = [loss_fct(logit.view(-1, logits.size(-1)), label.view(-1)) for logit, label in zip(logits, labels)]
    batch_loss = torch.stack(batch_losses, dim=0)

    min_loss = batch_loss[best_idx]
    neg_losses = []
    if indices.dim() != 0 and indices.size(-1) > 1:
        for idx in indices[1:]:
            # The original reads the *sorted* list at the response's own index (seed indexing).
            other = sorted_ratings[idx] if args.margin_mode == "seed" else ratings[idx]
            margin = (best_score - other) / args.rating_scale * args.margin
            neg_losses.append(min_loss - batch_loss[idx] + margin)
    zero = torch.zeros((), device=logits.device)
    if neg_losses:
        neg = torch.stack(neg_losses)
        penalty = torch.max(neg.max() if args.max_flow else neg.mean(), zero)
    else:
        penalty = zero
    return min_loss + args.ratio * penalty


def original_compute_loss(model, group: PaddedGroup, args: AlignmentArgs) -> torch.Tensor:
    """`AlignmentTrainer.compute_loss`: forward with labels (HF computes its own loss too), then
    shift and the alignment loss. Only the loss leaves: HF's output and its graph are freed here,
    as in the original."""
    outputs = model(input_ids=group.input_ids, attention_mask=group.attention_mask, labels=group.labels,
                    return_dict=True)
    logits = outputs["logits"]
    shift_logits = logits[..., :-1, :].contiguous()
    shift_labels = group.labels[..., 1:].contiguous()
    return original_alignment_loss(shift_logits, shift_labels, group.scores, args)


def fp32_load_kwargs() -> dict[str, Any]:
    """fp32 master weights whatever the checkpoint's dtype; transformers 4.56 renamed `torch_dtype`
    to `dtype` (a lent GPU machine's image may have either)."""
    import transformers
    from packaging.version import Version

    name = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {name: torch.float32}


def autocast_context(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class BaselineTrainer:
    """The original's optimizer step on one device (see the module docstring)."""

    def __init__(self, model_dir: str | Path, device: str | torch.device, *, precision: str = "fp32",
                 args: AlignmentArgs = AlignmentArgs(), learning_rate: float = 2e-5, weight_decay: float = 0.0,
                 max_grad_norm: float = 1.0, detect_anomaly: bool = False):
        from transformers import LlamaForCausalLM

        self.device = torch.device(device)
        self.precision = precision
        self.args = args
        self.max_grad_norm = max_grad_norm
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # --tf32 True
            torch.backends.cudnn.allow_tf32 = True
        torch.autograd.set_detect_anomaly(detect_anomaly)
        self.model = LlamaForCausalLM.from_pretrained(str(model_dir), attn_implementation="sdpa",
                                                      trust_remote_code=False, **fp32_load_kwargs()).to(self.device)
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=learning_rate, weight_decay=weight_decay)

    def step(self, micro_batches: Sequence[PaddedGroup]) -> dict[str, float]:
        """One optimizer step over one-group micro-batches (the original's gradient accumulation)."""
        total = 0.0
        for group in micro_batches:
            group = group.to(self.device)
            with autocast_context(self.device, self.precision):
                loss = original_compute_loss(self.model, group, self.args) / len(micro_batches)
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": total}

    @torch.no_grad()
    def group_loss(self, group: PaddedGroup) -> float:
        """The loss of one group without a step (to check both sides compute the same objective)."""
        with autocast_context(self.device, self.precision):
            return float(original_compute_loss(self.model, group.to(self.device), self.args))


# ----------------------------------------------------------------------------- shared data


def build_benchmark_dir(preset: TrainPreset, data_path: Path, out_dir: Path, *, seed: int = 0) -> Path:
    """Model + tokenizer directory shared by both sides: a byte-level BPE trained on the data and
    random weights of the preset's shape."""
    from fastalign.tiny import build_tokenizer, sandbox_texts

    build_tokenizer(sandbox_texts(data_path), preset.tokenizer_vocab, out_dir)
    init_device = "cuda" if preset.device == "cuda" and torch.cuda.is_available() else "cpu"
    save_dtype = "bfloat16" if preset.precision == "bf16" else "float32"
    path = build_llama_checkpoint(out_dir, preset.model, seed=seed, save_dtype=save_dtype, init_device=init_device)
    if init_device == "cuda":
        torch.cuda.empty_cache()  # the benchmark's workers need the GPU memory, not this process
    return path


def original_steps(model_dir: Path, data_path: Path, preset: TrainPreset, num_steps: int, *, seed: int = 0):
    """The optimizer steps the original would run: lists of one-group `PackedBatch`es (the groups,
    their sampled candidates and token ids from fastalign.data, so both sides see the same tokens).
    Cycles over the data when it has fewer groups than asked for."""
    from fastalign.data import GroupBatcher, load_records, tokenize_records
    from fastalign.model_dir import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    records = load_records(str(data_path), skip_invalid=True).records
    data = tokenize_records(records, tokenizer, model_max_length=preset.model_max_length)
    batcher = GroupBatcher(data, num_comp=preset.num_comp, seed=seed, batch_size=1,
                           gradient_accumulation_steps=preset.groups_per_step)
    steps: list[list[Any]] = []
    epoch = 0
    while len(steps) < num_steps:
        before = len(steps)
        for step in islice(batcher.iter_steps(epoch), num_steps - len(steps)):
            steps.append([mb for mb in step.micro_batches if mb.num_groups > 0])
        if len(steps) == before:
            raise ValueError(f"{data_path}: no training groups")
        epoch += 1
    return steps


# ----------------------------------------------------------------------------- standalone run


def default_data_path() -> Path:
    from fastalign.data import sample_data_path

    return Path(sample_data_path())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu-tiny", choices=sorted(TRAIN_PRESETS))
    parser.add_argument("--data_path", type=Path, default=None, help="Sandbox records (default: bundled sample)")
    parser.add_argument("--model_dir", type=Path, default=None,
                        help="HF Llama dir with tokenizer (default: random weights of the preset's shape)")
    parser.add_argument("--steps", type=int, default=None, help="measured optimizer steps")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--detect_anomaly", action="store_true", help="as the original (slow)")
    parser.add_argument("--out_dir", type=Path, default=None)
    args = parser.parse_args(argv)

    preset = TRAIN_PRESETS[args.preset]
    device = torch.device("cuda" if preset.device == "cuda" and torch.cuda.is_available() else "cpu")
    precision = preset.precision if device.type == "cuda" else "fp32"
    warmup = preset.warmup_steps if args.warmup is None else args.warmup
    steps_n = preset.measure_steps if args.steps is None else args.steps
    data_path = args.data_path or default_data_path()

    with tempfile.TemporaryDirectory(prefix="fa-baseline-") as tmp:
        model_dir = args.model_dir or build_benchmark_dir(preset, data_path, Path(tmp))
        steps = [[pad_group(mb) for mb in step]
                 for step in original_steps(model_dir, data_path, preset, warmup + steps_n)]
        memory = PeakMemory(device).start()
        trainer = BaselineTrainer(model_dir, device, precision=precision, detect_anomaly=args.detect_anomaly)
        times = []
        for i, step in enumerate(steps):
            if i == warmup:
                memory.reset_peak()
            _, seconds = timed(lambda step=step: trainer.step(step), device)
            if i >= warmup:
                times.append(seconds)
        peak = memory.peak_bytes()

    measured = steps[warmup:]
    real = sum(g.real_tokens for step in measured for g in step)
    padded = sum(g.input_ids.numel() for step in measured for g in step)
    result = {
        **result_header("baseline_original", preset.name, device),
        "precision": precision,
        "steps": {"warmup": warmup, "measured": steps_n, "groups_per_step": preset.groups_per_step},
        "real_tokens": real,
        "padded_tokens": padded,
        "step_time": summarize_times(times),
        "tokens_per_s": real / sum(times),
        "peak_memory_bytes": peak,
        "memory_method": memory.describe(),
    }
    path = write_json(results_path("baseline_original", preset.name, device, args.out_dir), result)
    print(format_table(["preset", "device", "step time (median)", "real tokens/s", "padding", "peak memory"], [[
        preset.name, str(device), f"{result['step_time']['median_s']:.3f} s", f"{result['tokens_per_s']:.0f}",
        f"{100 * (1 - real / padded):.0f}%", fmt_bytes(peak)]]))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    from fastalign.cli import run_main

    sys.exit(run_main(main))
