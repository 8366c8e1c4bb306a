"""fastalign.evaluate: ranking metrics against hand-computed values and loop-based references."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastalign.evaluate import kendall_tau_b, pairwise_counts, score_record, summarize, summarize_by_category, top1_correct


# --- references written from the textbook definitions, independently of the implementation ---


def reference_tau_b(x, y):
    n = len(x)
    n0 = n * (n - 1) / 2
    ties_x = sum(t * (t - 1) / 2 for t in Counter(x).values())
    ties_y = sum(t * (t - 1) / 2 for t in Counter(y).values())
    concordant = discordant = 0
    for i, j in itertools.combinations(range(n), 2):
        product = (x[i] - x[j]) * (y[i] - y[j])
        concordant += product > 0
        discordant += product < 0
    if n0 - ties_x == 0:
        return None
    if n0 - ties_y == 0:
        return 0.0
    return (concordant - discordant) / math.sqrt((n0 - ties_x) * (n0 - ties_y))


def reference_pairs(scores, logliks):
    pairs = correct = 0
    margin = 0.0
    for i, j in itertools.combinations(range(len(scores)), 2):
        if scores[i] == scores[j]:
            continue
        hi, lo = (i, j) if scores[i] > scores[j] else (j, i)
        pairs += 1
        correct += logliks[hi] > logliks[lo]
        margin += logliks[hi] - logliks[lo]
    return pairs, correct, margin


# --- hand-computed examples ---


def test_perfect_ordering():
    scores, logliks = [7, 3, 5], [-1.0, -2.0, -1.5]
    assert pairwise_counts(scores, logliks) == (3, 3, pytest.approx(2.0))  # margins 1 + 0.5 + 0.5
    assert kendall_tau_b(scores, logliks) == pytest.approx(1.0)
    assert top1_correct(scores, logliks) is True


def test_reversed_ordering():
    scores, logliks = [7, 3, 5], [-2.0, -1.0, -1.5]
    assert pairwise_counts(scores, logliks) == (3, 0, pytest.approx(-2.0))
    assert kendall_tau_b(scores, logliks) == pytest.approx(-1.0)
    assert top1_correct(scores, logliks) is False


def test_tied_top_ratings_use_lowest_index_and_exclude_tied_pair():
    # pairs: (0,1) tied -> excluded; (0,2): -2-(-3)=1 correct; (1,2): -1-(-3)=2 correct
    scores, logliks = [7, 7, 3], [-2.0, -1.0, -3.0]
    assert pairwise_counts(scores, logliks) == (2, 2, pytest.approx(3.0))
    # best is index 0 (lowest index among the 7s), the most likely is index 1
    assert top1_correct(scores, logliks) is False
    # concordant 2, discordant 0, untied pairs: x 2, y 3 -> 2 / sqrt(6)
    assert kendall_tau_b(scores, logliks) == pytest.approx(2 / math.sqrt(6))


def test_all_ratings_tied_gives_no_ranking_metrics():
    assert pairwise_counts([4, 4], [-1.0, -2.0]) == (0, 0, 0.0)
    assert kendall_tau_b([4, 4], [-1.0, -2.0]) is None
    assert top1_correct([4, 4], [-1.0, -2.0]) is None
    assert kendall_tau_b([5], [-1.0]) is None


def test_equal_logliks_count_as_wrong_and_tau_zero():
    assert pairwise_counts([7, 1], [-1.0, -1.0]) == (1, 0, 0.0)
    assert kendall_tau_b([7, 1], [-1.0, -1.0]) == 0.0


def test_summary_pools_pairs_and_averages_tau_over_ranked_records():
    results = [
        score_record(0, "a", [0, 1, 2], [7, 3, 5], [-1.0, -2.0, -1.5], [4, 4, 4]),  # 3/3, tau 1
        score_record(1, "b", [0, 1], [6, 2], [-3.0, -1.0], [2, 2]),  # 0/1, tau -1, margin -2
        score_record(2, None, [0, 1], [4, 4], [-1.0, -1.0], [1, 1]),  # no pairs, not ranked
    ]
    m = summarize(results)
    assert m["num_records"] == 3 and m["num_responses"] == 7
    assert m["num_pairs"] == 4 and m["num_ranked_records"] == 2
    assert m["pairwise_accuracy"] == pytest.approx(3 / 4)
    assert m["kendall_tau"] == pytest.approx(0.0)
    assert m["top1_accuracy"] == pytest.approx(0.5)
    assert m["top1_chance"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert m["mean_margin"] == pytest.approx((2.0 - 2.0) / 4)
    by_cat = summarize_by_category(results)
    assert set(by_cat) == {"a", "b"}
    assert by_cat["a"]["pairwise_accuracy"] == 1.0 and by_cat["b"]["pairwise_accuracy"] == 0.0


def test_summary_of_nothing_has_no_metrics():
    m = summarize([])
    assert m["num_records"] == 0 and m["pairwise_accuracy"] is None and m["kendall_tau"] is None


ratings = st.lists(st.integers(1, 7), min_size=1, max_size=8)


@settings(max_examples=200, deadline=None)
@given(ratings, st.data())
def test_metrics_match_references(scores, data):
    # few distinct values so that ties in the log-likelihoods occur too
    logliks = data.draw(st.lists(st.sampled_from([-3.0, -2.5, -1.0, -0.25]), min_size=len(scores), max_size=len(scores)))
    tau, ref_tau = kendall_tau_b(scores, logliks), reference_tau_b(scores, logliks)
    assert (tau is None) == (ref_tau is None)
    if tau is not None:
        assert tau == pytest.approx(ref_tau)
    pairs, correct, margin = pairwise_counts(scores, logliks)
    ref_pairs, ref_correct, ref_margin = reference_pairs(scores, logliks)
    assert (pairs, correct) == (ref_pairs, ref_correct)
    assert margin == pytest.approx(ref_margin)
