"""fastalign.token_cache: entries give back exactly the tokenized groups, keys follow content,
tokenizer and flags, and a 2-rank run tokenizes once (then not at all on the next run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastalign.data import load_records, sample_data_path, tokenize_records
from fastalign.errors import DataError
from fastalign.tiny import build_tokenizer, sandbox_texts
from fastalign.token_cache import cache_key, cached_groups, read_entry, write_entry
from test_train import REPO, common, metrics, ok, tiny  # noqa: F401  (tiny: fixture)

SETTINGS = {"model_max_length": 96, "append_eos": False, "stop_response": True, "rating_scale": 7.0,
            "skip_invalid": False}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return build_tokenizer(sandbox_texts(sample_data_path()), 300, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tokenized(tokenizer_dir):
    from transformers import AutoTokenizer

    records = load_records(sample_data_path()).records[:30]
    # an empty response without EOS is dropped from its group: response_positions skip it
    emptied = next(i for i, r in enumerate(records) if len(r.responses) >= 3)
    records[emptied].responses[1] = ""
    data = tokenize_records(records, AutoTokenizer.from_pretrained(str(tokenizer_dir)),
                            model_max_length=SETTINGS["model_max_length"], append_eos=False, stop_response=True)
    return data, emptied


def test_entry_gives_back_the_same_groups(tokenized, tmp_path):
    tokenized, emptied = tokenized
    assert tokenized.stats["dropped_empty_responses"] == 1 and tokenized.stats["truncated_responses"] > 0
    meta = {"valid_records": 30, "skipped": {"score out of range": 2}}
    write_entry(tmp_path / "e.npz", tokenized, meta)
    back, back_meta = read_entry(tmp_path / "e.npz")
    assert back.groups == tokenized.groups and back.stats == tokenized.stats and back_meta == meta
    group = next(g for g in back.groups if g.record_index == emptied)
    assert group.response_positions[:2] == [0, 2]


def test_key_follows_content_tokenizer_and_settings(tokenizer_dir, tmp_path):
    data = tmp_path / "a.jsonl"
    data.write_text(sample_data_path().read_text())
    key = cache_key(data, tokenizer_dir, SETTINGS)
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(data.read_bytes())
    assert cache_key(copy, tokenizer_dir, SETTINGS) == key  # content, not the name
    edited = tmp_path / "edited.jsonl"
    edited.write_text(data.read_text().replace("the", "The", 1))
    assert cache_key(edited, tokenizer_dir, SETTINGS) != key
    for flag, value in (("model_max_length", 65), ("append_eos", True), ("stop_response", False),
                        ("rating_scale", 10.0), ("skip_invalid", True)):
        assert cache_key(data, tokenizer_dir, {**SETTINGS, flag: value}) != key, flag
    other_tok = tmp_path / "tok2"
    other_tok.mkdir()
    for f in Path(tokenizer_dir).iterdir():
        (other_tok / f.name).write_bytes(f.read_bytes())
    assert cache_key(data, other_tok, SETTINGS) == key
    config = json.loads((other_tok / "tokenizer_config.json").read_text())
    config["eos_token"] = "<s>"
    (other_tok / "tokenizer_config.json").write_text(json.dumps(config))
    assert cache_key(data, other_tok, SETTINGS) != key


def test_rank_0_tokenizes_once_writes_and_the_rest_read(tokenized, tokenizer_dir, tmp_path):
    tokenized, _ = tokenized
    calls = []

    def make():
        calls.append(1)
        return tokenized, {"valid_records": 30, "skipped": {}}

    shared = {}

    def rank0_broadcast(obj):  # what broadcast_object gives every rank: rank 0's value
        shared["status"] = obj
        return obj

    kwargs = dict(data_path=str(sample_data_path()), tokenizer_dir=str(tokenizer_dir), settings=SETTINGS,
                  cache_dir=tmp_path / "cache")
    first = cached_groups(make, rank=0, broadcast=rank0_broadcast, **kwargs)
    assert first[2] == "tokenized" and len(calls) == 1
    other = cached_groups(make, rank=1, broadcast=lambda _: shared["status"], **kwargs)
    assert other[2] == "read from rank 0" and len(calls) == 1 and other[0].groups == tokenized.groups
    again = cached_groups(make, rank=0, broadcast=rank0_broadcast, **kwargs)
    assert again[2] == "cache hit" and len(calls) == 1 and again[0].groups == tokenized.groups
    # a damaged entry is made again
    (entry,) = (tmp_path / "cache").glob("*.npz")
    entry.write_bytes(b"not a zip")
    assert cached_groups(make, rank=0, broadcast=rank0_broadcast, **kwargs)[2] == "tokenized" and len(calls) == 2


def test_a_data_error_of_rank_0_is_raised_on_every_rank(tokenizer_dir, tmp_path):
    def bad():
        raise DataError("data.jsonl: record 3, field 'scores': missing")

    shared = {}

    def rank0_broadcast(obj):
        shared["status"] = obj
        return obj

    kwargs = dict(data_path=str(sample_data_path()), tokenizer_dir=str(tokenizer_dir), settings=SETTINGS,
                  cache_dir=tmp_path)
    with pytest.raises(DataError, match="record 3"):
        cached_groups(bad, rank=0, broadcast=rank0_broadcast, **kwargs)
    with pytest.raises(DataError, match="record 3"):
        cached_groups(lambda: pytest.fail("rank 1 must not tokenize"), rank=1,
                      broadcast=lambda _: shared["status"], **kwargs)


# Counts tokenize_records calls per process, then runs the command's own main().
COUNTING_MAIN = """
import os, sys
import fastalign.data as data
from fastalign import train
from fastalign.cli import exit_process, run_main
original = data.tokenize_records
def counted(*args, **kwargs):
    print(f"TOKENIZE rank={os.environ.get('RANK')}", flush=True)
    return original(*args, **kwargs)
data.tokenize_records = counted
exit_process(run_main(train.main, sys.argv[1:]))
"""


@pytest.mark.slow
def test_two_rank_run_tokenizes_once_and_the_next_run_not_at_all(tiny, tmp_path):
    model, data = tiny
    script = tmp_path / "counting_main.py"
    script.write_text(COUNTING_MAIN)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    runs = []
    # the same global batches: 2 ranks x 1 micro-batch, then 1 rank x 2 accumulated micro-batches
    for name, launch, accumulation in (("two_ranks", ["-m", "torch.distributed.run", "--standalone",
                                                      "--nproc_per_node=2"], 1), ("one_rank", [], 2)):
        out = tmp_path / name
        flags = common(model, data, out, max_steps=2, per_device_train_batch_size=2,
                       gradient_accumulation_steps=accumulation, token_cache_dir=tmp_path / "cache",
                       disable_tqdm=True)
        result = ok(subprocess.run([sys.executable, *launch, str(script), *flags], capture_output=True,
                                   text=True, timeout=300, cwd=REPO, env=env))
        runs.append((result.stdout.count("TOKENIZE"), result, metrics(out)))
    assert runs[0][0] == 1 and "TOKENIZE rank=0" in runs[0][1].stdout
    assert runs[1][0] == 0 and "(cache hit)" in runs[1][1].stderr
    # the groups read back train exactly as the tokenized ones did
    assert [m["loss"] for m in runs[1][2]] == pytest.approx([m["loss"] for m in runs[0][2]], rel=1e-5)
