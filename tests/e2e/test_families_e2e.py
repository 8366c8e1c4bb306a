"""Training each model family through the command line: steps, biases under FSDP, the sliding window
refusal. The trainer's main takes the flags in the test's process or forked ranks (helpers/training.py):
what the family trains to is the point, not the process."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from helpers.models import FAMILY_CLASSES
from helpers.training import common, metrics, ok, train_in_process, train_ranks
from safetensors.torch import load_file, save_file

from fastalign.data import sample_data_path

pytestmark = pytest.mark.slow


def assert_trained_as_family(start_dir, out, family: str, steps: int) -> None:
    """`out` logged `steps` finite losses and holds a model transformers loads as the family's
    class, with its attention weights (q/k norms, biases where the family has them) moved."""
    from transformers import AutoModelForCausalLM

    losses = [m["loss"] for m in metrics(out)]
    assert len(losses) == steps and all(torch.isfinite(torch.tensor(losses)))
    trained = AutoModelForCausalLM.from_pretrained(out)
    assert type(trained).__name__ == FAMILY_CLASSES[family]
    start = load_file(start_dir / "model.safetensors")
    moved = [name for name in start if name.endswith(("q_proj.weight", "k_norm.weight", "v_proj.bias"))]
    assert moved and all(not torch.equal(trained.state_dict()[name], start[name]) for name in moved)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mistral", "qwen3"])  # llama: tests/e2e/test_train.py; qwen2: under FSDP below
def test_training_steps_through_the_command_line(family_tiny, family, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(sample_data_path().read_text().splitlines()[:16]) + "\n")
    out = tmp_path / "out"
    layer = FAMILY_CLASSES[family].replace("ForCausalLM", "DecoderLayer")
    ok(train_in_process(common(family_tiny[family], data, out, max_steps=3, per_device_train_batch_size=2,
                               learning_rate=3e-3, fsdp_transformer_layer_cls_to_wrap=layer)))
    assert_trained_as_family(family_tiny[family], out, family, steps=3)


@pytest.mark.slow
def test_qwen2_trains_with_biases_read_row_sliced_under_fsdp_as_on_one_rank(family_tiny, tmp_path):
    """2 FSDP ranks each read their rows of every weight, biases included: same run as 1 rank."""
    model = tmp_path / "model"
    model.mkdir()
    for f in family_tiny["qwen2"].iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    weights = load_file(model / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    for name in weights:
        if name.endswith(".bias"):  # distinct rows, so a rank reading the wrong rows would show
            weights[name] = torch.randn(weights[name].shape, generator=generator)
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(sample_data_path().read_text().splitlines()[:8]) + "\n")
    # max_tokens_per_batch 0: the same 2-group micro-batches on both sides, so the weights agree to
    # 1e-6 (step-level packing regroups them: summation order, checked in test_train)
    flags = dict(max_steps=2, per_device_train_batch_size=2, fsdp="full_shard auto_wrap", max_tokens_per_batch=0)
    ok(train_in_process(common(model, data, tmp_path / "one", gradient_accumulation_steps=2, **flags)))
    ok(train_ranks(common(model, data, tmp_path / "two", gradient_accumulation_steps=1, **flags), nproc=2))
    assert_trained_as_family(model, tmp_path / "two", "qwen2", steps=2)
    for a, b in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for name in one:
        torch.testing.assert_close(one[name], two[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
def test_trainer_refuses_sequences_longer_than_the_sliding_window(family_tiny, tmp_path):
    config_file = family_tiny["mistral"] / "config.json"
    model = tmp_path / "model"
    model.mkdir()
    for f in family_tiny["mistral"].iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    (model / "config.json").write_text(json.dumps({**json.loads(config_file.read_text()), "sliding_window": 64}))
    data = tmp_path / "data.jsonl"
    data.write_text(sample_data_path().read_text().splitlines()[0] + "\n")
    result: subprocess.CompletedProcess = train_in_process(common(model, data, tmp_path / "out", max_steps=1,
                                                                  model_max_length=96))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: " in result.stderr and "sliding_window of 64" in result.stderr
