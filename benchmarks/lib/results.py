"""Result files: their names (benchmark, UTC date, device, preset), the header every one starts
with, and atomic JSON writing."""

from __future__ import annotations

import datetime as _dt
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.lib.machine import device_tag, machine_info
from benchmarks.lib.paths import REPO_ROOT, RESULTS_DIR


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def utc_date() -> str:
    return utc_now().strftime("%Y-%m-%d")


def results_path(benchmark: str, preset: str, device: str | Any, out_dir: Path | None = None) -> Path:
    """benchmarks/results/<benchmark>-<date>-<device>-<preset>.json (the date is UTC)."""
    out_dir = Path(out_dir) if out_dir is not None else RESULTS_DIR
    return out_dir / f"{benchmark}-{utc_date()}-{device_tag(device)}-{preset}.json"


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """Write atomically (tmp + rename) so a killed run never leaves half a JSON file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    tmp.replace(path)
    return path


def result_header(benchmark: str, preset: str, device: str | Any) -> dict[str, Any]:
    """The fields every result JSON starts with."""
    return {
        "benchmark": benchmark,
        "preset": preset,
        "date_utc": utc_now().strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join([Path(sys.executable).name] + [_rel(a) for a in sys.argv]),
        "machine": machine_info(device),
    }


def _rel(arg: str) -> str:
    try:
        return str(Path(arg).resolve().relative_to(REPO_ROOT)) if Path(arg).exists() else arg
    except ValueError:
        return arg
