"""Tokenized training data, cached between runs and shared by the ranks of one run.

Details: docs/design.md section 7.9.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import secrets
import stat
import zipfile
from collections.abc import Callable
from itertools import chain
from pathlib import Path

import numpy as np

from fastalign.errors import DataError

log = logging.getLogger("fastalign.train")

FORMAT = 2  # bump when the entry layout or the tokenization rules change
# Files of a model directory that define its tokenizer (whichever exist)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "config.json")
_GROUP_FIELDS = ("record_index", "query_ids", "response_ids", "scores", "response_positions")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fastalign" / "tokens"


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_key(data_path: str | os.PathLike, tokenizer_dir: str | os.PathLike, settings: dict) -> str:
    """SHA-256 (hex) of the data file's bytes, the tokenizer files and the settings."""
    tokenizer_dir = Path(tokenizer_dir)
    parts = {"format": FORMAT, "settings": settings, "data": file_digest(Path(data_path)),
             "tokenizer": {name: file_digest(tokenizer_dir / name)
                           for name in TOKENIZER_FILES if (tokenizer_dir / name).is_file()}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------- entry <-> groups

# The entry's arrays and their dtypes, each 1-D: [G] per group, [G+1]/[R+1] offsets, [R] per
# response, token ids concatenated. "meta" (JSON) and "digest" (hex) are 0-d unicode arrays.
_ARRAYS = {"record_index": np.dtype(np.int64), "query_offsets": np.dtype(np.int64),
           "query_tokens": np.dtype(np.int32), "responses_per_group": np.dtype(np.int64),
           "response_offsets": np.dtype(np.int64), "response_tokens": np.dtype(np.int32),
           "scores": np.dtype(np.float64), "response_positions": np.dtype(np.int64)}
_STRINGS = ("meta", "digest")


class BadEntry(Exception):
    """An entry that must not be used, with the reason in one line: a cache miss, never a user error."""


def _offsets(lengths: list[int]) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def _flat(lists: list[list], dtype) -> np.ndarray:
    return np.fromiter(chain.from_iterable(lists), dtype=dtype, count=sum(map(len, lists)))


def entry_digest(key: str, arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 (hex) over the entry's key and every array but "digest" (name, dtype, shape, bytes).

    The key is the entry's file name, so an entry renamed from another key does not verify either.
    """
    digest = hashlib.sha256(key.encode())
    for name in sorted(arrays):
        if name != "digest":
            array = arrays[name]  # C-contiguous: as built by write_entry or read by _read_npy
            digest.update(f"\n{name} {array.dtype.str} {array.shape}\n".encode())
            digest.update(array)
    return digest.hexdigest()


def write_entry(path: Path, tokenized, meta: dict) -> str:
    """Flatten TokenizedData into the entry's arrays + JSON meta + digest; returns the digest.

    Written to a new file of a random name (O_EXCL: never through a link someone left there) and
    renamed over `path`, so a reader sees the old entry or the new one, never a part.
    """
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
    digest = entry_digest(path.stem, arrays)
    arrays["digest"] = np.array(digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "wb") as f:
            np.savez(f, **arrays)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write leaves nothing behind
    return digest


def read_entry(path: Path, *, vocab_size: int, max_score: float | None = None):
    """(TokenizedData, meta, digest) from a verified entry.

    Raises FileNotFoundError when there is none and BadEntry (with the reason) when it cannot be
    used: not a plain file, not the layout write_entry writes, a digest that does not match, or
    contents tokenization cannot produce (token ids outside [0, vocab_size), scores not finite or
    above `max_score`, offsets or counts that disagree). Every check runs on the numpy arrays;
    nothing is expanded into Python lists before all of them pass, and no array is allocated
    larger than the file that declares it.
    """
    from fastalign.data.tokenization import TokenizedData, TokenizedGroup, _SharedInts

    try:
        arrays = _read_arrays(path)
        meta = _verify(path.stem, arrays, vocab_size, max_score)
    except FileNotFoundError:
        raise
    except (OSError, EOFError, ValueError, RecursionError, RuntimeError, NotImplementedError,
            zipfile.BadZipFile) as err:  # what zipfile, numpy's .npy header or json raise on bad input
        raise BadEntry(f"unreadable ({type(err).__name__}: {err})") from None
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
    stats = meta.pop("stats")
    return TokenizedData(groups=groups, stats=stats), meta, str(arrays["digest"])


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    """The entry's arrays, each checked against its expected dtype and rank and its declared size
    against the bytes that hold it before it is read (a header may claim any shape)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO planted there must not block the run
    with os.fdopen(fd, "rb") as file:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise BadEntry("not a regular file")
        with zipfile.ZipFile(file) as archive:
            members = {info.filename: info for info in archive.infolist()}
            expected = {f"{name}.npy" for name in (*_ARRAYS, *_STRINGS)}
            if set(members) != expected:
                raise BadEntry(f"holds {sorted(members)[:12]}, expected {sorted(expected)}")
            arrays = {}
            for name in (*_ARRAYS, *_STRINGS):
                info = members[f"{name}.npy"]
                if info.compress_type != zipfile.ZIP_STORED or info.file_size > status.st_size:
                    raise BadEntry(f"{name}: compressed or larger than the file ({info.file_size} bytes)")
                with archive.open(info) as member:
                    arrays[name] = _read_npy(member, name, info.file_size)
    return arrays


def _read_npy(member, name: str, member_size: int) -> np.ndarray:
    version = np.lib.format.read_magic(member)
    if version not in ((1, 0), (2, 0)):
        raise BadEntry(f"{name}: .npy version {version}")
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read_header(member)
    if name in _ARRAYS:
        if dtype != _ARRAYS[name] or len(shape) != 1:
            raise BadEntry(f"{name}: dtype {dtype} shape {shape}, expected 1-D {_ARRAYS[name]}")
    elif dtype.kind != "U" or shape != ():
        raise BadEntry(f"{name}: dtype {dtype} shape {shape}, expected one string")
    count = shape[0] if shape else 1
    size = count * dtype.itemsize
    if member.tell() + size != member_size:
        raise BadEntry(f"{name}: {count} values of {dtype.itemsize} bytes declared, "
                       f"{member_size - member.tell()} bytes stored")
    data = member.read(size)
    if len(data) != size:
        raise BadEntry(f"{name}: truncated")
    return np.frombuffer(data, dtype=dtype, count=count).reshape(shape)


def _verify(key: str, arrays: dict[str, np.ndarray], vocab_size: int, max_score: float | None) -> dict:
    """Check the arrays against the digest and what tokenize_records produces; returns the meta
    dict. Vectorised: a pass or two of numpy over each array."""
    from fastalign.data.tokenization import STAT_KEYS

    def require(condition, reason: str) -> None:
        if not condition:
            raise BadEntry(reason)

    require(entry_digest(key, arrays) == str(arrays["digest"]),
            "digest mismatch (edited, swapped or renamed from another entry)")
    num_groups, num_responses = len(arrays["record_index"]), len(arrays["scores"])
    require(num_responses < 2 ** 31, f"{num_responses} responses")  # so that no count below can wrap
    for name, size in (("query_offsets", num_groups + 1), ("responses_per_group", num_groups),
                       ("response_offsets", num_responses + 1), ("response_positions", num_responses)):
        require(len(arrays[name]) == size, f"{name} has {len(arrays[name])} values, expected {size}")
    for kind in ("query", "response"):
        offsets, tokens = arrays[f"{kind}_offsets"], arrays[f"{kind}_tokens"]
        require(offsets[0] == 0 and offsets[-1] == len(tokens),
                f"{kind}_offsets span [{offsets[0]}, {offsets[-1]}), {kind}_tokens holds {len(tokens)}")
        require(_increasing(offsets), f"{kind}_offsets are not increasing")
        if len(tokens):
            low, high = int(tokens.min()), int(tokens.max())
            require(low >= 0 and high < vocab_size, f"{kind}_tokens hold token id {low if low < 0 else high} "
                                                    f"outside the model's vocabulary [0, {vocab_size})")
    counts, scores = arrays["responses_per_group"], arrays["scores"]
    # G <= R < 2**31 and each count in [1, R]: the sum cannot wrap around int64
    require(num_groups <= num_responses and bool(((counts >= 1) & (counts <= num_responses)).all())
            and int(counts.sum()) == num_responses,
            f"responses_per_group does not add up to the {num_responses} responses")
    require(bool(np.isfinite(scores).all()), "scores hold a NaN or infinite value")
    if len(scores):
        top = np.inf if max_score is None else max_score
        require(scores.min() >= 1 and scores.max() <= top,
                f"scores span [{scores.min()}, {scores.max()}], outside the rating scale [1, {top}]")
    record_index, positions = arrays["record_index"], arrays["response_positions"]
    require(num_groups == 0 or (record_index[0] >= 0 and _increasing(record_index)),
            "record_index is not increasing from 0")
    within = np.ones(max(num_responses - 1, 0), dtype=bool)  # neighbours in one group
    within[np.cumsum(counts)[:-1] - 1] = False
    require(num_responses == 0 or (positions.min() >= 0 and bool((positions[1:] > positions[:-1])[within].all())),
            "response_positions are not increasing within each group")
    meta = json.loads(str(arrays["meta"]))
    stats = meta.get("stats") if isinstance(meta, dict) else None
    require(isinstance(stats, dict) and set(stats) == set(STAT_KEYS)
            and all(type(v) is int for v in stats.values())
            and isinstance(meta.get("valid_records"), int) and isinstance(meta.get("skipped"), dict),
            "meta is not the JSON tokenization writes")
    require((stats["groups"], stats["responses"], stats["query_tokens"], stats["response_tokens"])
            == (num_groups, num_responses, len(arrays["query_tokens"]), len(arrays["response_tokens"])),
            "meta's counts disagree with the arrays")
    return meta


def _increasing(values: np.ndarray) -> bool:
    """Strictly increasing (compared pairwise: np.diff could wrap around on hostile int64 values)."""
    return bool((values[1:] > values[:-1]).all())


def layout_matches() -> bool:
    """The entry stores exactly TokenizedGroup's fields (a new field would be lost otherwise)."""
    from fastalign.data.tokenization import TokenizedGroup

    return tuple(f.name for f in dataclasses.fields(TokenizedGroup)) == _GROUP_FIELDS


# ----------------------------------------------------------------------------- the shared step


def cached_groups(make: Callable[[], tuple], *, data_path: str, tokenizer_dir: str, settings: dict,
                  cache_dir: Path | None, rank: int, broadcast: Callable, vocab_size: int):
    """`make()` -> (TokenizedData, meta dict), run once per run (rank 0) and cached.

    `broadcast(obj)` is rank 0's value on every rank (a collective: every rank calls this).
    `vocab_size` is the trained model's: an entry holding a token id outside it is not used;
    scores above `settings["rating_scale"]` (when given) neither.
    Returns (TokenizedData, meta, how) with how in {"tokenized", "cache hit", "read from rank 0",
    "uncached"}. A DataError of rank 0 is raised on every rank with the same message.

    An entry that does not verify (`read_entry`) is a miss: one warning naming the file and the
    reason, then rank 0 tokenizes and rewrites it. The other ranks use an entry only when its
    digest is the one rank 0 verified or wrote, so every rank trains on rank 0's groups; a rank
    that finds anything else (a missing, damaged or replaced entry) tokenizes for itself and
    writes nothing.
    """
    if cache_dir is None or not layout_matches():
        if cache_dir is not None:
            log.warning("token cache off: TokenizedGroup's fields changed; update fastalign.data.token_cache")
        tokenized, meta = make()
        return tokenized, meta, "uncached"
    limits = {"vocab_size": vocab_size, "max_score": settings.get("rating_scale")}
    if rank == 0:
        status = {"error": None, "key": None, "digest": None}
        try:
            key = cache_key(data_path, tokenizer_dir, settings)
            entry = cache_dir / f"{key}.npz"
            try:
                tokenized, meta, digest = read_entry(entry, **limits)
                how = "cache hit"
            except (FileNotFoundError, BadEntry) as err:
                if isinstance(err, BadEntry):
                    log.warning("token cache entry %s is not used: %s; tokenizing again and rewriting it",
                                entry, err)
                tokenized, meta = make()
                how = "tokenized"
                try:
                    digest = write_entry(entry, tokenized, meta)
                except OSError as err:  # a read-only or full disk costs the cache, not the run
                    log.warning("token cache: cannot write %s (%s); other ranks tokenize too", entry, err)
                    digest = None
            status.update(key=key, digest=digest)
        except DataError as err:
            status = {"error": str(err)}
        status = broadcast(status)
        if status["error"] is not None:
            raise DataError(status["error"])
        return tokenized, meta, how
    status = broadcast(None)
    if status["error"] is not None:
        raise DataError(status["error"])
    if status["digest"] is not None:
        entry = cache_dir / f"{status['key']}.npz"
        try:
            tokenized, meta, digest = read_entry(entry, **limits)
            if digest == status["digest"]:
                return tokenized, meta, "read from rank 0"
            reason = "not the entry rank 0 verified or wrote (replaced since)"
        except FileNotFoundError:
            reason = None  # a node without the shared directory: tokenizing here is the plan
        except BadEntry as err:
            reason = str(err)
        if reason is not None:
            log.warning("token cache entry %s is not used on rank %d: %s; this rank tokenizes for itself",
                        entry, rank, reason)
    tokenized, meta = make()
    return tokenized, meta, "tokenized"
