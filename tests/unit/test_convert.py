"""fastalign.convert: hh-rlhf / pairs / ratings files -> Sandbox records, with clean errors."""

import gzip
import json

import pytest
from helpers.records import MULTI_TURN_CHOSEN, MULTI_TURN_REJECTED

from fastalign.cli import run_main
from fastalign.convert import main
from fastalign.data import load_records

DIALOGUE = "Human: What is 2+2?\n\nAssistant: 4.\n\nHuman: And times 3?"


def write_jsonl(path, records, *, gz=False):
    text = "".join(json.dumps(record) + "\n" for record in records)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def read_records(path):
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        if ".jsonl" in path.name:
            return [json.loads(line) for line in handle if line.strip()]
        return json.load(handle)


def convert(capsys, *args):
    code = run_main(main, [str(arg) for arg in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_hh_rlhf_splits_multi_turn_dialogue_at_last_assistant_turn(tmp_path, capsys):
    source = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": MULTI_TURN_CHOSEN, "rejected": MULTI_TURN_REJECTED}])
    code, out, _ = convert(capsys, "--format", "hh-rlhf", "--input", source, "--output", tmp_path / "out.json")
    assert code == 0
    assert read_records(tmp_path / "out.json") == [{
        "query": f"### Instruction:\n{DIALOGUE}\n\n### Response:",
        "responses": ["12, since 4 x 3 = 12.", "I won't do math."],
        "scores": [7, 1],
    }]
    assert "records in: 1, written: 1, skipped: 0" in out


def test_hh_rlhf_without_template_keeps_the_raw_prompt_and_custom_scores(tmp_path, capsys):
    source = write_jsonl(tmp_path / "hh.jsonl.gz", [{"chosen": MULTI_TURN_CHOSEN, "rejected": MULTI_TURN_REJECTED}],
                         gz=True)
    code, _, _ = convert(capsys, "--format", "hh-rlhf", "--input", source, "--output", tmp_path / "out.jsonl",
                         "--no_template", "--chosen_score", "6.5", "--rejected_score", "2")
    assert code == 0
    [record] = read_records(tmp_path / "out.jsonl")
    assert record["query"] == "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And times 3?\n\nAssistant:"
    assert record["query"] + " " + record["responses"][0] == MULTI_TURN_CHOSEN
    assert record["scores"] == [6.5, 2]


def test_hh_rlhf_invalid_records_are_reported_by_reason(tmp_path, capsys):
    records = [
        {"chosen": MULTI_TURN_CHOSEN, "rejected": MULTI_TURN_REJECTED},
        {"chosen": "\n\nHuman: A?\n\nAssistant: yes", "rejected": "\n\nHuman: B?\n\nAssistant: no"},
        {"chosen": "\n\nHuman: A?\n\nAssistant: same", "rejected": "\n\nHuman: A?\n\nAssistant: same"},
        {"chosen": "\n\nHuman: A? no assistant turn", "rejected": "\n\nHuman: A?\n\nAssistant: no"},
        {"chosen": "\n\nHuman: C?\n\nAssistant: x", "rejected": "\n\nHuman: D?\n\nAssistant: y"},
        [1, 2],
    ]
    source = write_jsonl(tmp_path / "hh.jsonl", records)
    output = tmp_path / "out.jsonl"

    code, _, err = convert(capsys, "--format", "hh-rlhf", "--input", source, "--output", output)
    assert code == 2
    assert err.strip() == (f"error: {source}: record 1 (line 2), field 'chosen/rejected': chosen and rejected "
                           "do not share a prompt (pass --skip_invalid to drop invalid records and go on)")
    assert not output.exists()

    code, out, _ = convert(capsys, "--format", "hh-rlhf", "--input", source, "--output", output, "--skip_invalid")
    assert code == 0
    assert len(read_records(output)) == 1
    assert "records in: 6, written: 1, skipped: 5" in out
    assert "skipped 2: chosen/rejected: chosen and rejected do not share a prompt (records 1, 4)" in out
    assert "skipped 1: chosen/rejected: chosen and rejected are identical (record 2)" in out
    assert "skipped 1: chosen: no '\\n\\nAssistant:' turn (record 3)" in out
    assert "skipped 1: record is not a JSON object (record 5)" in out


def test_pairs_json_array_to_gzipped_jsonl(tmp_path, capsys):
    source = tmp_path / "pairs.json"
    source.write_text(json.dumps([
        {"prompt": "  Is lying ok?\n", "chosen": "Usually not.", "rejected": "Always."},
        {"prompt": "Say hi", "chosen": "Hi!", "rejected": "No."},
    ]))
    output = tmp_path / "sandbox.jsonl.gz"
    code, _, _ = convert(capsys, "--format", "pairs", "--input", source, "--output", output)
    assert code == 0
    assert read_records(output) == [
        {"query": "### Instruction:\nIs lying ok?\n\n### Response:", "responses": ["Usually not.", "Always."],
         "scores": [7, 1]},
        {"query": "### Instruction:\nSay hi\n\n### Response:", "responses": ["Hi!", "No."], "scores": [7, 1]},
    ]


def test_ratings_gzipped_json_round_trip_and_range_check(tmp_path, capsys):
    records = [{"prompt": "Q1", "completions": ["a", "b", "c"], "ratings": [3, 7, 5.5]},
               {"prompt": "Q2", "completions": ["a", "b"], "ratings": [8, 1]}]
    source = tmp_path / "rated.json.gz"
    with gzip.open(source, "wt") as handle:
        json.dump(records, handle)
    output = tmp_path / "sandbox.json.gz"

    code, _, err = convert(capsys, "--format", "ratings", "--input", source, "--output", output)
    assert code == 2
    assert "record 1, field 'ratings': rating outside [1, 7] (item 0 is 8)" in err

    code, _, _ = convert(capsys, "--format", "ratings", "--input", source, "--output", output, "--rating_scale", "10",
                         "--no_template")
    assert code == 0
    assert read_records(output) == [{"query": "Q1", "responses": ["a", "b", "c"], "scores": [3, 7, 5.5]},
                                    {"query": "Q2", "responses": ["a", "b"], "scores": [8, 1]}]


@pytest.mark.parametrize("record, message", [
    ({"completions": ["a"], "ratings": [1]}, "field 'prompt': missing field"),
    ({"prompt": 3, "completions": ["a"], "ratings": [1]}, "field 'prompt': must be a string (got number)"),
    ({"prompt": " ", "completions": ["a"], "ratings": [1]}, "field 'prompt': empty text"),
    ({"prompt": "q", "completions": [], "ratings": []}, "field 'completions': empty array"),
    ({"prompt": "q", "completions": ["a", "b"], "ratings": [1]}, "field 'ratings': length differs from completions"),
    ({"prompt": "q", "completions": ["a", 5], "ratings": [1, 2]}, "field 'completions': must hold strings"),
    ({"prompt": "q", "completions": ["a"], "ratings": [True]}, "field 'ratings': not a finite number"),
    ({"prompt": "q", "completions": ["a"], "ratings": ["7"]}, "field 'ratings': not a finite number"),
    ({"prompt": "q", "completions": ["a"], "ratings": [0.5]}, "field 'ratings': rating outside [1, 7]"),
])
def test_ratings_record_validation_names_field_and_reason(tmp_path, capsys, record, message):
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "ok", "completions": ["a"], "ratings": [2]}, record])
    code, _, err = convert(capsys, "--format", "ratings", "--input", source, "--output", tmp_path / "o.jsonl")
    assert code == 2
    assert err.startswith(f"error: {source}: record 1 (line 2), {message}")


@pytest.mark.parametrize("args, message", [
    (["--chosen_score", "8"], "--chosen_score 8.0: must lie in [1, --rating_scale 7.0]"),
    (["--chosen_score", "2", "--rejected_score", "3"], "--chosen_score 2.0 must be greater than --rejected_score 3.0"),
    (["--rating_scale", "nan"], "--rating_scale nan: must be a finite number >= 1"),
])
def test_bad_flag_values_are_named(tmp_path, capsys, args, message):
    source = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    code, _, err = convert(capsys, "--format", "pairs", "--input", source, "--output", tmp_path / "o.jsonl", *args)
    assert code == 2
    assert err.strip() == f"error: {message}"


def test_score_flags_are_refused_for_ratings(tmp_path, capsys):
    source = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "q", "completions": ["a"], "ratings": [2]}])
    code, _, err = convert(capsys, "--format", "ratings", "--input", source, "--output", tmp_path / "o.jsonl",
                           "--chosen_score", "6")
    assert code == 2 and "--chosen_score applies to --format hh-rlhf and pairs only" in err


# The input is read by fastalign.data.jsonio, so these messages are the ones load_records gives.
@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", '{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": \n',
     "record 1 (line 2): malformed JSON at column 12: Expecting value"),
    ("bad.json", '[{"prompt": "q"},\n oops]', "malformed JSON at line 2, column 2: Expecting value"),
    ("obj.json", '{"prompt": "q", "chosen": "a", "rejected": "b"}',
     "top level is a JSON object, expected an array of records"),
    ("bad.jsonl.gz", "not gzip at all", "corrupt or truncated gzip data"),
    ("latin1.jsonl", b'{"prompt": "caf\xe9"}\n', "record 0 (line 1): not valid UTF-8 at byte 15 of the line"),
    ("bom.jsonl", '\ufeff{"prompt": "q", "chosen": "a"}\n', "record 0 (line 1), field 'rejected': missing field"),
    ("empty.jsonl", "\n\n", "no valid pairs records to convert; nothing written"),
    ("data.csv", "prompt,chosen\n", "--input"),
])
def test_unreadable_input_files_fail_cleanly(tmp_path, capsys, name, content, message):
    source = tmp_path / name
    source.write_bytes(content if isinstance(content, bytes) else content.encode())
    output = tmp_path / "out.jsonl"
    output.write_text("previous contents\n")
    code, _, err = convert(capsys, "--format", "pairs", "--input", source, "--output", output)
    assert code == 2
    assert err.startswith("error: ") and message in err
    assert output.read_text() == "previous contents\n"  # a failed run leaves the old output alone
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "out.jsonl"])  # no temp file left


def test_missing_input_and_bad_output_extension(tmp_path, capsys):
    code, _, err = convert(capsys, "--format", "pairs", "--input", tmp_path / "nope.jsonl", "--output",
                           tmp_path / "o.jsonl")
    assert code == 2 and err.strip() == f"error: {tmp_path / 'nope.jsonl'}: no such file"
    source = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    code, _, err = convert(capsys, "--format", "pairs", "--input", source, "--output", tmp_path / "o.txt")
    assert code == 2 and "--output" in err and "unknown file type" in err


def test_skip_invalid_drops_malformed_lines_like_invalid_records(tmp_path, capsys):
    good = json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})
    source = tmp_path / "p.jsonl"
    source.write_bytes(f"{good}\n{{broken\n".encode() + b'{"prompt": "caf\xe9"}\n' + f"{good}\n".encode())
    code, out, _ = convert(capsys, "--format", "pairs", "--input", source, "--output", tmp_path / "o.jsonl",
                           "--skip_invalid")
    assert code == 0
    assert len(read_records(tmp_path / "o.jsonl")) == 2
    assert "records in: 4, written: 2, skipped: 2" in out
    assert "skipped 1: malformed JSON (record 1)" in out and "skipped 1: not UTF-8 (record 2)" in out


def test_output_is_deterministic(tmp_path, capsys):
    source = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": MULTI_TURN_CHOSEN, "rejected": MULTI_TURN_REJECTED}] * 3)
    first, second = tmp_path / "a" / "out.jsonl.gz", tmp_path / "b" / "out.jsonl.gz"
    for output in (first, second):
        assert convert(capsys, "--format", "hh-rlhf", "--input", source, "--output", output)[0] == 0
    assert first.read_bytes() == second.read_bytes()


@pytest.mark.parametrize("fmt, record, extra", [
    ("hh-rlhf", {"chosen": MULTI_TURN_CHOSEN, "rejected": MULTI_TURN_REJECTED}, ["--chosen_score", "5"]),
    ("pairs", {"prompt": "q", "chosen": "a", "rejected": "b"}, ["--chosen_score", "4", "--rejected_score", "2.5"]),
    ("ratings", {"prompt": "q", "completions": ["a", "b", "c"], "ratings": [1, 4.5, 4]}, []),
])
@pytest.mark.parametrize("suffix", [".json", ".jsonl.gz"])
def test_outputs_pass_the_trainers_validation(tmp_path, capsys, fmt, record, extra, suffix):
    source = write_jsonl(tmp_path / "in.jsonl", [record] * 2)
    output = tmp_path / f"out{suffix}"
    code = convert(capsys, "--format", fmt, "--input", source, "--output", output, "--rating_scale", "5", *extra)[0]
    assert code == 0
    loaded = load_records(output, rating_scale=5)
    assert [(r.query, r.responses, r.scores) for r in loaded.records] == [
        (w["query"], w["responses"], w["scores"]) for w in read_records(output)]
    assert len(loaded.records) == 2 and not loaded.skipped
