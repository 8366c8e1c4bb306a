"""The installed package: our top-level `kernels` must not look like transformers' hub `kernels`."""

import importlib

import fastalign


def test_transformers_does_not_mistake_our_kernels_package():
    import kernels  # noqa: F401  (ours: the Triton kernels package)
    from transformers.utils import import_utils

    importlib.reload(import_utils)  # fresh lru_caches, with our `kernels` importable
    assert import_utils.is_kernels_available() is False


def test_package_data_ships_sample():
    from importlib.resources import files

    sample = files("fastalign") / "data" / "sample_sandbox.jsonl"
    assert sample.is_file()
    assert fastalign.__version__
