"""fastalign.data.token_cache: entries give back exactly the tokenized groups, keys follow content,
tokenizer and flags, a 2-rank run tokenizes once (then not at all on the next run), and an entry
that is damaged or made by hand (the cache directory may be shared) is a miss, rewritten, never a
crash nor a memory blow-up, on every rank alike."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from helpers.cache_entries import rewrite, setitem

from fastalign.data import load_records, sample_data_path, token_cache, tokenize_records
from fastalign.data.token_cache import BadEntry, cache_key, cached_groups, entry_digest, read_entry, write_entry
from fastalign.data.tokenization import TokenizedData
from fastalign.errors import DataError
from fastalign.tiny import build_tokenizer, sandbox_texts

VOCAB = 300  # the module's tokenizer's
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


class TwoRanks:
    """cached_groups as rank 0 and rank 1 of one run call it: rank 1's broadcast returns rank 0's
    last status, and `calls` counts the tokenizations (`make`) of both."""

    def __init__(self, tokenized, tokenizer_dir, cache_dir: Path) -> None:
        self.tokenized, self.calls, self.status = tokenized, 0, None
        self.kwargs = dict(data_path=str(sample_data_path()), tokenizer_dir=str(tokenizer_dir), settings=SETTINGS,
                           cache_dir=cache_dir, vocab_size=VOCAB)

    def make(self):
        self.calls += 1
        return self.tokenized, {"valid_records": 30, "skipped": {}}

    def _publish(self, status):  # what broadcast_object gives every rank: rank 0's value
        self.status = status
        return status

    def rank0(self):
        return cached_groups(self.make, rank=0, broadcast=self._publish, **self.kwargs)

    def rank1(self):
        return cached_groups(self.make, rank=1, broadcast=lambda _: self.status, **self.kwargs)


@pytest.fixture
def ranks(tokenized, tokenizer_dir, tmp_path):
    return TwoRanks(tokenized[0], tokenizer_dir, tmp_path / "cache")


def test_entry_gives_back_the_same_groups(tokenized, tmp_path):
    tokenized, emptied = tokenized
    assert tokenized.stats["dropped_empty_responses"] == 1 and tokenized.stats["truncated_responses"] > 0
    meta = {"valid_records": 30, "skipped": {"score out of range": 2}}
    digest = write_entry(tmp_path / "e.npz", tokenized, meta)
    back, back_meta, back_digest = read_entry(tmp_path / "e.npz", vocab_size=VOCAB, max_score=7.0)
    assert back_digest == digest and back_meta == meta
    assert back.groups == tokenized.groups and back.stats == tokenized.stats
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


def test_rank_0_tokenizes_once_writes_and_the_rest_read(ranks):
    first = ranks.rank0()
    assert first[2] == "tokenized" and ranks.calls == 1
    other = ranks.rank1()
    assert other[2] == "read from rank 0" and ranks.calls == 1 and other[0].groups == ranks.tokenized.groups
    again = ranks.rank0()
    assert again[2] == "cache hit" and ranks.calls == 1 and again[0].groups == ranks.tokenized.groups
    # a damaged entry is made again
    (entry,) = ranks.kwargs["cache_dir"].glob("*.npz")
    entry.write_bytes(b"not a zip")
    assert ranks.rank0()[2] == "tokenized" and ranks.calls == 2


def test_a_data_error_of_rank_0_is_raised_on_every_rank(tokenizer_dir, tmp_path):
    def bad():
        raise DataError("data.jsonl: record 3, field 'scores': missing")

    shared = {}

    def rank0_broadcast(obj):
        shared["status"] = obj
        return obj

    kwargs = dict(data_path=str(sample_data_path()), tokenizer_dir=str(tokenizer_dir), settings=SETTINGS,
                  cache_dir=tmp_path, vocab_size=VOCAB)
    with pytest.raises(DataError, match="record 3"):
        cached_groups(bad, rank=0, broadcast=rank0_broadcast, **kwargs)
    with pytest.raises(DataError, match="record 3"):
        cached_groups(lambda: pytest.fail("rank 1 must not tokenize"), rank=1,
                      broadcast=lambda _: shared["status"], **kwargs)


# ----------------------------------------------------------------------------- untrusted entries


def declare_huge_response_tokens(path: Path) -> None:
    """A zip whose response_tokens header declares 2**40 int32 values (4 TiB) over 8 stored bytes."""
    with np.load(path, allow_pickle=False) as entry:
        arrays = {name: entry[name] for name in entry.files}
    with zipfile.ZipFile(path, "w") as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w") as member:
                if name == "response_tokens":
                    np.lib.format.write_array_header_1_0(
                        member, {"descr": "<i4", "fortran_order": False, "shape": (2 ** 40,)})
                    member.write(np.zeros(2, dtype=np.int32).tobytes())
                else:
                    np.lib.format.write_array(member, array, allow_pickle=False)


POISONS = {  # name: (how the entry is spoiled, words of the warning's reason)
    # (ids far beyond it, which the old reader expanded until memory ran out: the trainer's test below,
    # under a memory limit, so that a regression cannot take this machine down)
    "id just past the vocabulary": (lambda p: rewrite(p, response_tokens=setitem(3, VOCAB)),
                                    "response_tokens hold token id 300 outside the model's vocabulary [0, 300)"),
    "negative id": (lambda p: rewrite(p, query_tokens=setitem(0, -5)), "query_tokens hold token id -5 outside"),
    "NaN score": (lambda p: rewrite(p, scores=setitem(1, np.nan)), "scores hold a NaN"),
    "score above the rating scale": (lambda p: rewrite(p, scores=setitem(0, 8.0)), "outside the rating scale [1, 7.0]"),
    "non-monotone offsets": (lambda p: rewrite(p, response_offsets=lambda a: a[[0, 2, 1, *range(3, len(a))]]),
                             "response_offsets are not increasing"),
    "wrong dtype": (lambda p: rewrite(p, query_tokens=lambda a: a.astype(np.int64)), "query_tokens: dtype int64"),
    "truncated array": (lambda p: rewrite(p, response_tokens=lambda a: a[:-1]), "response_tokens holds"),
    "counts that do not add up": (lambda p: rewrite(p, responses_per_group=setitem(0, 9)), "does not add up"),
    "meta counts that disagree": (lambda p: rewrite(p, meta=lambda a: np.array(str(a).replace('"groups": ',
                                                                                              '"groups": 1'))),
                                  "meta's counts disagree"),
    "digest mismatch": (lambda p: rewrite(p, keep_digest=True, response_tokens=setitem(0, 7)), "digest mismatch"),
    "entry of another key": (lambda p: p.write_bytes((p.parent / "other.npz").read_bytes()), "digest mismatch"),
    "truncated file": (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "unreadable"),
    "size declared beyond the file": (declare_huge_response_tokens,
                                      "response_tokens: 1099511627776 values of 4 bytes declared"),
    "a FIFO, not a file": (lambda p: (p.unlink(), os.mkfifo(p)), "not a regular file"),
}


@pytest.mark.parametrize("poison", list(POISONS))
def test_a_poisoned_entry_is_a_miss_with_one_warning_then_rewritten(poison, ranks, caplog):
    assert ranks.rank0()[2] == "tokenized"
    cache = ranks.kwargs["cache_dir"]
    (entry,) = cache.glob("*.npz")
    write_entry(cache / "other.npz", TokenizedData(ranks.tokenized.groups[:3], ranks.tokenized.stats), {})
    spoil, reason = POISONS[poison]
    spoil(entry)
    with caplog.at_level("WARNING", logger="fastalign.train"):
        again = ranks.rank0()
    assert again[2] == "tokenized" and ranks.calls == 2 and again[0].groups == ranks.tokenized.groups
    (warning,) = [r.getMessage() for r in caplog.records]
    assert f"token cache entry {entry} is not used: " in warning and reason in warning, warning
    # rewritten in place: rank 1 reads it, and it hits from now on
    assert ranks.rank1()[2] == "read from rank 0" and ranks.rank0()[2] == "cache hit" and ranks.calls == 2
    assert sorted(p.name for p in cache.iterdir()) == sorted([entry.name, "other.npz"])  # no temporary left


def test_other_ranks_use_only_the_entry_rank_0_verified(ranks, caplog):
    ranks.rank0()
    (entry,) = ranks.kwargs["cache_dir"].glob("*.npz")
    # replaced between rank 0's write and rank 1's read by an entry that verifies on its own
    rewrite(entry, response_tokens=setitem(0, 7))
    replaced = entry.read_bytes()
    with caplog.at_level("WARNING", logger="fastalign.train"):
        other = ranks.rank1()
    assert other[2] == "tokenized" and ranks.calls == 2 and other[0].groups == ranks.tokenized.groups
    (warning,) = [r.getMessage() for r in caplog.records]
    assert f"{entry} is not used on rank 1: not the entry rank 0 verified" in warning
    assert entry.read_bytes() == replaced  # only rank 0 writes
    # damaged for rank 1 alone: the reason is named and rank 1 tokenizes
    caplog.clear()
    entry.write_bytes(b"not a zip")
    assert ranks.rank1()[2] == "tokenized" and ranks.calls == 3
    assert "is not used on rank 1: unreadable" in caplog.records[0].getMessage()


def test_ranks_do_not_read_an_entry_rank_0_could_not_rewrite(ranks, monkeypatch, caplog):
    ranks.rank0()
    (entry,) = ranks.kwargs["cache_dir"].glob("*.npz")
    rewrite(entry, query_tokens=setitem(0, VOCAB))

    def read_only(*_args):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(token_cache, "write_entry", read_only)
    assert ranks.rank0()[2] == "tokenized"
    caplog.clear()
    with caplog.at_level("WARNING", logger="fastalign.train"):
        other = ranks.rank1()
    assert other[2] == "tokenized" and other[0].groups == ranks.tokenized.groups and not caplog.records


def test_random_edits_of_the_arrays_are_refused_or_give_valid_groups(tokenized, tmp_path):
    """Seeded random edits (values from the int32/int64 extremes, cut or lengthened arrays), each
    with a recomputed digest: reading never raises anything but BadEntry, and what it accepts is
    groups tokenization could have made (ids in the vocabulary, scores on the scale, no empties)."""
    tokenized, _ = tokenized
    entry = tmp_path / "e.npz"
    write_entry(entry, tokenized, {"valid_records": 30, "skipped": {}})
    with np.load(entry, allow_pickle=False) as stored:
        clean = {name: stored[name] for name in stored.files}
    rng = np.random.default_rng(0)
    extremes = [-2 ** 63, -2 ** 31, -1, 0, 1, VOCAB - 1, VOCAB, 2 ** 31 - 1, 2 ** 63 - 1]
    refused = 0
    for _ in range(300):
        arrays = dict(clean)
        for _ in range(rng.integers(1, 4)):
            name = str(rng.choice([n for n in clean if n not in ("meta", "digest")]))
            array = arrays[name].copy()
            edit = rng.integers(3)
            if edit == 0 and len(array):
                value = extremes[rng.integers(len(extremes))] if rng.random() < 0.5 else int(rng.integers(-3, 400))
                if array.dtype.kind == "f":
                    value = np.nan if rng.random() < 0.3 else value
                else:
                    value = min(max(value, np.iinfo(array.dtype).min), np.iinfo(array.dtype).max)
                array[rng.integers(len(array))] = value
            elif edit == 1:
                array = array[:rng.integers(len(array) + 1)]
            else:
                array = np.concatenate([array, array[:rng.integers(len(array) + 1)]])
            arrays[name] = array
        arrays["digest"] = np.array(entry_digest(entry.stem, arrays))
        with open(entry, "wb") as f:
            np.savez(f, **arrays)
        try:
            back = read_entry(entry, vocab_size=VOCAB, max_score=7.0)[0]
        except BadEntry:
            refused += 1
            continue
        for group in back.groups:
            assert group.query_ids and group.response_ids and all(group.response_ids)
            assert all(0 <= t < VOCAB for ids in (group.query_ids, *group.response_ids) for t in ids)
            assert all(1 <= s <= 7 for s in group.scores)
    assert refused > 200
