"""The installed package: one top-level package, which shadows nothing transformers imports."""

from pathlib import Path

import fastalign

REPO = Path(__file__).resolve().parents[2]


def test_package_data_ships_sample():
    from importlib.resources import files

    sample = files("fastalign.data") / "sample_sandbox.jsonl"
    assert sample.is_file()
    assert fastalign.__version__


def test_pyproject_applies_without_setuptools_warnings():
    # `pip install` prints setuptools' warnings about our own metadata (e.g. the deprecated
    # `license = {text = ...}` table); applying the configuration raises the same ones
    import warnings
    from pathlib import Path

    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), pyproject)
    assert [str(w.message) for w in caught] == []
    assert dist.metadata.license_expression == "Apache-2.0"


def test_the_repository_root_holds_no_module_named_kernels():
    # Commands run from the repository root (gpu-check, `python -m ...`) have it first on sys.path.
    # transformers >= 5.25 requires and imports the hub package `kernels`; a top-level `kernels/`
    # package of ours shadowed it there and broke transformers' model code (the import itself runs
    # from the root in tests/e2e/test_tiny_e2e.py). A namespace directory (no __init__.py, no
    # origin) would not shadow it: Python takes one only when no path entry has a real module.
    from importlib.machinery import PathFinder

    spec = PathFinder.find_spec("kernels", [str(REPO)])
    assert spec is None or spec.origin is None, spec.origin
