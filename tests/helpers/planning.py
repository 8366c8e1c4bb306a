"""`python -m fastalign.plan`'s main, run in-process: its exit status, its JSON plan and its output."""

from __future__ import annotations

import json
from pathlib import Path

from fastalign.cli import run_main
from fastalign.plan import planner as fplan


def run_plan(argv: list[str], tmp_path: Path, capsys) -> tuple[int, dict, str]:
    out = tmp_path / "plan.json"
    status = run_main(fplan.main, [*argv, "--json", str(out)])
    text = capsys.readouterr()
    return status, json.loads(out.read_text()) if out.exists() else {}, text.out + text.err
