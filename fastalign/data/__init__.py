"""Records -> validated groups -> tokens -> packed, rank-sharded micro-batches: the data stages.

Each stage is a module of this package; the package re-exports their public names (the import
path the trainer, evaluation, benchmarks and tests use). See docs/design.md section 2.

    records       data files and in-memory dicts -> validated `Record`s (read by `jsonio`)
    tokenization  records -> `TokenizedGroup`s (query once, each response on its own)
    token_cache   tokenized groups cached on disk across runs and ranks
    packing       groups -> one `PackedBatch` (unshared or shared-prefix layout)
    batching      candidate sampling, micro-batches, optimizer steps and ranks

The bundled sample, `sample_sandbox.jsonl`, is package data of this package (`sample_data_path`).
"""

from fastalign.data.batching import GroupBatcher, OptimizerStep, candidate_mask, draw_ranks, select_candidates
from fastalign.data.packing import IGNORE_INDEX, PackedBatch, pack_groups, packed_tokens
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
