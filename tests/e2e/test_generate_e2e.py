"""python -m fastalign.generate as a user runs it: a missing model is a clean error."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_cli_missing_model_is_a_clean_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fastalign.generate", "--model_name_or_path", str(tmp_path),
                           "--prompt", "hi"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "config.json" in proc.stderr
