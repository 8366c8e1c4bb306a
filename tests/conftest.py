"""Test-wide setup.

Without CUDA, Triton kernels run under Triton's interpreter: TRITON_INTERPRET must be set before
`triton` (and so `fastalign.kernels`) is imported, which is why it is set here, at collection start.
Tests marked `gpu` are skipped without CUDA; `make gpu-check` runs them on a GPU machine.

On a CUDA machine the whole suite runs too (`make test` there): the `gpu` tests use the GPUs.
Processes the other tests start (training under torchrun with 4 ranks, evaluation, benchmarks),
also from a module's shared fixtures, see no GPU (CUDA_VISIBLE_DEVICES="" for each module, set
before the module's own fixtures run), so they run on gloo whatever the number of GPUs. A `gpu`
test gets the machine's setting back, for itself and the processes it starts; collection (where
skip conditions count devices) sees it unchanged.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
_VISIBLE_DEVICES = os.environ.get("CUDA_VISIBLE_DEVICES")


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


@pytest.fixture(scope="module", autouse=True)
def _cpu_only_subprocesses():
    # Module scope and autouse: set up before any fixture of the module (a run its tests share).
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CUDA_VISIBLE_DEVICES", "")
        yield


@pytest.fixture(autouse=True)
def _gpus_for_gpu_tests(request, monkeypatch):
    if "gpu" in request.keywords:
        if _VISIBLE_DEVICES is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", _VISIBLE_DEVICES)
