"""The trainer on CUDA (run by `make gpu-check`): bf16 FSDP2 mixed precision, Triton loss head,
packed attention, fused AdamW, deferred metrics reads, checkpoint and HF export."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.training import common, metrics, ok, run_train

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_bf16_training_on_one_gpu(tiny, tmp_path):
    model, data = tiny
    out = tmp_path / "out"
    result = ok(run_train(common(model, data, out, max_steps=8, per_device_train_batch_size=4,
                                 learning_rate=3e-3, bf16=True, save_strategy="steps", save_steps=4)))
    assert "loss backend: triton" in result.stderr and "nccl on cuda" in result.stderr
    lines = metrics(out)
    assert [m["step"] for m in lines] == list(range(1, 9))  # every deferred line arrives
    assert all(m["mfu"] is None or 0 < m["mfu"] < 1 for m in lines)
    assert all(m["peak_mem_gb"] > 0 for m in lines)
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())["step"] == 8

    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.isfinite(hf(torch.tensor([[1, 5, 9, 12]])).logits).all()
