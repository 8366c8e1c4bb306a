"""Test-wide setup.

Without CUDA, Triton kernels run under Triton's interpreter: TRITON_INTERPRET must be set before
`triton` (and so `kernels`) is imported, which is why it is set here, at collection start.
Tests marked `gpu` are skipped without CUDA; `make gpu-check` runs them on a GPU machine.

On a CUDA machine the whole suite runs too (`make test` there): the `gpu` tests use the GPUs,
and every other test keeps to the CPU it was written for. Processes those tests start (training
under torchrun with 4 ranks, evaluation, benchmarks) see no GPU (CUDA_VISIBLE_DEVICES=""), so
they run on gloo whatever the number of GPUs; this process has already counted its devices at
import (below), so its own `gpu` tests are unaffected.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (run by `make gpu-check`)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session", autouse=True)
def _private_token_cache(tmp_path_factory):
    """The trainer caches tokenized data under $XDG_CACHE_HOME/fastalign: the suite uses its own,
    so it neither writes to the user's home nor depends on what an earlier run left there."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))


@pytest.fixture(autouse=True)
def _cpu_only_subprocesses(request, monkeypatch):
    if "gpu" not in request.keywords:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
