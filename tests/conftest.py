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

The tiers: tests/unit (in-process, `make test-fast`), tests/e2e (processes and torchrun, marked
slow), tests/gpu (CUDA). Code they share is in tests/helpers (see its __init__); fixtures several
modules use are here, built once per session.
"""

import os

import pytest
import torch
import torch.distributed as dist

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
_VISIBLE_DEVICES = os.environ.get("CUDA_VISIBLE_DEVICES")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (run by `make gpu-check`)")
    for item in items:
        # the marker, not `"gpu" in item.keywords`, which also holds for every test under tests/gpu/
        if item.get_closest_marker("gpu"):
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
    if request.node.get_closest_marker("gpu"):
        if _VISIBLE_DEVICES is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", _VISIBLE_DEVICES)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(tiny HF Llama dir, 40-record Sandbox file) shared by every run of the session: read, never written."""
    from fastalign.data import sample_data_path
    from fastalign.tiny import build_tiny_llama, sandbox_texts

    root = tmp_path_factory.mktemp("tiny")
    texts = sandbox_texts(sample_data_path())
    model = build_tiny_llama(root / "model", texts, vocab_size=512, hidden_size=64, num_layers=2,
                             num_heads=4, num_kv_heads=2, intermediate_size=128,
                             max_position_embeddings=256)
    data = root / "data.jsonl"
    lines = sample_data_path().read_text().splitlines()[:40]
    data.write_text("\n".join(lines) + "\n")
    return model, data


@pytest.fixture(scope="session")
def hf_tokenizer(tmp_path_factory):
    """A reloaded byte-level BPE tokenizer with BOS `<s>` and EOS `</s>`, no pad token."""
    from helpers.tokenizer import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture
def process_group():
    """A one-rank gloo group in this process (what `python -m fastalign.train` runs in)."""
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if created:
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The evaluation tests' tiny model directory (seed 1)."""
    from fastalign.data import sample_data_path
    from fastalign.tiny import build_tiny_llama, sandbox_texts

    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", sandbox_texts(sample_data_path()), seed=1,
                            vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                            intermediate_size=96, max_position_embeddings=256)


@pytest.fixture(scope="session")
def plan_tiny(tmp_path_factory):
    """(model dir, the bundled Sandbox file) for the planner: large enough that activations dominate."""
    from fastalign.data import sample_data_path
    from fastalign.tiny import build_tiny_llama, sandbox_texts

    root = tmp_path_factory.mktemp("plan-tiny")
    model = build_tiny_llama(root / "model", sandbox_texts(sample_data_path()), vocab_size=1024, hidden_size=128,
                             num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=344,
                             max_position_embeddings=512)
    return model, sample_data_path()


@pytest.fixture(scope="session")
def family_tiny(tmp_path_factory):
    """family -> tiny model dir built by `fastalign.tiny` with that family's tokenizer style."""
    from helpers.models import FAMILY_CLASSES

    from fastalign.data import sample_data_path
    from fastalign.tiny import build_tiny_llama, sandbox_texts

    root = tmp_path_factory.mktemp("families")
    texts = sandbox_texts(sample_data_path())
    return {family: build_tiny_llama(root / family, texts, vocab_size=400, hidden_size=32, num_layers=2,
                                     num_heads=4, num_kv_heads=2, intermediate_size=64, max_position_embeddings=128,
                                     family=family, tie_word_embeddings=family in ("mistral", "qwen3"))
            for family in FAMILY_CLASSES}
