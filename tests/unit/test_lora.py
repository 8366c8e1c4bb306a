"""LoRA in-process (fastalign.lora, fastalign.peft_io, fastalign.merge; docs/lora.md): flags, layers,
the frozen head, the PEFT layout, evaluate/generate on an adapter directory, the planner's verdicts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastalign.config import parse_args
from fastalign.errors import ConfigError
from fastalign.lora import LoraLinear, LoraSettings, init_adapters, inject_adapters


def settings(**overrides) -> LoraSettings:
    values = dict(r=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj"), modules_to_save=(),
                  use_rslora=False)
    values.update(overrides)
    return LoraSettings(**values)


def base_args(tmp_path: Path, *flags: str) -> list[str]:
    return ["--model_name_or_path", str(tmp_path / "m"), "--data_path", "d.jsonl", "--output_dir",
            str(tmp_path / "o"), *flags]


# -- in-process --------------------------------------------------------------------------------


def test_trl_flags_parse_with_trls_defaults(tmp_path):
    config = parse_args(base_args(tmp_path, "--use_peft"))
    assert (config.use_peft, config.lora_r, config.lora_alpha, config.lora_dropout) == (True, 16, 32.0, 0.05)
    config = parse_args(base_args(tmp_path, "--use_peft", "--lora_target_modules", "q_proj", "v_proj",
                                  "--lora_modules_to_save", "lm_head", "--use_rslora"))
    assert config.lora_target_modules == ["q_proj", "v_proj"] and config.lora_modules_to_save == ["lm_head"]
    assert LoraSettings.from_config(config).scaling == pytest.approx(32 / 4)  # alpha / sqrt(16)


@pytest.mark.parametrize("flag", ["--load_in_4bit", "--load_in_8bit"])
def test_quantized_bases_are_refused_naming_the_flag(tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(base_args(tmp_path, "--use_peft", flag))
    assert exit_info.value.code == 2
    assert f"argument {flag}: quantized base models are not supported" in capsys.readouterr().err


def tiny_llama(**config_overrides):
    from fastalign.hf_config import LlamaConfig
    from fastalign.model import Llama

    values = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    values.update(config_overrides)
    llama = Llama(LlamaConfig(**values))
    llama.init_weights(torch.Generator().manual_seed(0))
    return llama


def test_a_target_that_matches_nothing_names_the_modules_that_exist():
    with pytest.raises(ConfigError, match="'qproj' matches no module.*q_proj, up_proj, v_proj"):
        inject_adapters(tiny_llama(), settings(target_modules=("qproj",)))


def test_adapters_start_as_the_base_and_only_they_train():
    llama = tiny_llama()
    x = torch.randn(5, 32)
    before = x @ llama.layers[0].self_attn.q_proj.weight.detach().to(torch.bfloat16).float().T
    inject_adapters(llama, settings(), base_dtype=torch.bfloat16)
    init_adapters(llama, seed=1)
    q_proj = llama.layers[0].self_attn.q_proj
    assert isinstance(q_proj, LoraLinear) and not isinstance(llama.layers[0].self_attn.k_proj, LoraLinear)
    trainable = {n for n, p in llama.named_parameters() if p.requires_grad}
    assert trainable == {f"layers.{i}.self_attn.{m}.lora_{ab}.weight" for i in range(2) for m in ("q_proj", "v_proj")
                         for ab in "AB"}
    frozen_dtypes = {p.dtype for p in llama.parameters() if not p.requires_grad}
    assert frozen_dtypes == {torch.bfloat16}  # no fp32 copy of the base
    assert q_proj.lora_A.weight.dtype == torch.float32 and q_proj.lora_A.weight.abs().sum() > 0
    torch.testing.assert_close(q_proj.to(torch.float32)(x), before, rtol=0, atol=0)  # B = 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_frozen_lm_head_gets_no_gradient_and_the_same_hidden_gradient(backend, monkeypatch):
    from fastalign.kernels import alignment_head, alignment_head_torch
    from fastalign.loss import stable_alignment_loss

    if backend == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    impl = alignment_head if backend == "triton" else alignment_head_torch
    weight_grads = []
    real_head_grads = impl.head_grads
    monkeypatch.setattr(impl, "head_grads", lambda *args, **kwargs: weight_grads.append(
        kwargs.get("weight_grad", True)) or real_head_grads(*args, **kwargs))
    generator = torch.Generator().manual_seed(0)
    hidden_values, weight_values = torch.randn(6, 8, generator=generator), torch.randn(16, 8, generator=generator)
    grads = []
    for frozen in (False, True):
        hidden = hidden_values.clone().requires_grad_(True)
        weight = weight_values.clone().requires_grad_(not frozen)
        out = stable_alignment_loss(hidden, weight, torch.tensor([1, 2, -100, 3, 4, -100]),
                                    torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([7.0, 2.0]), torch.tensor([0, 0]),
                                    rating_scale=7.0, margin=1.0, ratio=0.5, max_flow=False, margin_mode="paper",
                                    backend=backend)
        out.loss.backward()
        grads.append(hidden.grad)
        assert (weight.grad is None) == frozen
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    assert weight_grads == [True, False]  # the frozen head's [V, H] gradient is never computed


def test_peft_keys_are_peft_own_keys():
    peft = pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastalign.peft_io import peft_key

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    model = peft.get_peft_model(LlamaForCausalLM(config), peft.LoraConfig(
        r=4, target_modules=["q_proj", "down_proj"], modules_to_save=["lm_head"], task_type="CAUSAL_LM"))
    theirs = set(peft.get_peft_model_state_dict(model))
    llama = tiny_llama(num_hidden_layers=1)
    inject_adapters(llama, settings(target_modules=("q_proj", "down_proj"), modules_to_save=("lm_head",)))
    ours = {peft_key(n) for n, p in llama.named_parameters() if p.requires_grad}
    assert ours == theirs


def write_random_adapter(model_dir: Path, out: Path) -> Path:
    """A PEFT adapter over `model_dir` with nonzero random A and B (as training would leave it)."""
    from safetensors.torch import save_file

    from fastalign.model import Llama
    from fastalign.peft_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_config, peft_key

    lora = settings(target_modules=("q_proj", "down_proj"))
    llama = Llama.from_pretrained(model_dir)
    inject_adapters(llama, lora)
    generator = torch.Generator().manual_seed(3)
    tensors = {peft_key(name): torch.randn(p.shape, generator=generator) * 0.2
               for name, p in llama.named_parameters() if p.requires_grad}
    out.mkdir()
    save_file(tensors, str(out / ADAPTER_WEIGHTS))
    (out / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(lora, str(model_dir), ["down_proj", "q_proj"])))
    return out


def test_evaluate_and_generate_take_an_adapter_directory_as_the_merged_model(tiny, tmp_path, capsys):
    from fastalign import evaluate, generate, merge
    from fastalign.cli import run_main

    model, data = tiny
    adapter = write_random_adapter(model, tmp_path / "adapter")
    merged = tmp_path / "merged"
    assert run_main(merge.main, [str(adapter), str(merged)]) == 0
    reports = []
    for directory in (adapter, merged, model):
        out = tmp_path / f"{directory.name}.json"
        assert run_main(evaluate.main, ["--model_name_or_path", str(directory), "--data_path", str(data),
                                        "--output_json", str(out), "--model_max_length", "64"]) == 0
        reports.append(json.loads(out.read_text()))
    adapted, merged_model, base = (report["metrics"]["mean_loglik"] for report in reports)
    assert adapted == pytest.approx(merged_model, rel=1e-5)
    assert adapted != pytest.approx(base, rel=1e-3)  # the adapter counts
    capsys.readouterr()
    texts = []
    for directory in (adapter, merged):
        assert run_main(generate.main, ["--model_name_or_path", str(directory), "--prompt", "Hello there",
                                        "--max_new_tokens", "8"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1]


def test_merge_refuses_a_directory_without_an_adapter(tiny, tmp_path, capsys):
    from fastalign import merge
    from fastalign.cli import run_main

    assert run_main(merge.main, [str(tiny[0]), str(tmp_path / "merged")]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err and not (tmp_path / "merged").exists()


def test_a_checkpoint_resumes_only_in_its_own_mode():
    from fastalign.lora import check_resume_mode

    check_resume_mode({"use_peft": True}, True, "ckpt")
    with pytest.raises(ConfigError, match="ckpt: the checkpoint is from LoRA adapters.*--use_peft True"):
        check_resume_mode({"use_peft": True}, False, "ckpt")
    with pytest.raises(ConfigError, match="from a full fine-tuning run"):
        check_resume_mode({}, True, "ckpt")


def test_export_writes_the_trainable_tensors_and_a_failed_write_leaves_no_config(process_group, tmp_path):
    from fastalign.errors import FastalignError
    from fastalign.peft_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, export_adapter

    llama = tiny_llama()
    lora = settings(target_modules=("all-linear",))
    inject_adapters(llama, lora)
    init_adapters(llama, seed=0)
    export_adapter(llama, lora, tmp_path / "ok", "base")
    config = json.loads((tmp_path / "ok" / ADAPTER_CONFIG).read_text())
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert len(load_file(tmp_path / "ok" / ADAPTER_WEIGHTS)) == 2 * 7 * 2  # A and B of 7 projections x 2 layers
    (tmp_path / "bad" / ADAPTER_WEIGHTS).mkdir(parents=True)  # the weights cannot be written there
    with pytest.raises(FastalignError, match="bad"):
        export_adapter(llama, lora, tmp_path / "bad", "base")
    assert not (tmp_path / "bad" / ADAPTER_CONFIG).exists()


def llama3_8b_config(path: Path) -> Path:
    """Llama-3-8B's shape (config.json only: the planner reads no weights)."""
    path.write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "vocab_size": 128256, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 128000, "eos_token_id": 128001}))
    return path


@pytest.mark.parametrize("use_peft, status", [(True, 0), (False, 3)])
def test_planner_fits_8b_on_one_24gb_gpu_with_lora_only(tmp_path, capsys, use_peft, status):
    from fastalign.plan.planner import main

    seed_flags = ["--bf16", "True", "--fsdp", "full_shard auto_wrap", "--model_max_length", "480",
                  "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "8", "--num_comp", "3"]
    argv = ["--config", str(llama3_8b_config(tmp_path / "config.json")), "--gpu", "RTX4090",
            "--gradient_checkpointing", "True", *seed_flags, "--use_peft", str(use_peft)]
    assert main(argv) == status
    report = capsys.readouterr().out
    assert ("LoRA adapters over a frozen base" in report) == use_peft


def test_planner_refuses_quantized_bases(tmp_path, capsys):
    from fastalign.plan.planner import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(llama3_8b_config(tmp_path / "config.json")), "--gpu", "L4", "--load_in_4bit"])
    assert exit_info.value.code == 2 and "--load_in_4bit" in capsys.readouterr().err
