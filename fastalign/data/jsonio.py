"""Read JSON record files: one array (`.json`) or one value per line (`.jsonl`), optionally gzipped.

Details: docs/design.md section 7.6.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from fastalign.errors import DataError

__all__ = [
    "FILE_SUFFIXES",
    "REASON_MALFORMED_JSON",
    "REASON_NOT_UTF8",
    "SKIP_INVALID_HINT",
    "JsonItem",
    "ParseFailure",
    "is_json_lines",
    "iter_json_values",
    "json_type_name",
]

FILE_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
# Reasons a JSONL line is skipped (ParseFailure.reason): short and stable, users grep them.
REASON_MALFORMED_JSON = "malformed JSON"
REASON_NOT_UTF8 = "not UTF-8"
# Appended by the CLIs to the message of the first invalid record when it stops the run.
SKIP_INVALID_HINT = " (pass --skip_invalid to drop invalid records and go on)"

_GZIP_MAGIC = b"\x1f\x8b"
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class ParseFailure:
    """A JSONL line that holds no JSON value; the reader goes on with the next line."""

    reason: str  # REASON_MALFORMED_JSON or REASON_NOT_UTF8 (what skipped lines are counted by)
    message: str  # "<file>: record 3 (line 5): malformed JSON at column 12: Expecting ','"


@dataclass(frozen=True)
class JsonItem:
    index: int  # 0-based position among the file's records (blank JSONL lines do not count)
    line: int | None  # 1-based line of a JSONL file; None for an element of a JSON array
    value: Any  # the parsed JSON value, or a ParseFailure for a JSONL line that does not parse

    @property
    def where(self) -> str:
        """Where the record stands, for messages: 'record 3 (line 5)' (JSONL) or 'record 3' (array)."""
        return _location(self.index, self.line)


def _location(index: int, line: int | None) -> str:
    return f"record {index}" + (f" (line {line})" if line is not None else "")


def json_type_name(value: Any) -> str:
    """The JSON name of a parsed value's type ("object", "array", "string", "number", ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def is_json_lines(path: str | Path) -> bool | None:
    """True for a `.jsonl[.gz]` name, False for `.json[.gz]`, None for any other suffix."""
    name = Path(path).name.lower().removesuffix(".gz")
    if name.endswith(".jsonl"):
        return True
    if name.endswith(".json"):
        return False
    return None


def iter_json_values(path: str | Path, *, skipping_invalid: bool = False) -> Iterator[JsonItem]:
    """Yield a JsonItem for every record of a JSON array / JSONL file (gzipped or not).

    Reads JSONL line by line (a large file never sits in memory as a whole). `skipping_invalid`
    tells the reader that the caller drops invalid records: an error inside a JSON array then
    says that it cannot be skipped. Raises DataError for unreadable files (docs/design.md section 7.6).
    """
    path = Path(path)
    try:
        with _open_bytes(path) as stream:
            lines = is_json_lines(path)
            if lines is None:  # unknown suffix: sniff (the whole file is read; such files are rare)
                content = stream.read()
                lines = content.removeprefix(_BOM).lstrip()[:1] != b"["
                stream = io.BytesIO(content)
            if lines:
                yield from _iter_lines(path, stream)
            else:
                yield from _iter_array(path, stream.read(), skipping_invalid)
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise DataError(f"{path}: corrupt or truncated gzip data ({err})") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror or err}") from None


@contextlib.contextmanager
def _open_bytes(path: Path) -> Iterator[BinaryIO]:
    """The file opened for binary reading, through gzip when it is named .gz or starts with the magic."""
    try:
        raw = open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a .json or .jsonl file (optionally .gz)") from None
    with raw:
        if path.name.lower().endswith(".gz") or raw.peek(2)[:2] == _GZIP_MAGIC:
            with gzip.GzipFile(fileobj=raw, mode="rb") as unpacked:
                yield unpacked
        else:
            yield raw


def _iter_lines(path: Path, stream: BinaryIO) -> Iterator[JsonItem]:
    index = 0
    for line_number, line in enumerate(stream, start=1):  # binary: lines end at b"\n" only
        if line_number == 1:
            line = line.removeprefix(_BOM)
        if not line.strip():
            continue
        last_line = not line.endswith(b"\n")  # only the file's last line can lack its newline
        if not last_line:
            line = line[:-1]  # so that an error at the end of the line names a column of it
        try:
            text = line.decode("utf-8")
            value = json.loads(text)
        except UnicodeDecodeError as err:
            value = ParseFailure(REASON_NOT_UTF8, f"{path}: {_location(index, line_number)}: "
                                                  f"not valid UTF-8 at byte {err.start} of the line")
        except json.JSONDecodeError as err:
            detail = f"malformed JSON at column {err.colno}: {err.msg}"
            if last_line and err.pos >= len(text.rstrip()):  # a record cut short at the end of the file
                detail += " (the line ends early: truncated file?)"
            value = ParseFailure(REASON_MALFORMED_JSON, f"{path}: {_location(index, line_number)}: {detail}")
        yield JsonItem(index, line_number, value)
        index += 1


def _iter_array(path: Path, raw: bytes, skipping_invalid: bool) -> Iterator[JsonItem]:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}: not valid UTF-8 at byte {err.start} (line {line})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        message = f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        if err.pos >= len(text.rstrip()):
            message += " (the data ends early: truncated file?)"
        if err.msg.startswith("Extra data"):
            message += " (one record per line? then name the file .jsonl)"
        if skipping_invalid:
            message += ("; --skip_invalid cannot skip past an error inside a JSON array "
                        "(it skips whole lines of a .jsonl file only)")
        raise DataError(message) from None
    if not isinstance(data, list):
        raise DataError(f"{path}: top level is a JSON {json_type_name(data)}, expected an array of records "
                        "(or name the file .jsonl for one record per line)")
    for index, value in enumerate(data):
        yield JsonItem(index, None, value)
