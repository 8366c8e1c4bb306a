"""fastalign.model against transformers' LlamaForCausalLM (CPU, fp32, tiny random configs)."""

import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers.models import TOL, hf_logits_per_sequence, our_logits, packed_batch
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from fastalign.attention import resolve_backend, varlen_attention
from fastalign.errors import ConfigError, ModelError
from fastalign.hf_config import LlamaConfig
from fastalign.hf_weights import CheckpointReader
from fastalign.model import Llama

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
CONFIGS = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa_odd_vocab": dict(num_attention_heads=4, num_key_value_heads=2, vocab_size=97),
    "mqa_llama3_rope": dict(num_attention_heads=4, num_key_value_heads=1, rope_theta=500000.0,
                            rope_scaling=LLAMA3_ROPE),
    "tied_head_dim": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=12, tie_word_embeddings=True),
    "linear_rope": dict(num_attention_heads=2, rope_scaling={"rope_type": "linear", "factor": 2.0}),
}
LENGTHS = [7, 1, 12, 5]


def hf_model(name: str, seed: int = 0) -> LlamaForCausalLM:
    kwargs = dict(vocab_size=61, hidden_size=32, intermediate_size=44, num_hidden_layers=2,
                  max_position_embeddings=64, rms_norm_eps=1e-5)
    kwargs.update(CONFIGS[name])
    torch.manual_seed(seed)
    model = LlamaForCausalLM(HFLlamaConfig(**kwargs)).eval()
    with torch.no_grad():
        # transformers' init (std 0.02) leaves attention almost uniform, blind to RoPE errors:
        # larger weights make attention sharp; random norm weights expose a missed norm.
        for p_name, p in model.named_parameters():
            if "norm" in p_name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.3)
    return model


def from_hf(hf: LlamaForCausalLM, tmp_path) -> Llama:
    hf.save_pretrained(tmp_path / "hf")
    return Llama.from_pretrained(tmp_path / "hf").eval()


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(name, tmp_path):
    hf = hf_model(name)
    ours = from_hf(hf, tmp_path)
    batch = packed_batch(LENGTHS, hf.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(our_logits(ours, batch), hf_logits_per_sequence(hf, batch), **TOL)


def test_packed_equals_each_sequence_alone(tmp_path):
    ours = from_hf(hf_model("gqa_odd_vocab"), tmp_path)
    batch = packed_batch(LENGTHS, 97)
    input_ids, position_ids, cu_seqlens, _ = batch
    bounds = cu_seqlens.tolist()
    with torch.no_grad():
        packed = ours(*batch)
        alone = [ours(input_ids[a:b], position_ids[a:b], torch.tensor([0, b - a], dtype=torch.int32), b - a)
                 for a, b in zip(bounds[:-1], bounds[1:])]
    torch.testing.assert_close(packed, torch.cat(alone), **TOL)


def test_tokens_never_see_other_sequences(tmp_path):
    """Changing one sequence's tokens leaves every other sequence's hidden states untouched."""
    ours = from_hf(hf_model("mha"), tmp_path)
    input_ids, position_ids, cu_seqlens, max_seqlen = packed_batch(LENGTHS, 61)
    changed = input_ids.clone()
    changed[7:8] = (changed[7:8] + 1) % 61  # the 1-token sequence
    with torch.no_grad():
        a = ours(input_ids, position_ids, cu_seqlens, max_seqlen)
        b = ours(changed, position_ids, cu_seqlens, max_seqlen)
    assert not torch.allclose(a[7], b[7])
    torch.testing.assert_close(a[:7], b[:7], atol=0, rtol=0)
    torch.testing.assert_close(a[8:], b[8:], atol=0, rtol=0)


def write_legacy_bin(hf: LlamaForCausalLM, directory, shards: int):
    """A checkpoint as old conversions wrote it: torch.save'd state dict(s), rotary buffers included."""
    directory.mkdir()
    state = dict(hf.state_dict())
    for i in range(hf.config.num_hidden_layers):  # early LLaMA conversions stored these buffers
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    if hf.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    names = list(state)
    if shards == 1:
        torch.save(state, directory / "pytorch_model.bin")
    else:
        weight_map = {}
        for i in range(shards):
            file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
            part = names[i::shards]
            torch.save({n: state[n] for n in part}, directory / file)
            weight_map.update(dict.fromkeys(part, file))
        (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    hf.config.save_pretrained(directory)


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin", "sharded_bin"])
def test_loads_every_hf_layout(layout, tmp_path):
    hf = hf_model("tied_head_dim" if layout == "sharded" else "gqa_odd_vocab")
    directory = tmp_path / layout
    if layout in ("safetensors", "sharded"):
        hf.save_pretrained(directory, max_shard_size="8KB" if layout == "sharded" else "1GB")
        assert (directory / "model.safetensors.index.json").exists() == (layout == "sharded")
    else:
        write_legacy_bin(hf, directory, shards=3 if layout == "sharded_bin" else 1)
    ours = Llama.from_pretrained(directory)
    batch = packed_batch(LENGTHS, hf.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(our_logits(ours, batch), hf_logits_per_sequence(hf, batch), **TOL)


def rewrite_config(directory, edit):
    config = json.loads((directory / "config.json").read_text())
    edit(config)
    (directory / "config.json").write_text(json.dumps(config))


def to_old_keys(config):
    """transformers 4 style: rope_theta and rope_scaling ({"type": ...}) instead of rope_parameters."""
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    rope_type = rope.pop("rope_type")
    config["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **rope}


@pytest.mark.parametrize("name", ["mqa_llama3_rope", "linear_rope", "mha"])
def test_old_style_config_keys(name, tmp_path):
    hf = hf_model(name)
    hf.save_pretrained(tmp_path / "m")
    rewrite_config(tmp_path / "m", to_old_keys)
    ours = Llama.from_pretrained(tmp_path / "m")
    batch = packed_batch(LENGTHS, hf.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(our_logits(ours, batch), hf_logits_per_sequence(hf, batch), **TOL)


def test_original_llama_config_without_rope_keys():
    """LLaMA 1 conversions carry neither rope_theta nor rope_scaling: plain RoPE, theta 10000."""
    config = LlamaConfig.from_hf_dict({"architectures": ["LLaMAForCausalLM"], "hidden_size": 64,
                                       "intermediate_size": 100, "num_attention_heads": 4,
                                       "num_hidden_layers": 2, "vocab_size": 50, "pad_token_id": -1})
    assert (config.rope_theta, config.rope_scaling, config.head_dim, config.num_key_value_heads) == (
        10000.0, None, 16, 4
    )


def test_save_is_loaded_by_transformers(tmp_path):
    ours = from_hf(hf_model("mqa_llama3_rope"), tmp_path)
    source = tmp_path / "hf"
    (source / "tokenizer_config.json").write_text("{}")
    (source / "tokenizer.model").write_bytes(b"sp")
    ours.save_pretrained(tmp_path / "out")
    files = sorted(os.listdir(tmp_path / "out"))
    assert files == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.model",
                     "tokenizer_config.json"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert reloaded.config.rope_parameters == hf_model("mqa_llama3_rope").config.rope_parameters
    batch = packed_batch(LENGTHS, 61)
    with torch.no_grad():
        torch.testing.assert_close(hf_logits_per_sequence(reloaded, batch), our_logits(ours, batch), **TOL)


def test_sharded_tied_bf16_save_is_loaded_by_transformers(tmp_path):
    ours = from_hf(hf_model("tied_head_dim"), tmp_path)
    state = {k: v.to(torch.bfloat16) for k, v in ours.state_dict().items()}  # as a trainer passes it
    ours.save_pretrained(tmp_path / "out", state_dict=state, max_shard_size=10_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and "lm_head.weight" not in index["weight_map"]
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ours_bf16 = Llama.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    batch = packed_batch(LENGTHS, 61)
    with torch.no_grad():
        torch.testing.assert_close(hf_logits_per_sequence(reloaded, batch), our_logits(ours_bf16, batch), **TOL)


def test_save_into_existing_dir_replaces_weights_only(tmp_path):
    ours = from_hf(hf_model("mha"), tmp_path)
    out = tmp_path / "out"
    ours.save_pretrained(out, max_shard_size=5_000)
    (out / "metrics.jsonl").write_text("{}\n")
    ours.save_pretrained(out)
    files = sorted(f for f in os.listdir(out))
    assert files == ["config.json", "generation_config.json", "metrics.jsonl", "model.safetensors"]


def test_gradients_reach_every_parameter(tmp_path):
    for name in ("gqa_odd_vocab", "tied_head_dim"):
        ours = from_hf(hf_model(name), tmp_path / name)
        batch = packed_batch(LENGTHS, ours.config.vocab_size)
        our_logits(ours, batch).logsumexp(-1).sum().backward()
        for p_name, p in ours.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, p_name


def test_meta_load_in_bf16_keeps_ties_and_fp32_rotary(tmp_path):
    hf = hf_model("tied_head_dim")
    hf.save_pretrained(tmp_path / "m")
    ours = Llama.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert ours.lm_head.weight is ours.embed_tokens.weight
    assert ours.inv_freq.dtype == torch.float32
    torch.testing.assert_close(ours.embed_tokens.weight, hf.model.embed_tokens.weight.to(torch.bfloat16))
    assert ours.num_parameters() == hf.num_parameters() == ours.config.num_parameters()
    reference = ours.inv_freq.clone()
    ours.to(torch.float16)  # a later cast keeps the frequencies fp32 and the weights tied
    assert ours.inv_freq.dtype == torch.float32 and torch.equal(ours.inv_freq, reference)
    assert ours.lm_head.weight is ours.embed_tokens.weight


def test_reader_reads_row_ranges_in_any_dtype(tmp_path):
    hf = hf_model("gqa_odd_vocab")
    hf.save_pretrained(tmp_path / "st")
    write_legacy_bin(hf, tmp_path / "bin", shards=2)
    full = hf.model.embed_tokens.weight.detach()
    for directory in ("st", "bin"):
        reader = CheckpointReader(tmp_path / directory)
        assert "layers.0.self_attn.rotary_emb.inv_freq" not in reader.names()
        assert reader.shape("embed_tokens.weight") == full.shape
        torch.testing.assert_close(reader.read("embed_tokens.weight", rows=slice(10, 33)), full[10:33], atol=0, rtol=0)
        part = reader.read("embed_tokens.weight", torch.bfloat16, rows=slice(90, 120))
        assert part.dtype == torch.bfloat16 and part.shape == (7, 32)
        for _ in range(2):  # a second read sees the same data (.bin pages were released after the first)
            torch.testing.assert_close(reader.read("embed_tokens.weight"), full, atol=0, rtol=0)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(mlp_bias=True), "mlp_bias=true is not supported"),
    (lambda c: c.update(model_type="gemma"), "model_type 'gemma' is not supported"),
    (lambda c: c.update(model_type="mistral"),
     "architectures ['LlamaForCausalLM'] are not supported for model_type 'mistral'"),
    (lambda c: c.update(num_local_experts=8, num_experts_per_tok=2),
     "mixture-of-experts models are not supported (num_local_experts=8"),
    (lambda c: c.update(architectures=["LlamaForSequenceClassification"]), "LlamaForSequenceClassification"),
    (lambda c: c.update(hidden_act="gelu"), "hidden_act 'gelu'"),
    (lambda c: c.update(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), "RoPE type 'yarn'"),
    (lambda c: c.update(num_key_value_heads=3), "multiple of num_key_value_heads"),
])
def test_unsupported_configs_are_refused(edit, message, tmp_path):
    hf_model("mha").save_pretrained(tmp_path / "m")
    rewrite_config(tmp_path / "m", edit)
    with pytest.raises(ModelError, match="config.json: .*" + message.replace("(", r"\(").replace("[", r"\[")):
        Llama.from_pretrained(tmp_path / "m")


def test_missing_unknown_and_misshaped_weights_are_named(tmp_path):
    hf = hf_model("mha")
    state = dict(hf.state_dict())
    state.pop("model.layers.1.mlp.up_proj.weight")
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    state["model.norm.weight"] = torch.ones(31)
    (tmp_path / "m").mkdir()
    torch.save(state, tmp_path / "m" / "pytorch_model.bin")
    hf.config.save_pretrained(tmp_path / "m")
    with pytest.raises(ModelError) as err:
        Llama.from_pretrained(tmp_path / "m")
    assert "missing weights: model.layers.1.mlp.up_proj.weight" in str(err.value)
    assert "unknown weights: model.layers.0.self_attn.q_proj.bias" in str(err.value)
    assert "wrong shapes: model.norm.weight [31] (config needs [32])" in str(err.value)


class _Payload:
    """Unpickling this creates a directory: what a malicious pytorch_model.bin would do with os.system."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_weight_file_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    hf = hf_model("mha")
    state = dict(hf.state_dict())
    marker = tmp_path / "pwned"
    state["model.norm.weight"] = _Payload(marker)  # a model dir downloaded from anywhere
    (tmp_path / "m").mkdir()
    torch.save(state, tmp_path / "m" / "pytorch_model.bin")
    hf.config.save_pretrained(tmp_path / "m")
    with pytest.raises(ModelError) as err:
        Llama.from_pretrained(tmp_path / "m")
    assert not marker.exists(), "a weight file ran code"
    assert "pytorch_model.bin" in str(err.value) and "weights_only=True" in str(err.value)


def test_no_weights_is_a_clear_error(tmp_path):
    hf_model("mha").config.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="no weights found"):
        Llama.from_pretrained(tmp_path)


def test_attention_backend_choice():
    assert resolve_backend("auto", "cpu", torch.float32) == "sdpa"
    with pytest.raises(ConfigError, match="--attn_implementation flash_attn: not available here: needs a CUDA"):
        resolve_backend("flash_attn", "cpu", torch.bfloat16)
    with pytest.raises(ConfigError, match="unknown value 'fast'"):
        resolve_backend("fast", "cpu", torch.float32)


def test_broken_flash_attn_wheel_falls_back_with_the_reason(tmp_path, monkeypatch, caplog):
    # A flash-attn built against another torch: importlib finds it, importing it fails. "auto"
    # must skip it (logging why, once) and naming it must be a clear error, not a crash at the
    # first forward.
    from fastalign import attention

    package = tmp_path / "flash_attn"
    package.mkdir()
    (package / "__init__.py").write_text(
        'raise ImportError("flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEi")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    attention.flash_attn_status.cache_clear()
    try:
        with caplog.at_level("WARNING", logger=attention.__name__):
            chosen = resolve_backend("auto", "cuda", torch.bfloat16, 64)
            assert chosen in ("torch_varlen", "sdpa")
            with pytest.raises(ConfigError, match=r"flash_attn: not available here: flash-attn is "
                                                  r"installed but fails to import \(ImportError: "
                                                  r"flash_attn_2_cuda.so: undefined symbol"):
                resolve_backend("flash_attn", "cuda", torch.bfloat16, 64)
        warnings = [r.getMessage() for r in caplog.records if "flash-attn" in r.getMessage()]
        assert len(warnings) == 1 and "undefined symbol" in warnings[0]  # cached: logged once
    finally:
        attention.flash_attn_status.cache_clear()


def test_flops_per_token_counts_matmuls_and_causal_attention():
    config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128  # q, o; k, v; gate, up, down
    matmul_params = 2 * per_layer + 100 * 64  # + lm_head (norm weights are negligible but counted)
    flops = config.flops_per_token(256)
    assert flops == 6 * (matmul_params + 2 * 2 * 64 + 64) + 6 * 2 * 4 * 16 * 256


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_sdpa_fallback_matches_a_block_causal_mask_forward_and_backward(kv_heads):
    # oracle: one SDPA over the whole pack with a [T, T] mask (same sequence and not in the future)
    lengths, heads, dim = [5, 1, 9, 3], 4, 8
    t = sum(lengths)
    cu_seqlens = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    sequence = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    mask = (sequence[:, None] == sequence[None, :]) & torch.ones(t, t, dtype=torch.bool).tril()
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(t, h, dim, generator=generator, requires_grad=True) for h in (heads, kv_heads, kv_heads))
    grad_out = torch.randn(t, heads, dim, generator=generator)

    out = varlen_attention(q, k, v, cu_seqlens, max(lengths), "sdpa")
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    expected = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                              attn_mask=mask, enable_gqa=kv_heads != heads).transpose(0, 1)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad_out)
    torch.testing.assert_close(out, expected, **TOL)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, **TOL)
