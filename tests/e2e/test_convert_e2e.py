"""python -m fastalign.convert as a user runs it: a malformed line is one error line, no traceback."""

import json
import subprocess
import sys

import pytest
from helpers.records import MULTI_TURN_CHOSEN, MULTI_TURN_REJECTED

pytestmark = pytest.mark.slow


def test_cli_subprocess_reports_malformed_line_without_traceback(tmp_path):
    source = tmp_path / "hh.jsonl"
    source.write_text(json.dumps({"chosen": MULTI_TURN_CHOSEN, "rejected": MULTI_TURN_REJECTED}) + "\n{broken\n")
    result = subprocess.run(
        [sys.executable, "-m", "fastalign.convert", "--format", "hh-rlhf", "--input", str(source),
         "--output", str(tmp_path / "out.jsonl")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: {source}: record 1 (line 2): malformed JSON at column 2: ")
    assert "(pass --skip_invalid to drop invalid records and go on)" in result.stderr
    assert not (tmp_path / "out.jsonl").exists()
