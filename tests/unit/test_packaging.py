"""The installed package: one top-level package, which shadows nothing transformers imports."""

import os
import subprocess
import sys
from pathlib import Path

import fastalign

REPO = Path(__file__).resolve().parents[1]


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


def test_package_data_ships_sample():
    from importlib.resources import files

    sample = files("fastalign") / "data" / "sample_sandbox.jsonl"
    assert sample.is_file()
    assert fastalign.__version__


def test_pyproject_applies_without_setuptools_warnings():
    # `pip install` prints setuptools' warnings about our own metadata (e.g. the deprecated
    # `license = {text = ...}` table); applying the configuration raises the same ones
    import warnings
    from pathlib import Path

    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), pyproject)
    assert [str(w.message) for w in caught] == []
    assert dist.metadata.license_expression == "Apache-2.0"
