"""fastalign.evaluate: ranking metrics against hand-computed values and loop-based references."""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter

import pytest
import torch
from helpers.optional_deps import given, settings, st
from helpers.records import write_jsonl

from fastalign.cli import run_main
from fastalign.data import Record, load_records, sample_data_path
from fastalign.evaluate import (
    evaluate_model,
    kendall_tau_b,
    main,
    pairwise_counts,
    score_record,
    summarize,
    summarize_by_category,
    top1_correct,
)
from fastalign.model import Llama
from fastalign.model_dir import load_tokenizer

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
    logliks = data.draw(
        st.lists(st.sampled_from([-3.0, -2.5, -1.0, -0.25]), min_size=len(scores), max_size=len(scores))
    )
    tau, ref_tau = kendall_tau_b(scores, logliks), reference_tau_b(scores, logliks)
    assert (tau is None) == (ref_tau is None)
    if tau is not None:
        assert tau == pytest.approx(ref_tau)
    pairs, correct, margin = pairwise_counts(scores, logliks)
    ref_pairs, ref_correct, ref_margin = reference_pairs(scores, logliks)
    assert (pairs, correct) == (ref_pairs, ref_correct)
    assert margin == pytest.approx(ref_margin)


# --- scoring with a real (tiny) model ---

@pytest.fixture(scope="module")
def sample_records():
    return load_records(sample_data_path()).records[:12]


def transformers_logliks(model_dir, record, max_length):
    """Mean token log-likelihood of each response by the plain full-logits route in transformers."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    query = [tok.bos_token_id] + tok(record.query, add_special_tokens=False)["input_ids"]
    out = []
    for response in record.responses:
        ids = (tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])[: max_length - len(query)]
        full = torch.tensor([query + ids])
        with torch.no_grad():
            logp = model(full).logits[0].log_softmax(-1)
        positions = torch.arange(len(query) - 1, full.shape[1] - 1)
        out.append(logp[positions, full[0, positions + 1]].mean().item())
    return out


def test_logliks_match_transformers_full_logits(tiny_dir, sample_records):
    model, tok = Llama.from_pretrained(tiny_dir), load_tokenizer(tiny_dir)
    # small budget: several packed batches; short max length: truncated responses too
    report = evaluate_model(model, tok, sample_records[:4], model_max_length=96, max_tokens_per_batch=300)
    assert [r["index"] for r in report["records"]] == [0, 1, 2, 3]
    assert report["tokenization"]["truncated_responses"] > 0
    for row, record in zip(report["records"], sample_records):
        assert row["response_indices"] == list(range(len(record.responses)))
        assert row["scores"] == record.scores
        assert row["category"] == record.category
        assert row["logliks"] == pytest.approx(transformers_logliks(tiny_dir, record, 96), abs=1e-4)
    assert model.training  # mode restored


def test_metrics_follow_the_scored_logliks(tiny_dir, sample_records):
    model, tok = Llama.from_pretrained(tiny_dir), load_tokenizer(tiny_dir)
    report = evaluate_model(model, tok, sample_records)
    expected = summarize([score_record(r["index"], r["category"], r["response_indices"], r["scores"], r["logliks"],
                                       r["num_tokens"]) for r in report["records"]])
    assert report["metrics"] == expected
    assert report["metrics"]["num_records"] == len(sample_records)
    assert set(report["by_category"]) == {r.category for r in sample_records}


def test_num_comp_scores_a_subset_with_the_same_logliks(tiny_dir, sample_records):
    model, tok = Llama.from_pretrained(tiny_dir), load_tokenizer(tiny_dir)
    full = {r["index"]: r for r in evaluate_model(model, tok, sample_records)["records"]}
    sub = evaluate_model(model, tok, sample_records, num_comp=2, seed=5)["records"]
    assert len(sub) == len(sample_records)
    for row in sub:
        assert len(row["response_indices"]) == 2
        reference = full[row["index"]]
        assert row["logliks"] == pytest.approx([reference["logliks"][i] for i in row["response_indices"]], abs=1e-5)


def test_response_indices_name_the_records_responses_when_an_empty_one_is_dropped(tiny_dir):
    """Without EOS an empty response has no tokens and is not scored: the indices still point into the
    record's own "responses" (not into the list left after dropping), so they match the scores."""
    records = [Record(index=0, query="### Instruction:\nSay hi.\n\n### Response:",
                      responses=["Hello there.", "", "Go away."], scores=[7.0, 4.0, 1.0])]
    model, tok = Llama.from_pretrained(tiny_dir), load_tokenizer(tiny_dir)
    report = evaluate_model(model, tok, records, append_eos=False)
    (row,) = report["records"]
    assert row["response_indices"] == [0, 2] and row["scores"] == [7.0, 1.0]
    assert report["tokenization"]["dropped_empty_responses"] == 1
    # and with a --num_comp draw too: the draw's indices are mapped the same way
    (row,) = evaluate_model(model, tok, records, append_eos=False, num_comp=1, seed=3)["records"]
    assert row["response_indices"] in ([0], [2])
    assert row["scores"] == [records[0].scores[row["response_indices"][0]]]


def test_cli_prints_table_and_writes_json(tiny_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "eval.jsonl", [json.loads(line) for line in
                                                  sample_data_path().read_text().splitlines()[:6]])
    out = tmp_path / "res" / "metrics.json"
    assert run_main(main, ["--model_name_or_path", str(tiny_dir), "--data_path", str(data),
                           "--output_json", str(out), "--max_tokens_per_batch", "2000", "--bf16", "False"]) == 0
    printed = capsys.readouterr().out
    assert "pair acc" in printed and "category=" in printed
    report = json.loads(out.read_text())
    assert report["metrics"]["num_records"] == 6 and len(report["records"]) == 6
    assert report["settings"]["max_tokens_per_batch"] == 2000


def test_cli_skip_invalid_goes_on_and_reports(tiny_dir, tmp_path, capsys):
    good = json.loads(sample_data_path().read_text().splitlines()[0])
    data = write_jsonl(tmp_path / "mixed.jsonl", [good, {**good, "scores": [9] * len(good["scores"])}, "{not json"])
    out = tmp_path / "m.json"
    assert run_main(main, ["--model_name_or_path", str(tiny_dir), "--data_path", str(data), "--skip_invalid",
                           "--output_json", str(out)]) == 0
    assert "skipped 2" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["metrics"]["num_records"] == 1
    assert sum(report["skipped_invalid"].values()) == 2


@pytest.mark.parametrize("argv, expected", [
    (["--data_path", "x.jsonl"], "--model_name_or_path"),
    (["--model_name_or_path", "m", "--data_path", "x", "--num_comp", "0"], "--num_comp"),
    (["--model_name_or_path", "m", "--data_path", "x", "--bf16", "maybe"], "--bf16"),
    (["--model_name_or_path", "m", "--data_path", "x", "--no_such_flag"], "--no_such_flag"),
])
def test_cli_flag_errors_name_the_flag(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err


def test_cli_missing_inputs_are_clean_errors(tiny_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "ok.jsonl", sample_data_path().read_text().splitlines()[:1])
    assert run_main(main, ["--model_name_or_path", str(tiny_dir), "--data_path", str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl" in capsys.readouterr().err
    assert run_main(main, ["--model_name_or_path", str(tmp_path / "no_model"), "--data_path", str(data)]) == 2
    assert "no_model" in capsys.readouterr().err


def test_wrapped_model_scores_through_a_forward_hook(tiny_dir, sample_records):
    """The trainer's route: its Llama + loss module, called through `forward`, gives the same report."""
    from fastalign.alignment_model import AlignmentModel, run_batch

    llama, tok = Llama.from_pretrained(tiny_dir), load_tokenizer(tiny_dir)
    plain = evaluate_model(llama, tok, sample_records[:5])
    wrapped = AlignmentModel(llama, rating_scale=7.0, margin=1.0, ratio=0.2, max_flow=False, margin_mode="paper",
                             loss_backend="torch")
    hooked = evaluate_model(wrapped, tok, sample_records[:5], forward=lambda batch: run_batch(wrapped, batch)["nll"])
    assert hooked["metrics"] == pytest.approx(plain["metrics"])
    for a, b in zip(plain["records"], hooked["records"]):
        assert a["logliks"] == pytest.approx(b["logliks"], abs=1e-6)
