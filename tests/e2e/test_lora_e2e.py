"""LoRA through fastalign.train's command line (docs/lora.md): only adapters change, PEFT and the merge
agree with fastalign's logits, exact resume, 2 ranks equal 1, families, compile and checkpointing.

One-process runs are `fastalign.train.main` in the test's process and several ranks are forked from
it (helpers/training.py): these tests check what the runs write, not the launcher, whose own
behaviour the trainer's process tests cover. The merge and the LoRA benchmark stay real processes,
the one test of each command as a process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.training import REPO, ok, train_in_process, train_ranks
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def train(args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    """A run that must succeed: in this process, or `nproc` forked ranks (subprocesses with CUDA)."""
    return ok(train_in_process(args) if nproc == 1 else train_ranks(args, nproc=nproc))


def lora_args(model: Path, data: Path, out: Path, **flags) -> list[str]:
    args = {"model_name_or_path": model, "data_path": data, "output_dir": out, "model_max_length": 128,
            "learning_rate": 1e-2, "logging_steps": 1, "lr_scheduler_type": "constant", "save_strategy": "no",
            "max_steps": 4, "use_peft": True,
            "lora_r": 4, "lora_dropout": 0.0, "disable_tqdm": True}
    args.update(flags)
    return [x for k, v in args.items() for x in (f"--{k}", *(v if isinstance(v, list) else [str(v)]))]


def peft_logits(model_dir: Path, adapter_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    import peft
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(base, adapter_dir).eval()(ids[None]).logits[0]


def fastalign_logits(adapter_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from fastalign.peft_io import load_adapted

    llama = load_adapted(adapter_dir, attn_implementation="sdpa")
    cu = torch.tensor([0, len(ids)], dtype=torch.int32)
    return llama(ids, torch.arange(len(ids)), cu, len(ids)) @ llama.lm_head.weight.T


def assert_same_adapters(a_dir: Path, b_dir: Path, atol: float = 0.0) -> None:
    """Bit-identical with atol 0 (an exact resume), else within atol."""
    a, b = load_file(a_dir / "adapter_model.safetensors"), load_file(b_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        if atol == 0.0:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


@pytest.mark.slow
def test_only_adapters_change_and_peft_loads_them_with_fastaligns_logits(tiny, tmp_path):
    pytest.importorskip("peft")
    model, data = tiny
    out = tmp_path / "out"
    base_files = {p.name: p.read_bytes() for p in model.iterdir()}
    train(lora_args(model, data, out, lora_target_modules="all-linear", lora_modules_to_save="lm_head"))
    assert {p.name: p.read_bytes() for p in model.iterdir()} == base_files  # the base is bit-identical
    saved = load_file(out / "adapter_model.safetensors")
    assert {k for k in saved if ".lora_" not in k} == {"base_model.model.lm_head.weight"}  # adapters + the head
    assert len([k for k in saved if ".lora_A." in k]) == 2 * 7  # every projection of both layers
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(model) and config["peft_type"] == "LORA"
    assert not (out / "model.safetensors").exists()
    ids = torch.arange(1, 40)
    ours, theirs = fastalign_logits(out, ids), peft_logits(model, out, ids)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    from transformers import AutoModelForCausalLM

    base_logits = AutoModelForCausalLM.from_pretrained(model).eval()(ids[None]).logits[0]
    assert (ours - base_logits).abs().max() > 1e-3  # the adapters moved the model
    merged = tmp_path / "merged"
    subprocess.run([sys.executable, "-m", "fastalign.merge", str(out), str(merged)], check=True, cwd=REPO,
                   env=dict(os.environ, PYTHONPATH=str(REPO)))
    merged_logits = AutoModelForCausalLM.from_pretrained(merged).eval()(ids[None]).logits[0]
    torch.testing.assert_close(merged_logits, theirs, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def stopped_run(tiny, tmp_path_factory):
    """(model, data, a 4-step run, the same run stopped after step 3 with a checkpoint after each
    step): dropout on, so that an exact resume must also restore the random state. The resume
    tests each resume a copy of the stopped run."""
    model, data = tiny
    root = tmp_path_factory.mktemp("lora-resume")
    full, part = root / "full", root / "part"
    train(lora_args(model, data, full, lora_dropout=0.1))
    train(lora_args(model, data, part, lora_dropout=0.1, save_strategy="steps", save_steps=1, max_steps=3))
    return model, data, full, part


@pytest.mark.slow
def test_checkpoints_hold_adapters_only_and_resume_is_exact(stopped_run, tmp_path):
    model, data, full, stopped = stopped_run
    part = tmp_path / "part"
    shutil.copytree(stopped, part)
    from torch.distributed.checkpoint import FileSystemReader

    for step in (1, 2, 3):
        saved = FileSystemReader(str(part / f"checkpoint-{step}")).read_metadata().state_dict_metadata
        model_keys = {k for k in saved if k.startswith("model.")}
        assert model_keys and all(".lora_" in k for k in model_keys), step  # no base weight in the checkpoint
    result = train(lora_args(model, data, part, lora_dropout=0.1, resume_from_checkpoint="auto"))
    assert "resumed from" in result.stderr and "checkpoint-3 at step 3" in result.stderr
    assert_same_adapters(full, part)


@pytest.mark.slow
def test_a_damaged_newest_lora_checkpoint_falls_back_to_the_previous_one(stopped_run, tmp_path):
    model, data, full, stopped = stopped_run
    part = tmp_path / "part"
    shutil.copytree(stopped, part)
    shard = next((part / "checkpoint-3").glob("*.distcp"))
    damaged = bytearray(shard.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # one flipped bit in an adapter's bytes: the manifest catches it
    shard.write_bytes(bytes(damaged))
    result = train(lora_args(model, data, part, lora_dropout=0.1, save_strategy="steps", save_steps=1,
                             resume_from_checkpoint="auto"))
    assert "checkpoint-3" in result.stderr and "resumed from" in result.stderr and "checkpoint-2" in result.stderr
    assert_same_adapters(full, part)


@pytest.mark.slow
def test_two_rank_fsdp_adapters_equal_one_rank(tiny, tmp_path):
    model, data = tiny
    one, two = tmp_path / "one", tmp_path / "two"
    flags = dict(per_device_train_batch_size=2, gradient_checkpointing=True)
    train(lora_args(model, data, one, gradient_accumulation_steps=2, **flags))
    train(lora_args(model, data, two, **flags), nproc=2)  # FSDP2: frozen and trainable in one unit
    assert_same_adapters(one, two, atol=1e-5)


@pytest.mark.slow
def test_bf16_fsdp_keeps_fp32_adapters_over_a_bf16_base(tiny, tmp_path):
    model, data = tiny
    out = tmp_path / "out"
    result = train(lora_args(model, data, out, bf16=True, lora_modules_to_save="lm_head"), nproc=2)
    assert "frozen base in bf16" in result.stderr
    adapter = load_file(out / "adapter_model.safetensors")
    assert {t.dtype for t in adapter.values()} == {torch.float32}  # fp32 master adapters under --bf16
    assert "base_model.model.lm_head.weight" in adapter


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_each_family_trains_with_adapters_that_peft_loads(tmp_path, family):
    pytest.importorskip("peft")
    from fastalign.data import sample_data_path
    from fastalign.tiny import build_tiny_llama, sandbox_texts

    model = build_tiny_llama(tmp_path / "model", sandbox_texts(sample_data_path()), vocab_size=256, hidden_size=32,
                             num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=64,
                             max_position_embeddings=256, family=family)
    out = tmp_path / "out"
    train(lora_args(model, sample_data_path(), out, lora_target_modules="all-linear", max_steps=2))
    ids = torch.arange(1, 20)
    torch.testing.assert_close(fastalign_logits(out, ids), peft_logits(model, out, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_demo_trains_adapters_and_evaluates_the_adapter_directory(tmp_path, monkeypatch):
    from fastalign import demo
    from fastalign.cli import run_main

    # The demo's training command runs as fastalign.train.main in this process (its command line
    # is the demo's, unchanged); tests/e2e/test_demo.py runs the demo and its training as processes.
    real_run = subprocess.run
    trained = []

    def run(command, *args, **kwargs):
        if list(command[:3]) != [sys.executable, "-m", "fastalign.train"]:
            return real_run(command, *args, **kwargs)
        trained.append(command)
        result = train_in_process(command[3:])
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
        return result

    monkeypatch.setattr(demo.subprocess, "run", run)
    assert run_main(demo.main, ["--quick", "--use_peft", "--output_dir", str(tmp_path)]) == 0
    assert len(trained) == 1
    results = json.loads((tmp_path / "demo_results.json").read_text())
    assert "--use_peft" in results["settings"]["train_command"]
    assert (tmp_path / "trained" / "adapter_config.json").is_file()
    assert results["after"]["mean_loglik"] != results["before"]["mean_loglik"]  # the adapter was evaluated


@pytest.mark.slow
def test_compile_and_activation_checkpointing_train_the_same_adapters(tiny, tmp_path):
    model, data = tiny
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    train(lora_args(model, data, eager, max_steps=2))
    # A forked rank: what torch.compile caches stays out of the test's process.
    ok(train_ranks(lora_args(model, data, compiled, max_steps=2, compile=True, gradient_checkpointing=True), 1))
    assert_same_adapters(eager, compiled, atol=1e-5)


@pytest.mark.slow
def test_the_lora_benchmark_measures_both_sides_from_the_same_first_loss(tmp_path):
    # the script as a process: the one test of `python benchmarks/lora.py` itself
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "benchmarks/lora.py", "--preset", "cpu-smoke", "--steps", "2",
                             "--work_dir", str(tmp_path / "work"), "--out_dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(next(tmp_path.glob("lora-*-cpu-smoke.json")).read_text())
    assert report["sides"]["full"]["first_loss"] == report["sides"]["lora"]["first_loss"]
    assert report["sides"]["lora"]["peak_mem_gb"] > 0 and report["ratios"]["tokens_per_s"] > 0
