"""The installed package: one top-level package, which shadows nothing transformers imports."""

import fastalign


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
