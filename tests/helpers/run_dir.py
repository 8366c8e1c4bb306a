"""The run directory as tests set it up and compare it: a lock file naming an owner, a snapshot of every file."""

from __future__ import annotations

import json
from pathlib import Path

from fastalign.run_lock import LOCK_FILE


def write_owner(out: Path, host: str, pid: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    path.write_text(json.dumps({"host": host, "pid": pid, "started": "2026-01-01T00:00:00Z"}))
    return path


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its bytes (None for a directory)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}
