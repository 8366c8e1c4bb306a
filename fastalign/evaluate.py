"""Held-out ranking evaluation: does the model prefer the responses the simulated society rated higher?

For every record (one query, several rated responses) the model scores each response by its mean
token log-likelihood given the query (= -nll of the training objective, computed by the same fused
loss head over packed batches, so no [tokens, vocab] logits are ever built). The metrics compare
that ordering with the ratings:

    pairwise_accuracy  over all response pairs of all records whose ratings differ (tied ratings
                       excluded), the fraction where the higher-rated response has the strictly
                       higher log-likelihood. Pooled over pairs (a record with more responses
                       weighs more). Chance: 0.5.
    kendall_tau        Kendall's tau-b between ratings and log-likelihoods, computed per record and
                       averaged over the records with >= 2 distinct ratings (tau-b handles tied
                       ratings; a record whose log-likelihoods are all equal counts as 0).
    top1_accuracy      over the records with >= 2 distinct ratings, how often the top-rated response
                       (lowest index among tied top ratings, as the training objective picks its
                       "best") has the highest log-likelihood (lowest index among exact ties).
    mean_margin        mean over the same pairs as pairwise_accuracy of
                       loglik(higher-rated) - loglik(lower-rated), in nats per token.

    python -m fastalign.evaluate --model_name_or_path DIR --data_path FILE [--output_json FILE]
    torchrun --nproc_per_node=N -m fastalign.evaluate ...     # records sharded over ranks

`evaluate_model(model, tokenizer, records, ...)` runs the same thing in-process (trainer, demo).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np


# ---------------------------------------------------------------------------------------------
# Metrics (pure numpy; one record = the ratings and log-likelihoods of its responses)
# ---------------------------------------------------------------------------------------------


@dataclass
class RecordResult:
    """Evaluation of one record: which responses were scored, their ratings and log-likelihoods."""

    index: int  # the record's position in the data file
    category: str | None
    response_indices: list[int]  # positions in the record's "responses" that were scored
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
    """Aggregate metrics over records (see the module docstring for the definitions)."""
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
