"""A fresh interpreter at the repository root imports transformers' models beside fastalign."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


REPO = Path(__file__).resolve().parents[2]


def test_transformers_models_import_from_the_repository_root():
    # Commands run from the repository root (gpu-check, `python -m ...`) have it first on
    # sys.path. transformers >= 5.25 requires and imports the hub package `kernels`; a
    # top-level `kernels/` directory of ours shadowed it and broke its model code's import.
    code = ("import importlib.util, transformers.activations, transformers.models.llama.modeling_llama\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "print('KERNELS', spec.origin if spec else None)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    origin = result.stdout.split("KERNELS ", 1)[1].strip()
    assert origin == "None" or not Path(origin).resolve().is_relative_to(REPO / "kernels"), origin
