"""Records -> token ids per group (query once, each response on its own).

Details: docs/design.md section 7.10.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from fastalign.data.records import LoadedRecords, Record, records_from_dicts
from fastalign.errors import ConfigError

TURN_MARKERS = ("\n\nHuman:", "\n\nAssistant:")


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
    records: LoadedRecords | Sequence[Record | dict],
    tokenizer: Any,
    *,
    model_max_length: int = 512,
    rating_scale: float = 7.0,
    append_eos: bool = True,
    stop_response: bool = False,
    progress: bool = False,
    chunk_size: int = 1024,
) -> TokenizedData:
    """Tokenize records into groups (rules: docs/design.md section 7.10).

    Texts are tokenized in batches of `chunk_size` records, so a fast tokenizer runs in Rust (on
    all cores) over many strings at once; `progress` shows a tqdm bar. Plain dicts are accepted
    as records: they are validated as a file's records are (`records_from_dicts`, scores in
    [1, rating_scale]) and a bad one raises DataError naming its index.
    """
    if isinstance(records, LoadedRecords):
        records = records.records
    elif not all(isinstance(record, Record) for record in records):
        records = records_from_dicts(records, rating_scale=rating_scale)
    if model_max_length < 2:
        raise ConfigError("--model_max_length must be at least 2 (one query and one response token), "
                          f"got {model_max_length}")
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

    For a fast (Rust) tokenizer that is the backend's `encode_batch_fast` (no offsets computed;
    benchmarks/RESULTS.md, "Data pipeline") -- but only when it gives the same ids as the tokenizer's own call on
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
