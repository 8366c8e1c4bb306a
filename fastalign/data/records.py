"""Sandbox records: reading a data file and validating each record.

Details: docs/design.md section 7.8.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from fastalign.data.jsonio import (  # noqa: F401  (skip reasons, re-exported)
    REASON_MALFORMED_JSON,
    REASON_NOT_UTF8,
    SKIP_INVALID_HINT,
    ParseFailure,
    iter_json_values,
    json_type_name,
)
from fastalign.errors import ConfigError, DataError

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
# REASON_MALFORMED_JSON and REASON_NOT_UTF8 (a JSONL line that does not parse) come from fastalign.data.jsonio.


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
    """Read and validate a sandbox data file (rules: docs/design.md section 7.8).

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
    """The small sandbox file bundled with fastalign (for demos and smoke tests), package data of
    `fastalign.data` found through importlib.resources (the package is installed unzipped: a real file)."""
    return Path(str(resources.files("fastalign.data").joinpath("sample_sandbox.jsonl")))


def records_from_dicts(items: Sequence[Any], *, rating_scale: float = 7.0) -> list[Record]:
    """Validate in-memory records (dicts with the file format's keys) by the same rules as a file.

    Record objects pass through unchanged; a dict becomes a Record whose index is its position in
    `items`. The first invalid one raises DataError naming that index, the field and the reason.
    """
    if not rating_scale >= 1:
        raise ConfigError(f"--rating_scale must be at least 1 (scores are rated 1..rating_scale), got {rating_scale}")
    records: list[Record] = []
    for index, item in enumerate(items):
        if isinstance(item, Record):
            records.append(item)
            continue
        try:
            records.append(_validate(item, index, rating_scale))
        except _InvalidRecord as bad:
            raise DataError(bad.message("records", f"record {index}")) from None
    return records
