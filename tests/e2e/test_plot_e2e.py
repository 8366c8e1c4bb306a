"""python -m fastalign.plot as a user runs it: errors without a traceback."""

import subprocess
import sys

import pytest
from helpers.records import metrics_line, write_metrics

pytestmark = pytest.mark.slow


def test_cli_subprocess_has_no_traceback(tmp_path):
    write_metrics(tmp_path, ["not json", metrics_line(2)])
    result = subprocess.run([sys.executable, "-m", "fastalign.plot", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: {tmp_path / 'metrics.jsonl'}: line 1: invalid JSON")
