"""Records -> validated groups -> tokens -> packed, rank-sharded micro-batches: the data stages.

Each stage is a module of this package; the package re-exports their public names (the import
path the trainer, evaluation, benchmarks and tests use). See docs/design.md section 2.

    records       data files and in-memory dicts -> validated `Record`s (read by `jsonio`)
    tokenization  records -> `TokenizedGroup`s (query once, each response on its own)
    token_cache   tokenized groups cached on disk across runs and ranks
    packing       groups -> one `PackedBatch` (unshared or shared-prefix layout)
    batching      candidate sampling, micro-batches, optimizer steps and ranks

The bundled sample, `sample_sandbox.jsonl`, is package data of this package (`sample_data_path`).

`packing` and `batching` (the stages that need torch) are imported when one of their names is first
used: a command that only reads records (`python -m fastalign.convert`) starts without importing
torch, about 1.5 s sooner.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from fastalign.data.records import (
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
    LoadedRecords,
    Record,
    load_records,
    records_from_dicts,
    sample_data_path,
)
from fastalign.data.tokenization import (
    STAT_KEYS,
    TURN_MARKERS,
    TokenizedData,
    TokenizedGroup,
    cut_at_turn_marker,
    tokenize_records,
)
from fastalign.errors import DataError

if TYPE_CHECKING:
    from fastalign.data.batching import GroupBatcher, OptimizerStep, candidate_mask, draw_ranks, select_candidates
    from fastalign.data.packing import IGNORE_INDEX, PackedBatch, pack_groups, packed_tokens

_LAZY = {name: "packing" for name in ("IGNORE_INDEX", "PackedBatch", "pack_groups", "packed_tokens")} | {
    name: "batching" for name in ("GroupBatcher", "OptimizerStep", "candidate_mask", "draw_ranks", "select_candidates")}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "DataError", "Record", "LoadedRecords", "load_records", "records_from_dicts", "sample_data_path",
    "TokenizedGroup", "TokenizedData", "tokenize_records", "cut_at_turn_marker", "STAT_KEYS", "TURN_MARKERS",
    "PackedBatch", "pack_groups", "packed_tokens", "IGNORE_INDEX",
    "candidate_mask", "draw_ranks", "select_candidates", "GroupBatcher", "OptimizerStep",
    "REASON_CATEGORY_TYPE", "REASON_EMPTY_RESPONSES", "REASON_LENGTH_MISMATCH", "REASON_MALFORMED_JSON",
    "REASON_MISSING_QUERY", "REASON_MISSING_RESPONSES", "REASON_MISSING_SCORES", "REASON_NOT_OBJECT",
    "REASON_NOT_UTF8", "REASON_QUERY_TYPE", "REASON_RESPONSES_TYPE", "REASON_SCORE_NOT_FINITE",
    "REASON_SCORE_RANGE", "REASON_SCORES_TYPE",
]
