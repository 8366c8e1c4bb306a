"""Loading, validation and tokenization of sandbox records (fastalign.data)."""

from __future__ import annotations

import gzip
import json

import pytest
from helpers.tokenizer import build_tokenizer

from fastalign.data import (
    REASON_CATEGORY_TYPE,
    REASON_EMPTY_RESPONSES,
    REASON_LENGTH_MISMATCH,
    REASON_MALFORMED_JSON,
    REASON_MISSING_QUERY,
    REASON_MISSING_RESPONSES,
    REASON_MISSING_SCORES,
    REASON_NOT_OBJECT,
    REASON_NOT_UTF8,
    REASON_QUERY_TYPE,
    REASON_RESPONSES_TYPE,
    REASON_SCORE_NOT_FINITE,
    REASON_SCORE_RANGE,
    REASON_SCORES_TYPE,
    DataError,
    LoadedRecords,
    cut_at_turn_marker,
    load_records,
    pack_groups,
    sample_data_path,
    tokenize_records,
)
from fastalign.errors import DataError as ErrorsDataError

GOOD = [
    {"query": "### Instruction:\nq0\n\n### Response:", "responses": ["a", "b"], "scores": [7, 3],
     "models": ["m1", "m2"]},
    {"query": "q1", "responses": ["only"], "scores": [4.5], "category": "privacy"},
    {"query": "q2", "responses": ["x", "y", "z"], "scores": [1, 7, 2], "category": None},
]


def write(path, records, *, fmt=None):
    """Write records as a JSON array (.json) or JSONL (.jsonl), gzip when the name ends .gz."""
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    if name.endswith(".json"):
        text = json.dumps(records)
    else:
        text = "".join(json.dumps(r) + "\n" for r in records)
    data = text.encode("utf-8")
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


# ------------------------------------------------------------------------------------ formats


@pytest.mark.parametrize("name", ["d.json", "d.jsonl", "d.json.gz", "d.jsonl.gz"])
def test_every_format_loads_the_same_records(tmp_path, name):
    loaded = load_records(write(tmp_path / name, GOOD))
    assert isinstance(loaded, LoadedRecords) and loaded.path == str(tmp_path / name)
    assert loaded.skipped == {}
    assert [r.index for r in loaded.records] == [0, 1, 2]
    assert [r.query for r in loaded.records] == [g["query"] for g in GOOD]
    assert [r.responses for r in loaded.records] == [g["responses"] for g in GOOD]
    assert [r.scores for r in loaded.records] == [[7.0, 3.0], [4.5], [1.0, 7.0, 2.0]]
    assert all(isinstance(s, float) for r in loaded.records for s in r.scores)
    assert [r.category for r in loaded.records] == [None, "privacy", None]


def test_unknown_suffix_is_sniffed(tmp_path):
    array = tmp_path / "array.txt"
    array.write_text(json.dumps(GOOD))
    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(json.dumps(r) for r in GOOD))
    assert len(load_records(array).records) == len(load_records(lines).records) == 3


def test_jsonl_tolerates_blank_lines_crlf_bom_and_counts_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    body = "\r\n".join(json.dumps(r) for r in GOOD[:2]) + "\r\n\r\n" + json.dumps({"query": 1})
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    with pytest.raises(DataError, match=r"record 2 \(line 4\), field 'query'"):
        load_records(path)
    loaded = load_records(path, skip_invalid=True)
    assert [r.index for r in loaded.records] == [0, 1]


def test_utf8_text_round_trips(tmp_path):
    record = {"query": "café 東京 🙂", "responses": ["naïve"], "scores": [5]}
    loaded = load_records(write(tmp_path / "u.jsonl.gz", [record]))
    assert loaded.records[0].query == "café 東京 🙂" and loaded.records[0].responses == ["naïve"]


def test_data_error_is_the_errors_module_class():
    assert DataError is ErrorsDataError


# ------------------------------------------------------------------------------------ bad records

# (record, skip reason, field named in the message, fragment of the reason text)
BAD_RECORDS = [
    (["not", "an", "object"], REASON_NOT_OBJECT, None, "record is a JSON array, expected an object"),
    ("text", REASON_NOT_OBJECT, None, "record is a JSON string"),
    ({"responses": ["a"], "scores": [1]}, REASON_MISSING_QUERY, "query", "missing"),
    ({"query": ["q"], "responses": ["a"], "scores": [1]}, REASON_QUERY_TYPE, "query",
     "expected a string, got a JSON array"),
    ({"query": None, "responses": ["a"], "scores": [1]}, REASON_QUERY_TYPE, "query", "got a JSON null"),
    ({"query": "q", "scores": [1]}, REASON_MISSING_RESPONSES, "responses", "missing"),
    ({"query": "q", "responses": "a", "scores": [1]}, REASON_RESPONSES_TYPE, "responses", "expected a list of strings"),
    ({"query": "q", "responses": ["a", 3], "scores": [1, 2]}, REASON_RESPONSES_TYPE, "responses[1]",
     "expected a string, got a JSON number"),
    ({"query": "q", "responses": [], "scores": []}, REASON_EMPTY_RESPONSES, "responses", "at least one response"),
    ({"query": "q", "responses": ["a"]}, REASON_MISSING_SCORES, "scores", "missing"),
    ({"query": "q", "responses": ["a"], "scores": 5}, REASON_SCORES_TYPE, "scores", "expected a list of numbers"),
    ({"query": "q", "responses": ["a"], "scores": ["7"]}, REASON_SCORES_TYPE, "scores[0]",
     "expected a number, got a JSON string"),
    ({"query": "q", "responses": ["a", "b"], "scores": [3, True]}, REASON_SCORES_TYPE, "scores[1]",
     "got a JSON boolean"),
    ({"query": "q", "responses": ["a"], "scores": [None]}, REASON_SCORES_TYPE, "scores[0]", "got a JSON null"),
    ({"query": "q", "responses": ["a", "b"], "scores": [3]}, REASON_LENGTH_MISMATCH, "scores",
     "2 responses but 1 scores"),
    ({"query": "q", "responses": ["a", "b"], "scores": [3, 8]}, REASON_SCORE_RANGE, "scores[1]",
     "score 8 is outside [1, 7]"),
    ({"query": "q", "responses": ["a"], "scores": [-1]}, REASON_SCORE_RANGE, "scores[0]", "score -1 is outside [1, 7]"),
    ({"query": "q", "responses": ["a"], "scores": [0.999]}, REASON_SCORE_RANGE, "scores[0]", "outside"),
    ({"query": "q", "responses": ["a"], "scores": [10 ** 400]}, REASON_SCORE_RANGE, "scores[0]", "outside"),
    ({"query": "q", "responses": ["a"], "scores": [3], "category": 5}, REASON_CATEGORY_TYPE, "category",
     "expected a string or null"),
]


@pytest.mark.parametrize("name", ["d.jsonl", "d.json"])
@pytest.mark.parametrize("bad,reason,field,fragment", BAD_RECORDS)
def test_each_bad_record_raises_naming_file_index_field_and_reason(tmp_path, name, bad, reason, field, fragment):
    path = write(tmp_path / name, [GOOD[0], bad, GOOD[1]])
    with pytest.raises(DataError) as info:
        load_records(path)  # raises: nothing is returned, so nothing half-loaded reaches the caller
    message = str(info.value)
    assert message.startswith(f"{path}: record 1")
    if name.endswith(".jsonl"):
        assert "(line 2)" in message
    if field is not None:
        assert f"field '{field}'" in message
    assert fragment in message
    assert "--skip_invalid" in message

    loaded = load_records(path, skip_invalid=True)
    assert loaded.skipped == {reason: 1}
    assert [r.index for r in loaded.records] == [0, 2]  # kept records keep their file index
    assert loaded.records[1].query == GOOD[1]["query"]
    assert reason in loaded.skipped_summary() and fragment in loaded.first_skipped[reason]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_json_literals_are_rejected(tmp_path, literal):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD[0]) + "\n" + f'{{"query": "q", "responses": ["a"], "scores": [{literal}]}}\n')
    with pytest.raises(
        DataError, match=r"record 1 \(line 2\), field 'scores\[0\]': score -?(nan|inf) is not a finite number"
    ):
        load_records(path)
    assert load_records(path, skip_invalid=True).skipped == {REASON_SCORE_NOT_FINITE: 1}


def test_rating_scale_sets_the_valid_range(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"query": "q", "responses": ["a", "b"], "scores": [9, 10]}])
    assert load_records(path, rating_scale=10).records[0].scores == [9.0, 10.0]
    with pytest.raises(DataError, match=r"score 9 is outside \[1, 7\]"):
        load_records(path)


def test_bad_record_at_the_end_still_fails_the_whole_load(tmp_path):
    bad = {"query": "q", "responses": ["a"], "scores": [8]}
    path = write(tmp_path / "d.jsonl", GOOD * 10 + [bad])
    with pytest.raises(DataError, match="record 30 \\(line 31\\)"):
        load_records(path)


def test_skip_invalid_counts_each_reason(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(GOOD[0]),
             json.dumps({"query": "q", "responses": ["a"], "scores": [8]}),
             '{"query": "q", "responses": ["a"], "scores": [',  # malformed line
             json.dumps({"query": "q", "responses": ["a"], "scores": [0]}),
             json.dumps([1, 2]),
             json.dumps(GOOD[1])]
    path.write_text("\n".join(lines) + "\n")
    loaded = load_records(path, skip_invalid=True)
    assert loaded.skipped == {REASON_SCORE_RANGE: 2, REASON_MALFORMED_JSON: 1, REASON_NOT_OBJECT: 1}
    assert loaded.num_skipped == 4
    assert [r.index for r in loaded.records] == [0, 5]
    summary = loaded.skipped_summary()
    assert summary.startswith(f"skipped 4 of 6 records in {path}: score out of range: 2")


# ------------------------------------------------------------------------------------ bad files


def test_malformed_jsonl_line_names_line_and_column(tmp_path):
    path = tmp_path / "d.jsonl"
    bad_line = '{"query": "q", "responses": ["a"] "scores": [1]}'  # missing comma before "scores"
    path.write_text(json.dumps(GOOD[0]) + "\n" + bad_line + "\n")
    with pytest.raises(DataError) as info:
        load_records(path)
    column = bad_line.index('"scores"') + 1
    assert str(info.value).startswith(f"{path}: record 1 (line 2): malformed JSON at column {column}: Expecting ','")


def test_truncated_jsonl_says_so_and_can_be_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    full = json.dumps(GOOD[1])
    path.write_text(json.dumps(GOOD[0]) + "\n" + full[: len(full) // 2])
    with pytest.raises(DataError, match=r"record 1 \(line 2\): malformed JSON .*truncated file\?"):
        load_records(path)
    loaded = load_records(path, skip_invalid=True)
    assert loaded.skipped == {REASON_MALFORMED_JSON: 1} and len(loaded.records) == 1


def test_non_utf8_line_is_an_error_or_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(GOOD[0]).encode() + b'\n{"query": "\xff"}\n' + json.dumps(GOOD[1]).encode())
    with pytest.raises(DataError, match=r"record 1 \(line 2\): not valid UTF-8"):
        load_records(path)
    assert load_records(path, skip_invalid=True).skipped == {REASON_NOT_UTF8: 1}


def test_malformed_json_array_gives_position_and_cannot_be_skipped(tmp_path):
    path = tmp_path / "d.json"
    text = json.dumps(GOOD, indent=1)
    path.write_text(text[: len(text) - 40])  # truncated inside the last record
    with pytest.raises(DataError) as info:
        load_records(path)
    message = str(info.value)
    assert message.startswith(f"{path}: malformed JSON at line ") and ", column " in message
    assert "truncated" in message
    with pytest.raises(DataError, match="--skip_invalid cannot skip past an error inside a JSON array"):
        load_records(path, skip_invalid=True)


def test_jsonl_content_in_a_json_file_gets_a_hint(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("\n".join(json.dumps(r) for r in GOOD))
    with pytest.raises(DataError, match=r"line 2, column 1: Extra data .*name the file \.jsonl"):
        load_records(path)


@pytest.mark.parametrize("top", [{"records": GOOD}, "text", 3])
def test_json_top_level_must_be_an_array(tmp_path, top):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(top))
    with pytest.raises(DataError, match=rf"{path}: top level is a JSON \w+, expected an array of records"):
        load_records(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'nope.jsonl'}: no such file"):
        load_records(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="is a directory"):
        load_records(tmp_path)


def test_corrupt_and_truncated_gzip(tmp_path):
    corrupt = tmp_path / "c.jsonl.gz"
    corrupt.write_bytes(b"this is not gzip at all")
    with pytest.raises(DataError, match=f"{corrupt}: corrupt or truncated gzip data"):
        load_records(corrupt)
    whole = gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in GOOD * 50))
    truncated = tmp_path / "t.json.gz"
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=f"{truncated}: corrupt or truncated gzip data"):
        load_records(truncated)


def test_gzip_is_recognised_by_magic_bytes(tmp_path):
    path = tmp_path / "compressed.jsonl"
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in GOOD).encode()))
    assert len(load_records(path).records) == 3


def test_empty_file_and_all_invalid(tmp_path):
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="contains no records"):
        load_records(empty)
    empty_array = tmp_path / "e.json"
    empty_array.write_text("[]")
    with pytest.raises(DataError, match="contains no records"):
        load_records(empty_array)
    bad = write(tmp_path / "b.jsonl", [{"query": "q", "responses": ["a"], "scores": [9]}] * 3)
    with pytest.raises(DataError, match=r"no valid records \(all skipped: score out of range: 3\)"):
        load_records(bad, skip_invalid=True)


def test_sample_data_path_points_into_the_package():
    path = sample_data_path()
    assert path.name == "sample_sandbox.jsonl" and path.parent.name == "data"
    assert path.parent.parent.name == "fastalign"


# ------------------------------------------------------------------------------------ tokenization


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _records(tmp_path, records, **kwargs):
    return load_records(write(tmp_path / "r.jsonl", records), **kwargs)


def test_query_and_responses_tokenized_separately_with_bos_and_eos(tmp_path, hf_tokenizer):
    tok = hf_tokenizer
    # Split a text where BPE merges across the cut, so joint tokenization would differ.
    text = "The quick brown fox jumps over the lazy dog."
    cut = next(i for i in range(1, len(text)) if _ids(tok, text[:i]) + _ids(tok, text[i:]) != _ids(tok, text))
    query, response = text[:cut], text[cut:]
    loaded = _records(tmp_path, [{"query": query, "responses": [response, "dog"], "scores": [2, 6]}])
    data = tokenize_records(loaded, tok)
    (group,) = data.groups
    assert group.record_index == 0
    assert group.query_ids == [tok.bos_token_id] + _ids(tok, query)
    assert group.response_ids == [_ids(tok, response) + [tok.eos_token_id], _ids(tok, "dog") + [tok.eos_token_id]]
    assert group.scores == [2.0, 6.0] and group.response_positions == [0, 1]
    assert group.query_ids[1:] + group.response_ids[0][:-1] != _ids(tok, text)  # the boundary is exact
    assert data.stats["groups"] == 1 and data.stats["responses"] == 2 and data.stats["records"] == 1
    assert data.stats["tokens"] == pack_groups(data.groups).num_tokens


def test_no_append_eos(tmp_path, hf_tokenizer):
    loaded = _records(tmp_path, [{"query": "q", "responses": ["fox"], "scores": [2]}])
    (group,) = tokenize_records(loaded, hf_tokenizer, append_eos=False).groups
    assert group.response_ids == [_ids(hf_tokenizer, "fox")]


def test_tokenizer_without_bos_or_eos(tmp_path):
    tok = build_tokenizer(tmp_path / "plain", bos=False, eos=False)
    assert tok.bos_token_id is None and tok.eos_token_id is None and tok.pad_token_id is None
    loaded = _records(tmp_path, [
        {"query": "Hello", "responses": ["", "fox", ""], "scores": [7, 2, 5]},   # empty responses removed
        {"query": "Hello", "responses": ["", ""], "scores": [7, 2]},             # nothing left: dropped
        {"query": "", "responses": ["fox"], "scores": [3]},                       # no query token: dropped
    ])
    data = tokenize_records(loaded, tok)
    (group,) = data.groups
    assert group.query_ids == _ids(tok, "Hello")
    assert group.response_ids == [_ids(tok, "fox")] and group.scores == [2.0]
    assert group.response_positions == [1]  # "fox" is responses[1] of its record
    assert data.stats["dropped_empty_responses"] == 4
    assert data.stats["dropped_no_responses"] == 1
    assert data.stats["dropped_empty_query"] == 1
    assert data.stats["groups"] == 1 and data.stats["responses"] == 1


def test_empty_response_with_eos_is_just_eos(tmp_path, hf_tokenizer):
    loaded = _records(tmp_path, [{"query": "", "responses": [""], "scores": [3]}])
    (group,) = tokenize_records(loaded, hf_tokenizer).groups
    assert group.query_ids == [hf_tokenizer.bos_token_id]
    assert group.response_ids == [[hf_tokenizer.eos_token_id]]


def test_stop_response_cuts_at_first_turn_marker(tmp_path, hf_tokenizer):
    tok = hf_tokenizer
    responses = ["Keep it.\n\nHuman: really?\n\nAssistant: yes", "No.\n\nAssistant: ok\n\nHuman: hm", "Plain answer."]
    assert [cut_at_turn_marker(r) for r in responses] == ["Keep it.", "No.", "Plain answer."]
    loaded = _records(tmp_path, [{"query": "q", "responses": responses, "scores": [1, 2, 3]}])
    stopped = tokenize_records(loaded, tok, stop_response=True)
    assert stopped.groups[0].response_ids == [
        _ids(tok, t) + [tok.eos_token_id] for t in ["Keep it.", "No.", "Plain answer."]
    ]
    assert stopped.stats["stopped_responses"] == 2
    unstopped = tokenize_records(loaded, tok)
    assert unstopped.groups[0].response_ids[0] == _ids(tok, responses[0]) + [tok.eos_token_id]
    assert unstopped.stats["stopped_responses"] == 0


def test_truncation_cuts_responses_from_the_end_and_drops_queries_without_room(tmp_path, hf_tokenizer):
    tok = hf_tokenizer
    query = "The quick brown fox"
    long_response = "jumps over the lazy dog. Stable alignment trains on rated responses."
    query_ids = [tok.bos_token_id] + _ids(tok, query)
    full = _ids(tok, long_response) + [tok.eos_token_id]
    limit = len(query_ids) + 5
    loaded = _records(tmp_path, [
        {"query": query, "responses": [long_response, "dog"], "scores": [5, 4]},
        {"query": query + " " + long_response, "responses": ["dog"], "scores": [5]},   # query alone too long
    ])
    data = tokenize_records(loaded, tok, model_max_length=limit)
    (group,) = data.groups
    assert group.response_ids[0] == full[:5]  # cut from the end: EOS gone first
    assert group.response_ids[1] == _ids(tok, "dog") + [tok.eos_token_id]  # short one untouched
    assert all(len(group.query_ids) + len(r) <= limit for r in group.response_ids)
    assert data.stats["truncated_responses"] == 1 and data.stats["dropped_no_room"] == 1
    assert data.stats["max_sequence_tokens"] == limit

    # Exactly one token of room: a 1-token response; no room at all: dropped.
    one = tokenize_records(loaded.records[:1], tok, model_max_length=len(query_ids) + 1)
    assert [len(r) for r in one.groups[0].response_ids] == [1, 1]
    none = tokenize_records(loaded.records[:1], tok, model_max_length=len(query_ids))
    assert none.groups == [] and none.stats["dropped_no_room"] == 1


def test_chunked_batch_tokenization_matches_one_by_one(tmp_path, hf_tokenizer):
    records = [{"query": f"Instruction {i}: what about café {i}?",
                "responses": [f"answer {j} " * (i % 4) for j in range(1 + i % 3)],
                "scores": [1 + (i + j) % 7 for j in range(1 + i % 3)]} for i in range(23)]
    loaded = _records(tmp_path, records)
    chunked = tokenize_records(loaded, hf_tokenizer, chunk_size=5, progress=True)
    whole = tokenize_records(loaded, hf_tokenizer, chunk_size=1000)
    assert chunked == whole
    for record, group in zip(loaded.records, whole.groups):
        assert group.record_index == record.index
        assert group.query_ids == [hf_tokenizer.bos_token_id] + _ids(hf_tokenizer, record.query)
        assert group.response_ids == [_ids(hf_tokenizer, r) + [hf_tokenizer.eos_token_id] for r in record.responses]


def test_backend_truncation_setting_does_not_leak_into_tokenization(tmp_path):
    """A tokenizer.json may enable truncation; fastalign's ids must still be the untruncated ones."""
    tok = build_tokenizer(tmp_path / "truncating")
    tok.backend_tokenizer.enable_truncation(max_length=2)
    text = "jumps over the lazy dog. Stable alignment trains on rated responses."
    loaded = _records(tmp_path, [{"query": "The quick brown fox", "responses": [text], "scores": [3]}])
    (group,) = tokenize_records(loaded, tok).groups
    assert tok.backend_tokenizer.truncation is None
    assert group.response_ids == [tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    assert len(group.response_ids[0]) > 3


class CharTokenizer:
    """A minimal non-HF, non-fast tokenizer: one id per character, BOS 1, EOS 2."""

    bos_token_id = 1
    eos_token_id = 2

    def __call__(self, texts, add_special_tokens=True, **kwargs):
        assert add_special_tokens is False and isinstance(texts, list)
        return {"input_ids": [[ord(c) for c in text] for text in texts]}


def test_any_tokenizer_with_the_call_interface_works(tmp_path):
    loaded = _records(tmp_path, [{"query": "ab", "responses": ["c", "de"], "scores": [1, 7]}])
    (group,) = tokenize_records(loaded, CharTokenizer(), model_max_length=4).groups
    assert group.query_ids == [1, 97, 98]
    assert group.response_ids == [[99], [100]]  # "c"+EOS and "de"+EOS cut to the 1 token of room
    assert group.scores == [1.0, 7.0]
