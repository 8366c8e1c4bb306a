"""Held-out ranking evaluation: does the model prefer the responses the simulated society rated higher?

Details: docs/design.md section 7.13.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from fastalign import peft_io
from fastalign.cli import BOOLEAN_FLAG, exit_process, positive_float, positive_int, run_main
from fastalign.data import (
    IGNORE_INDEX,
    GroupBatcher,
    load_records,
    records_from_dicts,
    select_candidates,
    tokenize_records,
)
from fastalign.distributed import init_distributed
from fastalign.errors import DataError
from fastalign.loss import stable_alignment_loss
from fastalign.model_dir import load_tokenizer

# ---------------------------------------------------------------------------------------------
# Metrics (pure numpy; one record = the ratings and log-likelihoods of its responses)
# ---------------------------------------------------------------------------------------------


@dataclass
class RecordResult:
    """Evaluation of one record: which responses were scored, their ratings and log-likelihoods."""

    index: int  # the record's position in the data file
    category: str | None
    # positions in the record's "responses" that were scored (all, or the --num_comp draw), in file
    # order; a response that tokenized to nothing (empty text with --no_append_eos) is not scored
    response_indices: list[int]
    scores: list[float]
    logliks: list[float]  # mean token log-likelihood of each scored response (nats/token)
    num_tokens: list[int]  # response tokens each log-likelihood averages over
    pairs: int  # pairs with different ratings
    correct_pairs: int
    margin_sum: float  # sum over those pairs of loglik(higher-rated) - loglik(lower-rated)
    kendall_tau: float | None  # None when the ratings have < 2 distinct values
    top1_correct: bool | None  # None when the ratings have < 2 distinct values


def _pair_signs(values: np.ndarray) -> np.ndarray:
    """sign(v_i - v_j) for every pair i < j, as a flat vector of length k(k-1)/2."""
    i, j = np.triu_indices(len(values), k=1)
    return np.sign(values[i] - values[j])


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Kendall's tau-b: (concordant - discordant) / sqrt((n0 - ties_x) (n0 - ties_y)).

    None when x has fewer than 2 distinct values (no ordering to compare against); 0.0 when only y
    is constant (the model expresses no preference).
    """
    sx = _pair_signs(np.asarray(x, dtype=np.float64))
    sy = _pair_signs(np.asarray(y, dtype=np.float64))
    untied_x, untied_y = np.count_nonzero(sx), np.count_nonzero(sy)
    if untied_x == 0:
        return None
    if untied_y == 0:
        return 0.0
    return float(np.sum(sx * sy) / math.sqrt(untied_x * untied_y))


def pairwise_counts(scores: Sequence[float], logliks: Sequence[float]) -> tuple[int, int, float]:
    """(pairs with different ratings, pairs ordered correctly, sum of margins) for one record."""
    s = np.asarray(scores, dtype=np.float64)
    ll = np.asarray(logliks, dtype=np.float64)
    i, j = np.triu_indices(len(s), k=1)
    rating_sign = np.sign(s[i] - s[j])
    valid = rating_sign != 0
    # margin oriented from the higher-rated towards the lower-rated response of each pair
    margins = rating_sign[valid] * (ll[i] - ll[j])[valid]
    return int(valid.sum()), int((margins > 0).sum()), float(margins.sum())


def top1_correct(scores: Sequence[float], logliks: Sequence[float]) -> bool | None:
    """Is the top-rated response (lowest index on ties) the most likely one? None if all ratings tie."""
    s = np.asarray(scores, dtype=np.float64)
    if np.unique(s).size < 2:
        return None
    return int(np.argmax(s)) == int(np.argmax(np.asarray(logliks, dtype=np.float64)))


def score_record(
    index: int,
    category: str | None,
    response_indices: Sequence[int],
    scores: Sequence[float],
    logliks: Sequence[float],
    num_tokens: Sequence[int],
) -> RecordResult:
    """All per-record metrics from the ratings and log-likelihoods of its scored responses."""
    pairs, correct, margin_sum = pairwise_counts(scores, logliks)
    return RecordResult(
        index=index,
        category=category,
        response_indices=list(response_indices),
        scores=[float(s) for s in scores],
        logliks=[float(v) for v in logliks],
        num_tokens=[int(n) for n in num_tokens],
        pairs=pairs,
        correct_pairs=correct,
        margin_sum=margin_sum,
        kendall_tau=kendall_tau_b(scores, logliks),
        top1_correct=top1_correct(scores, logliks),
    )


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def summarize(results: Sequence[RecordResult]) -> dict:
    """Aggregate metrics over records (definitions: docs/design.md section 7.13)."""
    pairs = sum(r.pairs for r in results)
    ranked = [r for r in results if r.kendall_tau is not None]
    all_logliks = [v for r in results for v in r.logliks]
    return {
        "num_records": len(results),
        "num_responses": len(all_logliks),
        "num_pairs": pairs,
        "num_ranked_records": len(ranked),
        "pairwise_accuracy": sum(r.correct_pairs for r in results) / pairs if pairs else None,
        "kendall_tau": _mean([r.kendall_tau for r in ranked]),
        "top1_accuracy": _mean([float(r.top1_correct) for r in ranked]),
        "top1_chance": _mean([1.0 / len(r.scores) for r in ranked]),
        "mean_margin": sum(r.margin_sum for r in results) / pairs if pairs else None,
        "mean_loglik": _mean(all_logliks),
    }


def summarize_by_category(results: Sequence[RecordResult]) -> dict[str, dict]:
    """`summarize` per value of the records' "category" field ({} when no record has one)."""
    categories = sorted({r.category for r in results if r.category is not None})
    return {c: summarize([r for r in results if r.category == c]) for c in categories}


def record_to_json(result: RecordResult) -> dict:
    return asdict(result)


# Columns of the printed table: (metric key, header, format)
_TABLE_COLUMNS = (
    ("num_records", "records", "{:d}"),
    ("num_pairs", "pairs", "{:d}"),
    ("pairwise_accuracy", "pair acc", "{:.3f}"),
    ("kendall_tau", "tau-b", "{:+.3f}"),
    ("top1_accuracy", "top-1", "{:.3f}"),
    ("top1_chance", "top-1 chance", "{:.3f}"),
    ("mean_margin", "margin", "{:+.4f}"),
    ("mean_loglik", "loglik/tok", "{:.3f}"),
)


def _cell(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def format_table(rows: dict[str, dict]) -> str:
    """A fixed-width text table, one row per name -> metrics dict."""
    headers = ["", *(h for _, h, _ in _TABLE_COLUMNS)]
    body = [[name, *(_cell(m.get(k), f) for k, _, f in _TABLE_COLUMNS)] for name, m in rows.items()]
    widths = [max(len(row[c]) for row in [headers, *body]) for c in range(len(headers))]
    lines = ["  ".join(cell.rjust(w) if c else cell.ljust(w) for c, (cell, w) in enumerate(zip(row, widths)))
             for row in [headers, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Scoring responses with a model (packed batches + the fused loss head, no full logits)
# ---------------------------------------------------------------------------------------------


def llama_nll(model, rating_scale: float = 7.0) -> Callable:
    """batch -> nll [S] of a plain (unsharded) fastalign Llama: hidden states + the fused loss head."""

    def forward(batch) -> torch.Tensor:
        hidden = model(batch.input_ids, batch.position_ids, **batch.attention_inputs())  # [T, H]
        return stable_alignment_loss(hidden, model.lm_head.weight, batch.targets, batch.response_index,
                                     batch.scores, batch.group_index, rating_scale=rating_scale,
                                     num_groups=len(batch.record_indices)).nll

    return forward


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def evaluate_model(
    model,
    tokenizer,
    records: Sequence,
    *,
    model_max_length: int = 512,
    max_tokens_per_batch: int | None = 8192,
    share_prefix: bool = True,
    num_comp: int | None = None,
    rating_scale: float = 7.0,
    append_eos: bool = True,
    stop_response: bool = False,
    seed: int = 42,
    progress: bool = False,
    forward: Callable | None = None,
) -> dict:
    """Score every response of `records` (fastalign.data.Record, or dicts in the file format,
    validated alike) with `model` and compute metrics. `share_prefix`: each query runs once per
    record (fastalign.data.packing; the same nll as one query + response sequence per response).

    `model` is a fastalign Llama, scored by `llama_nll`. A caller whose Llama is wrapped (the
    trainer's FSDP-sharded Llama + loss module) passes that module as `model` and
    `forward(batch) -> nll [S]` that runs it. Under torch.distributed the records are split over
    the ranks (every rank passes the same list and runs the same number of forwards, as FSDP
    needs; fillers are dropped) and every rank returns the gathered result. The model is left in
    the train/eval mode it had; gradients are off throughout.

    Returns {"metrics": summarize(...), "by_category": {...}, "records": [per-record dicts],
             "tokenization": data stats (dropped/truncated counts)}.
    """
    world_size, rank = _distributed()
    records = records_from_dicts(records, rating_scale=rating_scale)
    data = tokenize_records(records, tokenizer, model_max_length=model_max_length,
                            append_eos=append_eos, stop_response=stop_response, progress=progress)
    categories = {r.index: r.category for r in records}
    # the responses GroupBatcher scores for each record (all, or num_comp drawn as in epoch 0), as
    # indices into the record's own "responses" (tokenization may have dropped empty ones)
    chosen_responses = {g.record_index: [g.response_positions[j] for j in
                                         select_candidates(len(g.response_ids), g.record_index,
                                                           num_comp=num_comp, seed=seed, epoch=0)]
                        for g in data.groups}
    batcher = GroupBatcher(data, num_comp=num_comp, seed=seed, batch_size=8,
                           max_tokens_per_batch=max_tokens_per_batch, world_size=world_size, rank=rank,
                           shuffle=False, share_prefix=share_prefix)
    forward = forward or llama_nll(model, rating_scale)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            local = _score_batches(batcher, forward, device, categories, chosen_responses, progress and rank == 0)
    finally:
        model.train(was_training)
    if world_size > 1:
        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, local)
        local = [r for part in gathered for r in part]
    results = sorted(local, key=lambda r: r.index)
    return {
        "metrics": summarize(results),
        "by_category": summarize_by_category(results),
        "records": [record_to_json(r) for r in results],
        "tokenization": dict(data.stats),
    }


def _score_batches(batcher, forward, device, categories: dict, chosen_responses: dict,
                   progress: bool) -> list[RecordResult]:
    """RecordResults of this rank's groups (epoch 0 of `batcher`; fillers are run, then dropped)."""
    results: list[RecordResult] = []
    steps = batcher.iter_steps(epoch=0)
    if progress:
        steps = tqdm(steps, total=batcher.steps_per_epoch(), desc="evaluating", unit="batch")
    for step in steps:
        for batch in step.micro_batches:
            nll = forward(batch.to(device))  # [S]
            results += score_batch(batch, nll, categories, chosen_responses)
    return results


def score_batch(batch, nll: torch.Tensor, categories: dict | None = None,
                chosen_responses: dict | None = None) -> list[RecordResult]:
    """RecordResults of one host micro-batch's groups from the model's nll [S] of its responses
    (any device); [] for a filler batch (it only keeps the ranks' forwards matched).

    `categories`: record index -> category; `chosen_responses`: record index -> the positions in
    the record's "responses" of the scored ones (default: 0..k-1, the group's own order). The
    trainer's evaluation and `evaluate_model` both score through here, so their metrics agree."""
    if batch.num_groups == 0:
        return []
    nll = nll.detach().float().cpu()
    tokens = torch.bincount(batch.response_index[batch.targets != IGNORE_INDEX],
                            minlength=batch.num_sequences)  # [S] response tokens averaged over
    group_of = batch.group_index.tolist()
    results = []
    for g, record_index in enumerate(batch.record_indices):
        members = [s for s, owner in enumerate(group_of) if owner == g]  # in response order
        positions = (chosen_responses or {}).get(record_index, range(len(members)))
        results.append(score_record(
            record_index, (categories or {}).get(record_index), positions,
            batch.scores[members].tolist(), (-nll[members]).tolist(), tokens[members].tolist(),
        ))
    return results


def record_categories(path: str, *, rating_scale: float, skip_invalid: bool) -> dict[int, str]:
    """Record index -> "category" of the records of a data file that have one."""
    loaded = load_records(path, rating_scale=rating_scale, skip_invalid=skip_invalid)
    return {r.index: r.category for r in loaded.records if r.category is not None}


# The ranking metrics the trainer's evaluation reports beside eval_loss (as eval_<name>).
RANKING_METRICS = ("pairwise_accuracy", "kendall_tau", "top1_accuracy")


def ranking_record(results: Sequence[RecordResult], prefix: str = "eval_") -> dict[str, float | None]:
    """The ranking metrics of `results` as flat keys: `<prefix><metric>` over all records and
    `<prefix><metric>/<category>` per category (when records have one). None: not defined (no
    pair with different ratings)."""
    record = {f"{prefix}{name}": value for name, value in summarize(results).items()
              if name in RANKING_METRICS}
    for category, metrics in summarize_by_category(results).items():
        record |= {f"{prefix}{name}/{category}": metrics[name] for name in RANKING_METRICS}
    return record


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastalign.evaluate", allow_abbrev=False,
                                description="Ranking metrics of a model on rated Sandbox records: does it "
                                "find the higher-rated responses more likely? (metrics: docs/evaluation.md)")
    p.add_argument("--model_name_or_path", required=True,
                   help="HF model directory: Llama, Mistral, Qwen2 or Qwen3 (config.json, weights, tokenizer); or "
                        "a PEFT LoRA adapter directory (the base model named by its adapter_config.json).")
    p.add_argument("--data_path", required=True, help="Sandbox records: JSON array or JSONL (.gz welcome).")
    p.add_argument("--output_json", default=None, help="Write the metrics and per-record results here.")
    p.add_argument("--model_max_length", type=positive_int, default=512,
                   help="Longest query+response in tokens; responses are cut from the end, as in training. "
                        "Default 512.")
    p.add_argument("--max_tokens_per_batch", type=positive_int, default=8192,
                   help="Tokens per packed forward (whole records). Default 8192.")
    p.add_argument("--share_prefix", default=True,
                   help="Run each query once per record, every response attending to it (same nll as query+response "
                        "per response, fewer tokens computed). Default True.", **BOOLEAN_FLAG)
    p.add_argument("--num_comp", type=positive_int, default=None,
                   help="Responses scored per record, drawn with --seed when a record has more. Default: all.")
    p.add_argument("--rating_scale", type=positive_float, default=7.0,
                   help="Highest rating; scores must lie in 1..rating_scale. Default 7.")
    p.add_argument("--bf16", help="Run the model in bfloat16. Default False.", default=False, **BOOLEAN_FLAG)
    p.add_argument("--skip_invalid",
                   help="Drop invalid records (counted per reason) instead of stopping. Default False.",
                   default=False, **BOOLEAN_FLAG)
    p.add_argument("--stop_response",
                   help="As in training: cut responses at the first turn marker. Default False.",
                   default=False, **BOOLEAN_FLAG)
    p.add_argument("--no_append_eos",
                   help="As in training: no EOS after each response. Default False.", default=False, **BOOLEAN_FLAG)
    p.add_argument("--seed", type=int, default=42, help="Seed of the --num_comp draw. Default 42.")
    return p


def print_report(report: dict) -> None:
    """The metrics table: all records, then one row per category."""
    rows = {"all": report["metrics"]} | {f"category={c}": m for c, m in report["by_category"].items()}
    print(format_table(rows))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    loaded = load_records(args.data_path, rating_scale=args.rating_scale, skip_invalid=args.skip_invalid)
    if not loaded.records:
        raise DataError(f"{args.data_path}: no valid records to evaluate ({loaded.skipped_summary()})")
    env = init_distributed()
    try:
        model = peft_io.load_model(args.model_name_or_path, device=env.device,
                                   dtype=torch.bfloat16 if args.bf16 else torch.float32)  # or an adapter directory
        tokenizer = load_tokenizer(model.source_dir)
        report = evaluate_model(
            model, tokenizer, loaded.records, model_max_length=args.model_max_length,
            max_tokens_per_batch=args.max_tokens_per_batch, share_prefix=args.share_prefix, num_comp=args.num_comp,
            rating_scale=args.rating_scale, append_eos=not args.no_append_eos,
            stop_response=args.stop_response, seed=args.seed, progress=env.is_main,
        )
    finally:
        dist.destroy_process_group()
    if not env.is_main:
        return 0
    report["skipped_invalid"] = dict(loaded.skipped)
    report["settings"] = vars(args) | {"world_size": env.world_size}
    if loaded.skipped:
        print(loaded.skipped_summary())
    dropped = {k: v for k, v in report["tokenization"].items() if k.startswith("dropped_") and v}
    if dropped:
        print(f"not scored after tokenization (--model_max_length {args.model_max_length}): {dropped}")
    print_report(report)
    if args.output_json:
        path = Path(args.output_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    exit_process(run_main(main))
