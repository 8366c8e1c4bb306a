"""Records -> validated groups -> tokens -> packed, rank-sharded micro-batches.

Data format
-----------
A data file holds sandbox records, as a JSON array (`.json`) or one JSON object per line
(`.jsonl`); either may be gzip-compressed (`.json.gz`, `.jsonl.gz`; gzip is also recognised by its
magic bytes). Another suffix is read as an array when its first character is `[`, else as JSONL.
Text is UTF-8 (a leading byte-order mark is ignored). The files are read by `fastalign.jsonio`, the
reader `fastalign.convert` uses too. Each record is

    {"query": str, "responses": [str, ...], "scores": [number, ...],
     "category": str (optional, carried through), "models": [...] (optional, ignored)}

Validation (`load_records`)
---------------------------
A record is invalid when it is not an object; `query` is missing or not a string; `responses` is
missing, not a list, empty, or holds a non-string; `scores` is missing, not a list, or holds a
non-number (booleans are not numbers); the two lists differ in length; a score is not finite (JSON
`NaN`/`Infinity` parse in Python and are caught here); a score lies outside [1, rating_scale];
`category` is present but neither a string nor null. Every error message names the file, the
record index (0-based position in the file; JSONL also gives the line), the field and the reason.
Unreadable files (missing, corrupt gzip, not UTF-8, malformed JSON with line and column, a `.json`
whose top level is not an array, no records at all) raise too.

By default the first problem raises `DataError` and nothing is returned (all or nothing). With
`skip_invalid=True` invalid records are dropped and counted per reason in `LoadedRecords.skipped`
(the keys are the `REASON_*` constants below); malformed or non-UTF-8 *lines* of a JSONL file are
skipped the same way, but a malformed JSON array cannot be parsed past its error and still raises.
Kept records keep their file index, so candidate sampling (seeded by record index) does not shift.

Tokenization (`tokenize_records`)
---------------------------------
The query and every response are tokenized separately (`tokenizer(text, add_special_tokens=False)`,
batched over many texts) and their ids concatenated, so the query/response boundary is exact.
The query gets the tokenizer's BOS in front (when it has one); each response gets EOS appended
(when the tokenizer has one and `append_eos`). With `stop_response`, a response is cut before the
first "\\n\\nHuman:" or "\\n\\nAssistant:" turn marker (before tokenizing). Each sequence
(query + response) is then limited to `model_max_length` tokens by cutting the response from its end
(the EOS goes first). Drop rules, each counted in `TokenizedData.stats`:
  - `dropped_no_room`: the query (with BOS) leaves no room for one response token -> record dropped;
  - `dropped_empty_query`: the query has no tokens at all (no text, no BOS), so nothing could
    predict the first response token -> record dropped;
  - `dropped_empty_responses`: a response with zero tokens (empty text and no EOS) is removed from
    its group (the kept ones carry their index in the record in `TokenizedGroup.response_positions`,
    so reports still name the record's own responses); `dropped_no_responses`: a group left without
    responses -> record dropped.
Every kept group therefore has >= 1 query token and >= 1 response, each with >= 1 token.

Candidates, batches and ranks (`GroupBatcher`)
----------------------------------------------
- Candidate sampling: a group with more than `num_comp` responses uses `num_comp` of them per epoch,
  drawn uniformly without replacement from a hash of (seed, epoch, record index, response index):
  stable across runs, processes, world sizes and resumption, independent of the other records.
  The chosen responses keep their original order (so "ties: lowest index" keeps its meaning).
- `seed_compat=True` (for `--margin_mode seed`, which reproduces the original train_alignment.py):
  the original collator took `random.sample(list(zip(responses, scores)), min(k, num_comp))`, which
  also puts the candidates in a random order (even when k <= num_comp), then `int()`-truncated the
  scores (6.5 -> 6); its margin pairs each response with the rating at the same *position* of the
  sorted ratings, so that order changes the loss. With `seed_compat` each group's candidates are the
  same ones as without it, but in the order of their hash of (seed, epoch, record index, response
  index) -- a uniformly random order, so subset + order is distributed as `random.sample`'s draw --
  and their scores are truncated with `int()`. Like the draw itself, the order depends on nothing
  else (not the rank, the world size or the resumption point). Without it (the default, paper mode)
  candidates keep the file order and scores are used as they are.
- A micro-batch holds whole groups: `batch_size` groups, or, when `max_tokens_per_batch` is set
  (it then takes precedence and `batch_size` is ignored), as many consecutive groups as fit the token
  budget, filled greedily. A single group larger than the budget forms a micro-batch on its own (it
  cannot be split without breaking the group objective); `GroupBatcher.oversized_groups(epoch)`
  counts those.
- Per epoch the groups are shuffled by (seed, epoch) (`shuffle=False` keeps file order), cut into
  micro-batches, and the micro-batches dealt to optimizer steps of `world_size *
  gradient_accumulation_steps` slots: step s takes the next W*A micro-batches and rank r gets those
  at positions r, r+W, ... of the step. Every rank runs the same number of micro-batches per step;
  where the epoch's last step runs short, a rank gets *filler* micro-batches (a real group,
  `num_groups=0`) so the ranks' forwards and collectives stay matched. Every group appears exactly
  once per epoch over all ranks (fillers aside). `OptimizerStep.global_groups` counts the step's
  real groups on all ranks; the plan is a pure function of (data, seed, epoch, options), so every
  rank computes the same plan without communicating, and `iter_steps(epoch, start_step)` resumes
  exactly.

Packed batch (`pack_groups`)
----------------------------
No padding: every sequence is query + one response, concatenated into one stream (see DESIGN.md
section 2 "Packed batch"). `targets[t]` is the next token id when that token is a response token of
the same sequence, else -100: the last query token predicts the first response token and the last
token of each sequence predicts nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from fastalign.errors import ConfigError, DataError
from fastalign.jsonio import REASON_MALFORMED_JSON, REASON_NOT_UTF8  # noqa: F401  (skip reasons, re-exported)
from fastalign.jsonio import SKIP_INVALID_HINT, ParseFailure, iter_json_values, json_type_name

__all__ = [
    "DataError",
    "Record",
    "LoadedRecords",
    "load_records",
    "sample_data_path",
    "TokenizedGroup",
    "TokenizedData",
    "tokenize_records",
    "cut_at_turn_marker",
    "PackedBatch",
    "pack_groups",
    "candidate_mask",
    "draw_ranks",
    "select_candidates",
    "GroupBatcher",
    "OptimizerStep",
]

IGNORE_INDEX = -100
TURN_MARKERS = ("\n\nHuman:", "\n\nAssistant:")

# Reasons a record is skipped (keys of LoadedRecords.skipped): short and stable, users grep them.
REASON_NOT_OBJECT = "not an object"
REASON_MISSING_QUERY = "missing query"
REASON_QUERY_TYPE = "query not a string"
REASON_MISSING_RESPONSES = "missing responses"
REASON_RESPONSES_TYPE = "responses not a list of strings"
REASON_EMPTY_RESPONSES = "empty responses"
REASON_MISSING_SCORES = "missing scores"
REASON_SCORES_TYPE = "scores not a list of numbers"
REASON_LENGTH_MISMATCH = "responses/scores length mismatch"
REASON_SCORE_NOT_FINITE = "score not finite"
REASON_SCORE_RANGE = "score out of range"
REASON_CATEGORY_TYPE = "category not a string"
# REASON_MALFORMED_JSON and REASON_NOT_UTF8 (a JSONL line that does not parse) come from fastalign.jsonio.


# ---------------------------------------------------------------------------------------------
# Loading and validation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    index: int  # 0-based position of the record in its file (invalid records count too)
    query: str
    responses: list[str]
    scores: list[float]
    category: str | None = None


@dataclass
class LoadedRecords:
    path: str
    records: list[Record]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> number of records dropped
    first_skipped: dict[str, str] = field(default_factory=dict)  # reason -> message of its first case

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def skipped_summary(self) -> str:
        """`skipped 3 of 120 records: score out of range: 2 (first: ...), ...`, or '' if none."""
        if not self.skipped:
            return ""
        total = len(self.records) + self.num_skipped
        parts = [f"{reason}: {count} (first: {self.first_skipped[reason]})"
                 for reason, count in sorted(self.skipped.items(), key=lambda kv: -kv[1])]
        return f"skipped {self.num_skipped} of {total} records in {self.path}: " + "; ".join(parts)


class _InvalidRecord(Exception):
    """One record failed validation: reason (a REASON_* key), field name and human detail."""

    def __init__(self, reason: str, field_name: str | None, detail: str):
        super().__init__(detail)
        self.reason, self.field_name, self.detail = reason, field_name, detail

    def message(self, path: str, where: str) -> str:
        field_part = f", field '{self.field_name}'" if self.field_name else ""
        return f"{path}: {where}{field_part}: {self.detail}"


def _validate(obj: Any, index: int, rating_scale: float) -> Record:
    """Return the Record for one parsed JSON value or raise _InvalidRecord."""
    if not isinstance(obj, dict):
        raise _InvalidRecord(REASON_NOT_OBJECT, None,
                             f"record is a JSON {json_type_name(obj)}, expected an object with "
                             "'query', 'responses' and 'scores'")
    if "query" not in obj:
        raise _InvalidRecord(REASON_MISSING_QUERY, "query", "missing")
    query = obj["query"]
    if not isinstance(query, str):
        raise _InvalidRecord(REASON_QUERY_TYPE, "query", f"expected a string, got a JSON {json_type_name(query)}")

    if "responses" not in obj:
        raise _InvalidRecord(REASON_MISSING_RESPONSES, "responses", "missing")
    responses = obj["responses"]
    if not isinstance(responses, list):
        raise _InvalidRecord(REASON_RESPONSES_TYPE, "responses",
                             f"expected a list of strings, got a JSON {json_type_name(responses)}")
    for j, response in enumerate(responses):
        if not isinstance(response, str):
            raise _InvalidRecord(REASON_RESPONSES_TYPE, f"responses[{j}]",
                                 f"expected a string, got a JSON {json_type_name(response)}")
    if not responses:
        raise _InvalidRecord(REASON_EMPTY_RESPONSES, "responses", "empty list: a record needs at least one response")

    if "scores" not in obj:
        raise _InvalidRecord(REASON_MISSING_SCORES, "scores", "missing")
    raw_scores = obj["scores"]
    if not isinstance(raw_scores, list):
        raise _InvalidRecord(REASON_SCORES_TYPE, "scores",
                             f"expected a list of numbers, got a JSON {json_type_name(raw_scores)}")
    for j, score in enumerate(raw_scores):
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise _InvalidRecord(REASON_SCORES_TYPE, f"scores[{j}]",
                                 f"expected a number, got a JSON {json_type_name(score)} ({score!r})")
    if len(raw_scores) != len(responses):
        raise _InvalidRecord(REASON_LENGTH_MISMATCH, "scores",
                             f"{len(responses)} responses but {len(raw_scores)} scores (one score per response)")
    scores = []
    for j, score in enumerate(raw_scores):
        if isinstance(score, float) and not math.isfinite(score):
            raise _InvalidRecord(REASON_SCORE_NOT_FINITE, f"scores[{j}]", f"score {score} is not a finite number")
        try:
            value = float(score)
        except OverflowError:  # an integer too large for a float is certainly out of range
            value = math.inf
        if not 1 <= value <= rating_scale:
            raise _InvalidRecord(REASON_SCORE_RANGE, f"scores[{j}]",
                                 f"score {score!r} is outside [1, {rating_scale:g}] (--rating_scale)")
        scores.append(value)

    category = obj.get("category")
    if category is not None and not isinstance(category, str):
        raise _InvalidRecord(REASON_CATEGORY_TYPE, "category",
                             f"expected a string or null, got a JSON {json_type_name(category)}")
    return Record(index=index, query=query, responses=responses, scores=scores, category=category)


def load_records(path: str | Path, *, rating_scale: float = 7.0, skip_invalid: bool = False) -> LoadedRecords:
    """Read and validate a sandbox data file (rules in the module docstring).

    Raises DataError naming the file, record index, field and reason; with `skip_invalid` invalid
    records (and malformed JSONL lines) are dropped and counted per reason instead.
    """
    if not rating_scale >= 1:
        raise ConfigError(f"--rating_scale must be at least 1 (scores are rated 1..rating_scale), got {rating_scale}")
    path = Path(path)
    records: list[Record] = []
    skipped: dict[str, int] = {}
    first_skipped: dict[str, str] = {}

    def reject(reason: str, message: str) -> None:
        if not skip_invalid:
            raise DataError(message + SKIP_INVALID_HINT)
        skipped[reason] = skipped.get(reason, 0) + 1
        first_skipped.setdefault(reason, message)

    for item in iter_json_values(path, skipping_invalid=skip_invalid):
        if isinstance(item.value, ParseFailure):
            reject(item.value.reason, item.value.message)
            continue
        try:
            records.append(_validate(item.value, item.index, rating_scale))
        except _InvalidRecord as bad:
            reject(bad.reason, bad.message(str(path), item.where))

    if not records:
        if skipped:
            summary = "; ".join(f"{reason}: {count}" for reason, count in skipped.items())
            raise DataError(f"{path}: no valid records (all skipped: {summary}); "
                            f"first problem: {next(iter(first_skipped.values()))}")
        raise DataError(f"{path}: contains no records")
    return LoadedRecords(path=str(path), records=records, skipped=skipped, first_skipped=first_skipped)


def sample_data_path() -> Path:
    """The small sandbox file bundled with fastalign (for demos and smoke tests)."""
    return Path(__file__).resolve().parent / "data" / "sample_sandbox.jsonl"


# ---------------------------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------------------------


@dataclass
class TokenizedGroup:
    record_index: int
    query_ids: list[int]  # BOS (if any) + query tokens; never empty
    response_ids: list[list[int]]  # each response (+EOS), len(query_ids) + len(r) <= model_max_length; never empty
    scores: list[float]
    # [k] index of each kept response in its record's "responses". 0..k-1 (the default, filled in by
    # __post_init__) unless tokenization dropped an empty response (possible only without EOS):
    # report these, not positions in response_ids, wherever a response is named to the user.
    response_positions: list[int] | None = None

    def __post_init__(self) -> None:
        if self.response_positions is None:
            self.response_positions = list(range(len(self.response_ids)))


STAT_KEYS = (
    "records",                  # records given to tokenize_records
    "groups",                   # groups kept
    "responses",                # responses kept (all of them, before candidate sampling)
    "query_tokens",             # sum of len(query_ids) over kept groups
    "response_tokens",          # sum of len(r) over kept responses
    "tokens",                   # packed tokens of an epoch without sampling: sum over responses of len(q)+len(r)
    "max_sequence_tokens",      # longest query + response
    "truncated_responses",      # kept responses cut to fit model_max_length
    "stopped_responses",        # kept responses cut at a turn marker (stop_response)
    "dropped_no_room",          # records dropped: the query leaves no room for a response token
    "dropped_empty_query",      # records dropped: no query token at all (empty query, no BOS)
    "dropped_empty_responses",  # responses removed: zero tokens (empty text, no EOS)
    "dropped_no_responses",     # records dropped: every response had zero tokens
)


@dataclass
class TokenizedData:
    groups: list[TokenizedGroup]
    stats: dict[str, int]  # keys: STAT_KEYS, always all present


def cut_at_turn_marker(text: str) -> str:
    """`text` up to the first "\\n\\nHuman:" / "\\n\\nAssistant:" marker (unchanged when none)."""
    cut = len(text)
    for marker in TURN_MARKERS:
        position = text.find(marker, 0, cut)
        if position >= 0:
            cut = position
    return text[:cut]


def tokenize_records(
    records: LoadedRecords | Sequence[Record],
    tokenizer: Any,
    *,
    model_max_length: int = 512,
    append_eos: bool = True,
    stop_response: bool = False,
    progress: bool = False,
    chunk_size: int = 1024,
) -> TokenizedData:
    """Tokenize records into groups (rules in the module docstring).

    Texts are tokenized in batches of `chunk_size` records, so a fast tokenizer runs in Rust (on
    all cores) over many strings at once; `progress` shows a tqdm bar.
    """
    if isinstance(records, LoadedRecords):
        records = records.records
    if model_max_length < 2:
        raise ConfigError(f"--model_max_length must be at least 2 (one query and one response token), got {model_max_length}")
    bos_id = getattr(tokenizer, "bos_token_id", None)
    eos_id = getattr(tokenizer, "eos_token_id", None) if append_eos else None
    prefix = [bos_id] if bos_id is not None else []
    suffix = [eos_id] if eos_id is not None else []
    stats = dict.fromkeys(STAT_KEYS, 0)
    stats["records"] = len(records)
    groups: list[TokenizedGroup] = []
    encode = None  # chosen on the first chunk's texts
    share_ints = _SharedInts()

    with tqdm(total=len(records), desc="tokenizing", unit="rec", disable=not progress) as bar:
        for start in range(0, len(records), chunk_size):
            chunk = records[start:start + chunk_size]
            texts: list[str] = []
            stopped: list[bool] = []  # per response of the chunk
            for record in chunk:
                texts.append(record.query)
                for response in record.responses:
                    if stop_response:
                        cut = cut_at_turn_marker(response)
                        stopped.append(len(cut) != len(response))
                        response = cut
                    texts.append(response)
            if encode is None:
                encode = _batch_encoder(tokenizer, texts[:64])
            ids = share_ints(encode(texts))
            position = 0
            response_position = 0
            for record in chunk:
                query_ids = prefix + ids[position]
                count = len(record.responses)
                response_texts_ids = ids[position + 1:position + 1 + count]
                record_stopped = stopped[response_position:response_position + count] if stop_response else None
                position += 1 + count
                response_position += count
                group = _build_group(record, query_ids, response_texts_ids, suffix, model_max_length,
                                     record_stopped, stats)
                if group is not None:
                    groups.append(group)
            bar.update(len(chunk))
    stats["groups"] = len(groups)
    return TokenizedData(groups=groups, stats=stats)


class _SharedInts:
    """Re-points token lists at one shared int object per id value.

    A tokenizer returns a fresh Python int per token (28 bytes, plus the 8-byte list slot); with
    shared ints a stored token costs 8 bytes: ~4.5x less memory for the tokenized data set, which
    lives for the whole run in every rank's process. The lists stay plain `list[int]`.
    """

    def __init__(self) -> None:
        self._ints: list[int] = []  # _ints[i] is i

    def __call__(self, id_lists: list[list[int]]) -> list[list[int]]:
        non_empty = [ids for ids in id_lists if ids]
        if not non_empty or min(map(min, non_empty)) < 0:  # (negative ids: keep as they are)
            return id_lists
        top = max(map(max, non_empty))
        if top >= len(self._ints):
            self._ints.extend(range(len(self._ints), top + 1))
        shared = self._ints.__getitem__
        return [list(map(shared, ids)) for ids in id_lists]


def _batch_encoder(tokenizer: Any, sample_texts: list[str]) -> Callable[[list[str]], list[list[int]]]:
    """The fastest function equal to `tokenizer(texts, add_special_tokens=False)["input_ids"]`.

    For a fast (Rust) tokenizer that is the backend's `encode_batch_fast` (no offsets computed:
    ~30% quicker) -- but only when it gives the same ids as the tokenizer's own call on
    `sample_texts` (a subclass may preprocess text in Python). The reference call also resets the
    backend to no truncation/padding, the state the direct call then runs in.
    """
    def through_tokenizer(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                         return_token_type_ids=False, verbose=False)["input_ids"]

    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    encode_batch = getattr(backend, "encode_batch_fast", None) or getattr(backend, "encode_batch", None)
    if encode_batch is None:
        return through_tokenizer

    def through_backend(texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in encode_batch(texts, add_special_tokens=False)]

    probe = sample_texts + ["Hello world", " leading space", "trailing  \n\n", "### Instruction:\nQ?\n\n### Response:"]
    reference = through_tokenizer(probe)  # first: it also sets the backend state the direct call needs
    return through_backend if through_backend(probe) == reference else through_tokenizer


def _build_group(record: Record, query_ids: list[int], responses_ids: list[list[int]], suffix: list[int],
                 model_max_length: int, stopped: list[bool] | None, stats: dict[str, int]) -> TokenizedGroup | None:
    """Apply EOS, truncation and the drop rules to one record; update `stats`; None when dropped."""
    if not query_ids:
        stats["dropped_empty_query"] += 1
        return None
    room = model_max_length - len(query_ids)
    if room < 1:
        stats["dropped_no_room"] += 1
        return None
    kept_ids: list[list[int]] = []
    kept_scores: list[float] = []
    kept_positions: list[int] = []
    truncated = stopped_count = empty = 0
    for j, response_ids in enumerate(responses_ids):
        full = response_ids + suffix
        if not full:
            empty += 1
            continue
        if len(full) > room:
            full = full[:room]
            truncated += 1
        if stopped is not None and stopped[j]:
            stopped_count += 1
        kept_ids.append(full)
        kept_scores.append(record.scores[j])
        kept_positions.append(j)
    stats["dropped_empty_responses"] += empty
    if not kept_ids:
        stats["dropped_no_responses"] += 1
        return None
    stats["truncated_responses"] += truncated
    stats["stopped_responses"] += stopped_count
    stats["responses"] += len(kept_ids)
    stats["query_tokens"] += len(query_ids)
    response_tokens = sum(len(r) for r in kept_ids)
    stats["response_tokens"] += response_tokens
    stats["tokens"] += len(query_ids) * len(kept_ids) + response_tokens
    stats["max_sequence_tokens"] = max(stats["max_sequence_tokens"], len(query_ids) + max(len(r) for r in kept_ids))
    return TokenizedGroup(record_index=record.index, query_ids=query_ids, response_ids=kept_ids, scores=kept_scores,
                          response_positions=kept_positions)


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------


@dataclass
class PackedBatch:
    input_ids: torch.Tensor       # int64 [T]: all sequences (query + one response) concatenated
    position_ids: torch.Tensor    # int64 [T]: restart at 0 in every sequence
    cu_seqlens: torch.Tensor      # int32 [S+1]: sequence boundaries
    max_seqlen: int
    targets: torch.Tensor         # int64 [T]: next response token of the same sequence, else -100
    response_index: torch.Tensor  # int64 [T]: sequence of each position
    scores: torch.Tensor          # float32 [S]: rating of each response
    group_index: torch.Tensor     # int64 [S]: group of each response, 0..G-1 ascending
    record_indices: list[int]     # [G]: file index of each group's record
    num_groups: int               # groups counted in the loss; 0 for a filler batch
    target_token_count: int = -1  # cached count of targets != -100 (-1: count on demand)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def num_sequences(self) -> int:
        return self.scores.numel()

    @property
    def num_target_tokens(self) -> int:
        if self.target_token_count < 0:
            self.target_token_count = int((self.targets != IGNORE_INDEX).sum())
        return self.target_token_count

    def to(self, device: Any, non_blocking: bool = False) -> "PackedBatch":
        def move(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.to(device, non_blocking=non_blocking)

        return PackedBatch(
            input_ids=move(self.input_ids), position_ids=move(self.position_ids),
            cu_seqlens=move(self.cu_seqlens), max_seqlen=self.max_seqlen, targets=move(self.targets),
            response_index=move(self.response_index), scores=move(self.scores),
            group_index=move(self.group_index), record_indices=list(self.record_indices),
            num_groups=self.num_groups, target_token_count=self.target_token_count,
        )


def pack_groups(groups: Sequence[TokenizedGroup], *, num_groups: int | None = None) -> PackedBatch:
    """Pack every response of each group, in order, into one padding-free micro-batch.

    `num_groups` defaults to len(groups); GroupBatcher passes 0 for filler batches.
    """
    if not groups:
        raise ValueError("pack_groups needs at least one group")
    flat_ids: list[int] = []
    query_lengths: list[int] = []
    sequence_lengths: list[int] = []
    scores: list[float] = []
    responses_per_group: list[int] = []
    for group in groups:
        query = group.query_ids
        if len(query) == 0 or len(group.response_ids) == 0 or len(group.response_ids) != len(group.scores):
            raise ValueError(f"group of record {group.record_index} needs a non-empty query and one score "
                             "per non-empty response (tokenize_records guarantees this)")
        for response in group.response_ids:
            if len(response) == 0:
                raise ValueError(f"group of record {group.record_index} has an empty response")
            flat_ids.extend(query)
            flat_ids.extend(response)
            query_lengths.append(len(query))
            sequence_lengths.append(len(query) + len(response))
        scores.extend(group.scores)
        responses_per_group.append(len(group.response_ids))

    input_ids = np.asarray(flat_ids, dtype=np.int64)                       # [T]
    lengths = np.asarray(sequence_lengths, dtype=np.int64)                 # [S]
    cu_seqlens = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=cu_seqlens[1:])
    response_index = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)    # [T]
    position_ids = np.arange(len(input_ids), dtype=np.int64) - cu_seqlens[:-1][response_index]
    # Position p predicts token p+1; it is a target when p+1 is a response token of the same
    # sequence: local positions from the last query token to the second-to-last token.
    first_target = (np.asarray(query_lengths, dtype=np.int64) - 1)[response_index]
    last_target = (lengths - 2)[response_index]
    predicting = np.flatnonzero((position_ids >= first_target) & (position_ids <= last_target))
    targets = np.full(len(input_ids), IGNORE_INDEX, dtype=np.int64)
    targets[predicting] = input_ids[predicting + 1]
    group_index = np.repeat(np.arange(len(groups), dtype=np.int64), responses_per_group)

    return PackedBatch(
        input_ids=torch.from_numpy(input_ids),
        position_ids=torch.from_numpy(position_ids),
        cu_seqlens=torch.from_numpy(cu_seqlens.astype(np.int32)),
        max_seqlen=int(lengths.max()),
        targets=torch.from_numpy(targets),
        response_index=torch.from_numpy(response_index),
        scores=torch.tensor(scores, dtype=torch.float32),
        group_index=torch.from_numpy(group_index),
        record_indices=[group.record_index for group in groups],
        num_groups=len(groups) if num_groups is None else num_groups,
        target_token_count=len(predicting),
    )


# ---------------------------------------------------------------------------------------------
# Candidate sampling
# ---------------------------------------------------------------------------------------------

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser over a uint64 array (wrapping arithmetic): a well-mixed 64-bit hash."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _as_uint64(value: int) -> np.ndarray:
    return np.array([value & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64)


def draw_ranks(num_responses: np.ndarray, record_indices: np.ndarray, *, seed: int, epoch: int) -> np.ndarray:
    """Each response's place in a random order of its group: int64 [sum(k)], in group order.

    num_responses [G] (k of each group), record_indices [G]. Group g's entries are a permutation of
    0..k_g-1: the ranks of the hashes of (seed, epoch, record index, response index), so the order
    is uniformly random and depends on nothing else (not the rank, the world size or the other
    records). The first num_comp of that order are the candidates (candidate_mask); with
    GroupBatcher's seed_compat they are also packed in that order, as `random.sample` returns its draw.
    """
    num_responses = np.asarray(num_responses, dtype=np.int64)
    total = int(num_responses.sum())
    group_of = np.repeat(np.arange(len(num_responses)), num_responses)            # [R]
    starts = np.zeros(len(num_responses), dtype=np.int64)
    np.cumsum(num_responses[:-1], out=starts[1:])
    local = np.arange(total, dtype=np.int64) - starts[group_of]                    # response index in group
    with np.errstate(over="ignore"):
        key = _splitmix64(_splitmix64(_as_uint64(seed)) ^ _as_uint64(epoch))
        key = _splitmix64(key ^ np.asarray(record_indices, dtype=np.int64).astype(np.uint64)[group_of])
        key = _splitmix64(key ^ local.astype(np.uint64))
    order = np.lexsort((key, group_of))            # by group, then by key within the group
    rank_in_group = np.empty(total, dtype=np.int64)
    rank_in_group[order] = np.arange(total, dtype=np.int64) - starts[group_of[order]]
    return rank_in_group


def candidate_mask(num_responses: np.ndarray, record_indices: np.ndarray, *, num_comp: int | None,
                   seed: int, epoch: int) -> np.ndarray:
    """Which responses each group uses this epoch, as a flat bool mask over all responses.

    num_responses [G] (k of each group), record_indices [G]; returns bool [sum(k)] in group order.
    A group with k <= num_comp (or num_comp None) keeps all; otherwise exactly num_comp responses,
    the first num_comp of its draw_ranks order: a uniform random subset that depends on nothing
    else (not the rank, the world size or the other records).
    """
    num_responses = np.asarray(num_responses, dtype=np.int64)
    total = int(num_responses.sum())
    if num_comp is None or total == 0 or int(num_responses.max()) <= num_comp:
        return np.ones(total, dtype=bool)
    return draw_ranks(num_responses, record_indices, seed=seed, epoch=epoch) < num_comp


def select_candidates(num_responses: int, record_index: int, *, num_comp: int | None, seed: int,
                      epoch: int) -> list[int]:
    """The response indices (ascending) one record uses in `epoch`; see candidate_mask."""
    mask = candidate_mask(np.array([num_responses]), np.array([record_index]), num_comp=num_comp,
                          seed=seed, epoch=epoch)
    return np.flatnonzero(mask).tolist()


# ---------------------------------------------------------------------------------------------
# Batching over steps, accumulation and ranks
# ---------------------------------------------------------------------------------------------


@dataclass
class OptimizerStep:
    epoch: int
    step_in_epoch: int
    micro_batches: list[PackedBatch]  # this rank's; the same count on every rank
    global_groups: int                # real groups of this step over all micro-batches and ranks


@dataclass
class _EpochPlan:
    selected: np.ndarray              # bool [R]: candidate mask over all responses
    draw_rank: np.ndarray | None      # int64 [R]: draw_ranks, the candidates' order (seed_compat only)
    group_tokens: np.ndarray          # int64 [G]: packed tokens of each group with its candidates
    micro_batches: list[np.ndarray]   # group positions of each micro-batch, in epoch order
    num_steps: int


class GroupBatcher:
    """Candidate sampling + packing + rank sharding with a resumable, deterministic plan.

    `batch_size` groups per micro-batch, or with `max_tokens_per_batch` (which then takes
    precedence) as many consecutive groups as fit that many tokens; a group larger than the budget
    goes alone in its micro-batch. See the module docstring for the dealing of micro-batches to
    steps and ranks and for filler batches.

    `seed_compat=True` reproduces the original collator for `--margin_mode seed`: every group's
    candidates (the same ones as without it) are packed in a random order seeded by (seed, epoch,
    record index) -- the order `random.sample` put them in, even when k <= num_comp -- and their
    scores are truncated with int() (6.5 -> 6). Deterministic and independent of rank, world size
    and resumption like the rest of the plan. Default False: file order, scores as given.
    """

    def __init__(self, data: TokenizedData, *, num_comp: int | None, seed: int, batch_size: int | None = 1,
                 max_tokens_per_batch: int | None = None, gradient_accumulation_steps: int = 1,
                 world_size: int = 1, rank: int = 0, shuffle: bool = True, seed_compat: bool = False):
        if not data.groups:
            raise DataError("no usable records left after tokenization "
                            f"(tokenization stats: {dict(data.stats)})")
        if num_comp is not None and num_comp < 1:
            raise ConfigError(f"--num_comp must be at least 1, got {num_comp}")
        if max_tokens_per_batch is None:
            if batch_size is None or batch_size < 1:
                raise ConfigError(f"--per_device_train_batch_size must be at least 1, got {batch_size}")
        elif max_tokens_per_batch < 1:
            raise ConfigError(f"--max_tokens_per_batch must be at least 1, got {max_tokens_per_batch}")
        if gradient_accumulation_steps < 1:
            raise ConfigError(f"--gradient_accumulation_steps must be at least 1, got {gradient_accumulation_steps}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size} processes")
        if seed < 0:
            raise ConfigError(f"--seed must be non-negative, got {seed}")
        self.data = data
        self.num_comp = num_comp
        self.seed = seed
        self.batch_size = batch_size
        self.max_tokens_per_batch = max_tokens_per_batch
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.world_size = world_size
        self.rank = rank
        self.shuffle = shuffle
        self.seed_compat = seed_compat

        groups = data.groups
        self._num_responses = np.array([len(g.response_ids) for g in groups], dtype=np.int64)     # [G]
        self._record_indices = np.array([g.record_index for g in groups], dtype=np.int64)         # [G]
        self._response_starts = np.zeros(len(groups) + 1, dtype=np.int64)                         # [G+1]
        np.cumsum(self._num_responses, out=self._response_starts[1:])
        self._group_of_response = np.repeat(np.arange(len(groups)), self._num_responses)          # [R]
        query_lengths = np.array([len(g.query_ids) for g in groups], dtype=np.int64)
        response_lengths = np.array([len(r) for g in groups for r in g.response_ids], dtype=np.int64)
        self._sequence_tokens = query_lengths[self._group_of_response] + response_lengths          # [R]
        self._plans: dict[int, _EpochPlan] = {}

    # -- planning ------------------------------------------------------------------------------

    @property
    def slots_per_step(self) -> int:
        return self.world_size * self.gradient_accumulation_steps

    def _plan(self, epoch: int) -> _EpochPlan:
        plan = self._plans.get(epoch)
        if plan is not None:
            return plan
        num_groups = len(self.data.groups)
        draw_rank = None
        if self.seed_compat:
            draw_rank = draw_ranks(self._num_responses, self._record_indices, seed=self.seed, epoch=epoch)
            selected = np.ones(len(draw_rank), dtype=bool) if self.num_comp is None else draw_rank < self.num_comp
        else:
            selected = candidate_mask(self._num_responses, self._record_indices, num_comp=self.num_comp,
                                      seed=self.seed, epoch=epoch)
        group_tokens = np.bincount(self._group_of_response[selected], weights=self._sequence_tokens[selected],
                                   minlength=num_groups).astype(np.int64)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(num_groups)
        else:
            order = np.arange(num_groups)
        if self.max_tokens_per_batch is None:
            micro_batches = [order[i:i + self.batch_size] for i in range(0, num_groups, self.batch_size)]
        else:
            micro_batches = self._fill_token_budget(order, group_tokens)
        plan = _EpochPlan(selected=selected, draw_rank=draw_rank, group_tokens=group_tokens,
                          micro_batches=micro_batches, num_steps=-(-len(micro_batches) // self.slots_per_step))
        if len(self._plans) >= 2:  # current and next epoch are all a run needs
            self._plans.pop(next(iter(self._plans)))
        self._plans[epoch] = plan
        return plan

    def _fill_token_budget(self, order: np.ndarray, group_tokens: np.ndarray) -> list[np.ndarray]:
        """Greedy: consecutive groups of `order` while their tokens fit the budget."""
        budget = self.max_tokens_per_batch
        micro_batches: list[np.ndarray] = []
        start, used = 0, 0
        tokens_in_order = group_tokens[order].tolist()
        for i, tokens in enumerate(tokens_in_order):
            if i > start and used + tokens > budget:
                micro_batches.append(order[start:i])
                start, used = i, 0
            used += tokens
        micro_batches.append(order[start:])
        return micro_batches

    def steps_per_epoch(self, epoch: int = 0) -> int:
        """Optimizer steps in `epoch`, the same on every rank. Fixed with `batch_size`; with
        `max_tokens_per_batch` it can differ slightly between epochs (the packing follows the
        epoch's shuffle and candidates), hence the argument."""
        return self._plan(epoch).num_steps

    def total_steps(self, num_epochs: int) -> int:
        return sum(self.steps_per_epoch(epoch) for epoch in range(num_epochs))

    def oversized_groups(self, epoch: int = 0) -> int:
        """Groups that exceed max_tokens_per_batch on their own (each packed alone); 0 without a budget."""
        if self.max_tokens_per_batch is None:
            return 0
        return int((self._plan(epoch).group_tokens > self.max_tokens_per_batch).sum())

    def step_assignment(self, epoch: int, step: int, rank: int | None = None) -> tuple[list[np.ndarray | None], int]:
        """(micro-batches of `rank` in `step` as group positions, None for a filler; global_groups)."""
        plan = self._plan(epoch)
        rank = self.rank if rank is None else rank
        slots = plan.micro_batches[step * self.slots_per_step:(step + 1) * self.slots_per_step]
        per_rank = -(-len(slots) // self.world_size)
        mine: list[np.ndarray | None] = list(slots[rank::self.world_size])
        mine += [None] * (per_rank - len(mine))
        return mine, sum(len(micro) for micro in slots)

    # -- iteration -----------------------------------------------------------------------------

    def iter_steps(self, epoch: int, start_step: int = 0) -> Iterator[OptimizerStep]:
        """This rank's optimizer steps of `epoch` from `start_step` on (packing happens lazily)."""
        num_steps = self.steps_per_epoch(epoch)
        if not 0 <= start_step <= num_steps:
            raise ValueError(f"start_step {start_step} is outside epoch {epoch}'s {num_steps} steps")
        for step in range(start_step, num_steps):
            assignment, global_groups = self.step_assignment(epoch, step)
            micro_batches = [self._pack(epoch, positions) if positions is not None else self._filler(epoch, step)
                             for positions in assignment]
            yield OptimizerStep(epoch=epoch, step_in_epoch=step, micro_batches=micro_batches,
                                global_groups=global_groups)

    def _candidates(self, epoch: int, position: int) -> TokenizedGroup:
        """The group at `position` as packed in `epoch`: its candidates, in order, with their scores."""
        group = self.data.groups[position]
        plan = self._plan(epoch)
        responses = slice(self._response_starts[position], self._response_starts[position + 1])
        selected = plan.selected[responses]
        if self.seed_compat:
            chosen = np.flatnonzero(selected)
            chosen = chosen[np.argsort(plan.draw_rank[responses][chosen])].tolist()  # draw order
            scores = [float(int(group.scores[j])) for j in chosen]                   # the original's int()
        elif selected.all():
            return group
        else:
            chosen = np.flatnonzero(selected).tolist()
            scores = [group.scores[j] for j in chosen]
        return TokenizedGroup(record_index=group.record_index, query_ids=group.query_ids,
                              response_ids=[group.response_ids[j] for j in chosen], scores=scores,
                              response_positions=[group.response_positions[j] for j in chosen])

    def _pack(self, epoch: int, positions: Iterable[int], num_groups: int | None = None) -> PackedBatch:
        return pack_groups([self._candidates(epoch, int(p)) for p in positions], num_groups=num_groups)

    def _filler(self, epoch: int, step: int) -> PackedBatch:
        """A micro-batch that keeps shapes non-empty but counts 0 groups: the step's smallest group."""
        plan = self._plan(epoch)
        slots = plan.micro_batches[step * self.slots_per_step:(step + 1) * self.slots_per_step]
        positions = np.concatenate(slots)
        smallest = positions[np.argmin(plan.group_tokens[positions])]
        return self._pack(epoch, [smallest], num_groups=0)
