"""Tokenized training data, cached between runs and shared by the ranks of one run.

Tokenizing a large data file takes seconds to minutes, and every rank of a run needs the same
groups. `cached_groups` tokenizes once: rank 0 loads and tokenizes (or finds an earlier run's
entry), writes the entry, and tells the other ranks, which read it instead of tokenizing again.

An entry is `<cache_dir>/<key>.npz`, the key a SHA-256 over
  - the data file's bytes (content, not its name or mtime: a copied file hits, an edited one misses),
  - every tokenizer file of the model directory (names and bytes),
  - every setting that changes the groups (`model_max_length`, EOS, turn-marker cut, rating scale,
    skipping invalid records) and the entry layout's version (FORMAT).
It holds flat int32/float64/int64 arrays plus one JSON string and is read with
`allow_pickle=False`: nothing read from the cache can execute code. Entries are written to a
temporary file and renamed, so a crash never leaves half an entry; a damaged entry is re-made.
The cache grows by one entry per distinct (data, tokenizer, settings); delete the directory to
reclaim the space. A rank that cannot see rank 0's entry (nodes without a shared cache
directory) tokenizes for itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import zipfile
from itertools import chain
from pathlib import Path
from typing import Callable

import numpy as np

from fastalign.errors import DataError

log = logging.getLogger("fastalign.train")

FORMAT = 1  # bump when the entry layout or the tokenization rules change
# Files of a model directory that define its tokenizer (whichever exist)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "config.json")
_GROUP_FIELDS = ("record_index", "query_ids", "response_ids", "scores", "response_positions")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fastalign" / "tokens"


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_key(data_path: str | os.PathLike, tokenizer_dir: str | os.PathLike, settings: dict) -> str:
    """SHA-256 (hex) of the data file's bytes, the tokenizer files and the settings."""
    tokenizer_dir = Path(tokenizer_dir)
    parts = {"format": FORMAT, "settings": settings, "data": _file_digest(Path(data_path)),
             "tokenizer": {name: _file_digest(tokenizer_dir / name)
                           for name in TOKENIZER_FILES if (tokenizer_dir / name).is_file()}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------- entry <-> groups


def _offsets(lengths: list[int]) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def _flat(lists: list[list], dtype) -> np.ndarray:
    return np.fromiter(chain.from_iterable(lists), dtype=dtype, count=sum(map(len, lists)))


def write_entry(path: Path, tokenized, meta: dict) -> None:
    """Flatten TokenizedData into arrays ([G] per group, [R] per response, [tokens]) + JSON meta."""
    groups = tokenized.groups
    responses = [r for g in groups for r in g.response_ids]
    arrays = {
        "record_index": np.array([g.record_index for g in groups], dtype=np.int64),            # [G]
        "query_offsets": _offsets([len(g.query_ids) for g in groups]),                          # [G+1]
        "query_tokens": _flat([g.query_ids for g in groups], np.int32),
        "responses_per_group": np.array([len(g.response_ids) for g in groups], dtype=np.int64),  # [G]
        "response_offsets": _offsets([len(r) for r in responses]),                              # [R+1]
        "response_tokens": _flat(responses, np.int32),
        "scores": _flat([g.scores for g in groups], np.float64),                                # [R]
        "response_positions": _flat([g.response_positions for g in groups], np.int64),           # [R]
        "meta": np.array(json.dumps({**meta, "stats": tokenized.stats})),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    tmp.replace(path)


def read_entry(path: Path):
    """(TokenizedData, meta) from an entry; raises OSError/ValueError/KeyError when damaged."""
    from fastalign.tokenization import TokenizedData, TokenizedGroup, _SharedInts

    with np.load(path, allow_pickle=False) as entry:
        arrays = {name: entry[name] for name in entry.files}
    meta = json.loads(str(arrays.pop("meta")))
    share = _SharedInts()  # one int object per id value, as tokenize_records builds them
    q_off, r_off = arrays["query_offsets"].tolist(), arrays["response_offsets"].tolist()
    q_tok, r_tok = arrays["query_tokens"].tolist(), arrays["response_tokens"].tolist()
    queries = share([q_tok[a:b] for a, b in zip(q_off[:-1], q_off[1:])])
    responses = share([r_tok[a:b] for a, b in zip(r_off[:-1], r_off[1:])])
    scores, positions = arrays["scores"].tolist(), arrays["response_positions"].tolist()
    groups, first = [], 0
    for g, (record_index, count) in enumerate(zip(arrays["record_index"].tolist(),
                                                  arrays["responses_per_group"].tolist())):
        end = first + count
        groups.append(TokenizedGroup(record_index=record_index, query_ids=queries[g],
                                     response_ids=responses[first:end], scores=scores[first:end],
                                     response_positions=positions[first:end]))
        first = end
    if first != len(responses):
        raise ValueError(f"{path}: response counts do not add up")
    stats = meta.pop("stats")
    return TokenizedData(groups=groups, stats=stats), meta


def layout_matches() -> bool:
    """The entry stores exactly TokenizedGroup's fields (a new field would be lost otherwise)."""
    from fastalign.tokenization import TokenizedGroup

    return tuple(f.name for f in dataclasses.fields(TokenizedGroup)) == _GROUP_FIELDS


# ----------------------------------------------------------------------------- the shared step


def cached_groups(make: Callable[[], tuple], *, data_path: str, tokenizer_dir: str, settings: dict,
                  cache_dir: Path | None, rank: int, broadcast: Callable):
    """`make()` -> (TokenizedData, meta dict), run once per run (rank 0) and cached.

    `broadcast(obj)` is rank 0's value on every rank (a collective: every rank calls this).
    Returns (TokenizedData, meta, how) with how in {"tokenized", "cache hit", "read from rank 0",
    "uncached"}. A DataError of rank 0 is raised on every rank with the same message.
    """
    if cache_dir is None or not layout_matches():
        if cache_dir is not None:
            log.warning("token cache off: TokenizedGroup's fields changed; update fastalign.token_cache")
        tokenized, meta = make()
        return tokenized, meta, "uncached"
    if rank == 0:
        status = {"error": None}
        try:
            status["key"] = key = cache_key(data_path, tokenizer_dir, settings)
            entry = cache_dir / f"{key}.npz"
            try:
                tokenized, meta = read_entry(entry)
                how = "cache hit"
            except FileNotFoundError:
                tokenized, meta = make()
                how = "tokenized"
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
                log.warning("token cache entry %s is damaged (%s); tokenizing again", entry, err)
                tokenized, meta = make()
                how = "tokenized"
            if how == "tokenized":
                try:
                    write_entry(entry, tokenized, meta)
                except OSError as err:  # a read-only or full disk costs the cache, not the run
                    log.warning("token cache: cannot write %s (%s); other ranks tokenize too", entry, err)
                    status["key"] = None
        except DataError as err:
            status = {"error": str(err)}
        status = broadcast(status)
        if status["error"] is not None:
            raise DataError(status["error"])
        return tokenized, meta, how
    status = broadcast(None)
    if status["error"] is not None:
        raise DataError(status["error"])
    if status.get("key"):
        try:
            tokenized, meta = read_entry(cache_dir / f"{status['key']}.npz")
            return tokenized, meta, "read from rank 0"
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass  # another node without the shared directory
    tokenized, meta = make()
    return tokenized, meta, "tokenized"
