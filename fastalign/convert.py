"""Convert other people's preference data into Sandbox records {"query", "responses", "scores"}.

Details: docs/design.md section 7.4.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import math
import os
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fastalign.cli import BOOLEAN_FLAG, run_main
from fastalign.data.jsonio import (
    FILE_SUFFIXES,
    SKIP_INVALID_HINT,
    ParseFailure,
    is_json_lines,
    iter_json_values,
    json_type_name,
)
from fastalign.errors import ConfigError, DataError

FORMATS = ("hh-rlhf", "pairs", "ratings")
ALPACA_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:"
ASSISTANT_MARKER = "\n\nAssistant:"


# ---------------------------------------------------------------------------------------------
# Output files: JSON array / JSONL, optionally gzip-compressed, chosen by extension
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileKind:
    lines: bool  # JSONL (one record per line) rather than one JSON array
    gzipped: bool


def file_kind(path: Path, flag: str) -> FileKind:
    """The format a path's extension names; `flag` is the option that gave the path (for errors)."""
    lines = is_json_lines(path)
    if lines is None:
        raise ConfigError(f"{flag} {path}: unknown file type; use one of {', '.join(FILE_SUFFIXES)}")
    return FileKind(lines=lines, gzipped=path.name.lower().endswith(".gz"))


@contextlib.contextmanager
def _open_text_for_writing(path: Path, gzipped: bool) -> Iterator[io.TextIOBase]:
    """A UTF-8 text file opened for writing with "\n" line ends, through gzip when `gzipped`."""
    if not gzipped:
        with open(path, "w", encoding="utf-8", newline="\n") as handle:
            yield handle
        return
    # mtime=0 and no stored file name: the same records always give the same bytes.
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0,
                                                 compresslevel=6) as packed:
        with io.TextIOWrapper(packed, encoding="utf-8", newline="\n") as handle:
            yield handle


@contextlib.contextmanager
def record_writer(path: Path, flag: str = "--output") -> Iterator[Callable[[dict], None]]:
    """Context manager yielding `write(record)`; the file appears at `path` only on a clean exit.

    Records go to a temporary file beside `path` (same extension), renamed over `path` at the end
    (atomic on POSIX). An exception inside the block removes the temporary file and leaves any old
    `path` untouched.
    """
    kind = file_kind(path, flag)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _open_text_for_writing(tmp, kind.gzipped) as out:
            written = 0

            def write(record: dict) -> None:
                nonlocal written
                text = json.dumps(record, ensure_ascii=False)
                if kind.lines:
                    out.write(text + "\n")
                else:
                    out.write(("[\n" if written == 0 else ",\n") + text)
                written += 1

            yield write
            if not kind.lines:
                out.write("\n]\n" if written else "[]\n")
        os.replace(tmp, path)
    except OSError as err:
        raise DataError(f"{path}: cannot write: {err.strerror or err}") from None
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Record conversion: one raw record -> one Sandbox record, or InvalidRecord
# ---------------------------------------------------------------------------------------------


class InvalidRecord(Exception):
    """A record that cannot be converted; str() is ", field 'f': reason (detail)" for messages.

    `key` ("field: reason") holds no record-specific values, so skipped records group by it.
    """

    def __init__(self, field_name: str | None, reason: str, detail: str = ""):
        where = f", field '{field_name}'" if field_name else ""
        super().__init__(f"{where}: {reason}{f' ({detail})' if detail else ''}")
        self.key = f"{field_name}: {reason}" if field_name else reason  # what skipped records group by


@dataclass(frozen=True)
class ConvertOptions:
    template: bool = True  # wrap prompts in the Alpaca template of the original data
    chosen_score: float = 7.0  # hh-rlhf / pairs: rating of the chosen response
    rejected_score: float = 1.0  # hh-rlhf / pairs: rating of the rejected response
    rating_scale: float = 7.0  # ratings must lie in [1, rating_scale]


def _field(record: dict, name: str, expected: type):
    if name not in record:
        raise InvalidRecord(name, "missing field")
    value = record[name]
    if not isinstance(value, expected):
        raise InvalidRecord(name, f"must be {'a string' if expected is str else 'an array'}",
                            f"got {json_type_name(value)}")
    return value


def _text(record: dict, name: str) -> str:
    value = _field(record, name, str)
    if not value.strip():
        raise InvalidRecord(name, "empty text")
    return value


def _query(prompt: str, options: ConvertOptions) -> str:
    return ALPACA_TEMPLATE.format(prompt=prompt.strip()) if options.template else prompt


def _score(value: float) -> float | int:
    """Whole ratings are written as integers, as in the original Sandbox data."""
    return int(value) if float(value).is_integer() else value


def _preference_pair(query: str, chosen: str, rejected: str, options: ConvertOptions) -> dict:
    if chosen == rejected:
        raise InvalidRecord("chosen/rejected", "chosen and rejected are identical")
    return {"query": query, "responses": [chosen, rejected],
            "scores": [_score(options.chosen_score), _score(options.rejected_score)]}


def split_last_assistant_turn(dialogue: str, name: str) -> tuple[str, str]:
    """Split an hh-rlhf text at its last "\\n\\nAssistant:" into (dialogue before it, reply)."""
    cut = dialogue.rfind(ASSISTANT_MARKER)
    if cut < 0:
        raise InvalidRecord(name, "no '\\n\\nAssistant:' turn")
    return dialogue[:cut], dialogue[cut + len(ASSISTANT_MARKER):]


def convert_hh_rlhf(record: dict, options: ConvertOptions) -> dict:
    chosen_dialogue, chosen = split_last_assistant_turn(_text(record, "chosen"), "chosen")
    rejected_dialogue, rejected = split_last_assistant_turn(_text(record, "rejected"), "rejected")
    if chosen_dialogue != rejected_dialogue:
        raise InvalidRecord("chosen/rejected", "chosen and rejected do not share a prompt")
    if not chosen_dialogue.strip():
        raise InvalidRecord("chosen", "no dialogue before the final assistant turn")
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        if not reply.strip():
            raise InvalidRecord(name, "empty final assistant reply")
    prompt = chosen_dialogue.strip() if options.template else chosen_dialogue + ASSISTANT_MARKER
    return _preference_pair(_query(prompt, options), chosen.strip(), rejected.strip(), options)


def convert_pair(record: dict, options: ConvertOptions) -> dict:
    query = _query(_text(record, "prompt"), options)
    return _preference_pair(query, _text(record, "chosen"), _text(record, "rejected"), options)


def convert_ratings(record: dict, options: ConvertOptions) -> dict:
    query = _query(_text(record, "prompt"), options)
    completions = _field(record, "completions", list)
    ratings = _field(record, "ratings", list)
    if not completions:
        raise InvalidRecord("completions", "empty array")
    if len(completions) != len(ratings):
        raise InvalidRecord("ratings", "length differs from completions",
                            f"{len(ratings)} ratings, {len(completions)} completions")
    for position, completion in enumerate(completions):
        if not isinstance(completion, str):
            raise InvalidRecord("completions", "must hold strings",
                                f"item {position} is {json_type_name(completion)}")
        if not completion.strip():
            raise InvalidRecord("completions", "empty text", f"item {position}")
    for position, rating in enumerate(ratings):
        if isinstance(rating, bool) or not isinstance(rating, (int, float)) or not math.isfinite(rating):
            raise InvalidRecord("ratings", "not a finite number", f"item {position} is {rating!r}")
        if not 1 <= rating <= options.rating_scale:
            raise InvalidRecord("ratings", f"rating outside [1, {_score(options.rating_scale)}]",
                                f"item {position} is {rating!r}")
    return {"query": query, "responses": list(completions), "scores": list(ratings)}


CONVERTERS: dict[str, Callable[[dict, ConvertOptions], dict]] = {
    "hh-rlhf": convert_hh_rlhf,
    "pairs": convert_pair,
    "ratings": convert_ratings,
}


def convert_record(fmt: str, record: object, options: ConvertOptions) -> dict:
    if not isinstance(record, dict):
        raise InvalidRecord(None, "record is not a JSON object", f"got {json_type_name(record)}")
    return CONVERTERS[fmt](record, options)


# ---------------------------------------------------------------------------------------------
# Whole files
# ---------------------------------------------------------------------------------------------


@dataclass
class ConversionReport:
    records_in: int = 0
    records_out: int = 0
    skipped: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))  # reason -> indices

    def summary(self, input_path: Path, output_path: Path, fmt: str) -> str:
        skipped = sum(len(indices) for indices in self.skipped.values())
        lines = [f"{fmt}: {input_path} -> {output_path}",
                 f"  records in: {self.records_in}, written: {self.records_out}, skipped: {skipped}"]
        for reason, indices in sorted(self.skipped.items(), key=lambda item: -len(item[1])):
            shown = ", ".join(map(str, indices[:5])) + (", ..." if len(indices) > 5 else "")
            lines.append(f"  skipped {len(indices)}: {reason} (record{'s' * (len(indices) > 1)} {shown})")
        return "\n".join(lines)


def validate_options(fmt: str, options: ConvertOptions) -> None:
    """Flag values the trainer would reject (scores outside [1, rating_scale]) or that invert a pair."""
    if fmt not in CONVERTERS:
        raise ConfigError(f"--format {fmt}: unknown format; use one of {', '.join(FORMATS)}")
    if not (math.isfinite(options.rating_scale) and options.rating_scale >= 1):
        raise ConfigError(f"--rating_scale {options.rating_scale}: must be a finite number >= 1")
    if fmt == "ratings":
        return
    for flag, score in (("--chosen_score", options.chosen_score), ("--rejected_score", options.rejected_score)):
        if not (math.isfinite(score) and 1 <= score <= options.rating_scale):
            raise ConfigError(f"{flag} {score}: must lie in [1, --rating_scale {options.rating_scale}]")
    if options.chosen_score <= options.rejected_score:
        raise ConfigError(f"--chosen_score {options.chosen_score} must be greater than "
                          f"--rejected_score {options.rejected_score}")


def same_file(a: Path, b: Path) -> bool:
    """The same path after resolving links, or (both existing) the same inode (a hard link)."""
    if Path(a).resolve() == Path(b).resolve():
        return True
    return Path(a).exists() and Path(b).exists() and os.path.samefile(a, b)


def convert_file(fmt: str, input_path: Path, output_path: Path, options: ConvertOptions = ConvertOptions(),
                 *, skip_invalid: bool = False) -> ConversionReport:
    """Convert a whole file; raises DataError on the first invalid record unless `skip_invalid`."""
    validate_options(fmt, options)
    file_kind(input_path, "--input")  # bad file names fail before any reading
    file_kind(output_path, "--output")
    if same_file(input_path, output_path):
        raise ConfigError(f"--output {output_path} is the --input file: converting would overwrite "
                          "the source data; choose another --output")
    report = ConversionReport()
    with record_writer(output_path) as write:
        for item in iter_json_values(input_path, skipping_invalid=skip_invalid):
            report.records_in += 1
            if isinstance(item.value, ParseFailure):  # a JSONL line that holds no JSON value
                reason, message = item.value.reason, item.value.message
            else:
                try:
                    converted = convert_record(fmt, item.value, options)
                except InvalidRecord as invalid:
                    reason, message = invalid.key, f"{input_path}: {item.where}{invalid}"
                else:
                    write(converted)
                    report.records_out += 1
                    continue
            if not skip_invalid:
                raise DataError(message + SKIP_INVALID_HINT)
            report.skipped[reason].append(item.index)
        if report.records_out == 0:
            if report.records_in:
                print(report.summary(input_path, output_path, fmt), file=sys.stderr)
            raise DataError(f"{input_path}: no valid {fmt} records to convert; nothing written")
    return report


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fastalign.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--input", required=True, type=Path, help="file in --format (" + ", ".join(FILE_SUFFIXES) + ")")
    parser.add_argument("--output", required=True, type=Path, help="Sandbox file to write (same extensions)")
    parser.add_argument("--chosen_score", type=float, default=None, help="hh-rlhf/pairs: rating of chosen (7)")
    parser.add_argument("--rejected_score", type=float, default=None, help="hh-rlhf/pairs: rating of rejected (1)")
    parser.add_argument("--no_template", default=False, help="keep the raw prompt as the query", **BOOLEAN_FLAG)
    parser.add_argument("--rating_scale", type=float, default=7.0, help="scores must lie in [1, this] (7)")
    parser.add_argument("--skip_invalid", default=False, help="drop invalid records and report them", **BOOLEAN_FLAG)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.format == "ratings":
        for flag in ("chosen_score", "rejected_score"):
            if getattr(args, flag) is not None:
                raise ConfigError(f"--{flag} applies to --format hh-rlhf and pairs only "
                                  "(ratings records carry their own ratings)")
    defaults = ConvertOptions()
    options = ConvertOptions(
        template=not args.no_template,
        chosen_score=defaults.chosen_score if args.chosen_score is None else args.chosen_score,
        rejected_score=defaults.rejected_score if args.rejected_score is None else args.rejected_score,
        rating_scale=args.rating_scale,
    )
    report = convert_file(args.format, args.input, args.output, options, skip_invalid=args.skip_invalid)
    print(report.summary(args.input, args.output, args.format))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
