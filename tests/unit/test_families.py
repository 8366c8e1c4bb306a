"""Llama, Mistral, Qwen2 and Qwen3 checkpoints made by transformers' own classes run through the
same packed layers: logits, round trip, sliding windows, generation, tokenization and training."""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers.models import (
    FAMILY_CLASSES,
    TOL,
    assert_layouts_equal,
    hf_logits_per_sequence,
    our_logits,
    packed_batch,
    synthetic_groups,
)

from fastalign.data import Record, tokenize_records
from fastalign.errors import ModelError
from fastalign.generate import generate_ids, prompt_ids
from fastalign.model import Llama
from fastalign.model_dir import load_tokenizer

# (model_type, config keys): GQA everywhere (4 query heads over 2 key/value heads), tied and untied.
VARIANTS = {
    "llama": ("llama", {}),
    "llama_bias_tied": ("llama", dict(attention_bias=True, tie_word_embeddings=True)),
    "mistral": ("mistral", dict(sliding_window=32)),
    "mistral_tied": ("mistral", dict(sliding_window=None, tie_word_embeddings=True)),
    "qwen2": ("qwen2", {}),
    "qwen2_tied": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen3": ("qwen3", dict(head_dim=12)),
    "qwen3_bias_tied": ("qwen3", dict(head_dim=8, attention_bias=True, tie_word_embeddings=True)),
}
ODD_LENGTHS = [7, 1, 13, 5, 3]


def hf_model(model_type: str, seed: int = 0, **keys):
    """A random transformers model of `model_type` with sharp attention, random norms and biases."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **{
        **dict(vocab_size=61, hidden_size=32, intermediate_size=44, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False),
        **keys})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:  # biases too: transformers initialises them to zero, which would hide a missed bias
                p.normal_(0.0, 0.3)
    return model


def saved(hf, directory) -> Llama:
    hf.save_pretrained(directory)
    return Llama.from_pretrained(directory).eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_packed_logits_equal_transformers(variant, tmp_path):
    model_type, keys = VARIANTS[variant]
    hf = hf_model(model_type, **keys)
    ours = saved(hf, tmp_path / "hf")
    assert ours.config.model_type == model_type
    assert ours.num_parameters() == sum(p.numel() for p in hf.parameters()) == ours.config.num_parameters()
    assert (ours.lm_head.weight is ours.embed_tokens.weight) == hf.config.tie_word_embeddings
    batch = packed_batch(ODD_LENGTHS, hf.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(our_logits(ours, batch), hf_logits_per_sequence(hf, batch), **TOL)


@pytest.mark.parametrize("variant", ["llama_bias_tied", "mistral", "qwen2", "qwen3"])
def test_shared_prefix_layout_gives_the_unshared_loss_nll_and_gradients(variant, tmp_path):
    """Each family's attention (biases, q/k norms, GQA, windows) sees the shared query exactly."""
    model_type, keys = VARIANTS[variant]
    model = saved(hf_model(model_type, **keys), tmp_path)
    assert_layouts_equal(model, synthetic_groups(vocab=model.config.vocab_size))


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_pretrained_loads_as_the_family_class_with_identical_logits(variant, tmp_path):
    from transformers import AutoModelForCausalLM

    model_type, keys = VARIANTS[variant]
    hf = hf_model(model_type, **keys)
    saved(hf, tmp_path / "hf").save_pretrained(tmp_path / "ours")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(again).__name__ == FAMILY_CLASSES[model_type]
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    original = json.loads((tmp_path / "hf" / "config.json").read_text())
    for key in ("model_type", "architectures", "tie_word_embeddings", "num_key_value_heads",
                "attention_bias", "sliding_window", "use_sliding_window", "max_window_layers", "layer_types"):
        assert written.get(key) == original.get(key), key
    assert written["head_dim"] == (original.get("head_dim") or hf.config.hidden_size // hf.config.num_attention_heads)
    ids = torch.randint(0, hf.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, hf(ids).logits)


@pytest.mark.parametrize("model_type, keys, window", [
    ("mistral", dict(sliding_window=8), 8),
    ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1), 8),  # layer 1 slides
    ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=2), None),  # no layer slides
    ("qwen3", dict(head_dim=8, use_sliding_window=False, sliding_window=8), None),  # window switched off
])
def test_sliding_window_is_honoured_up_to_its_length_and_refused_beyond(model_type, keys, window, tmp_path):
    hf = hf_model(model_type, **keys)
    ours = saved(hf, tmp_path / "hf")
    assert ours.config.attention_window == window
    fits = [8, 3, 7] if window else [8, 13, 5]
    batch = packed_batch(fits, hf.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(our_logits(ours, batch), hf_logits_per_sequence(hf, batch), **TOL)
    if window:
        with pytest.raises(ModelError, match=f"9 tokens exceeds this {model_type} model's sliding_window of 8"):
            ours(*packed_batch([9, 3], hf.config.vocab_size))
        with pytest.raises(ModelError, match="sliding_window of 8"):
            generate_ids(ours, [1, 2, 3, 4, 5], max_new_tokens=6, stop_ids=set())


@pytest.mark.parametrize("edit, message", [
    (dict(model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"]), "model_type 'qwen2_moe' is not supported"),
    (dict(num_experts=4), "mixture-of-experts models are not supported (num_experts=4)"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}), "RoPE type 'yarn'"),
    (dict(architectures=["Qwen3ForSequenceClassification"]), "Qwen3ForSequenceClassification"),
    (dict(layer_types=["full_attention", "chunked_attention"]), "layer_types must list"),
])
def test_unsupported_options_of_a_family_are_named(edit, message, tmp_path):
    hf_model("qwen3", head_dim=8).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(ModelError, match="config.json: .*" + re.escape(message)):
        Llama.from_pretrained(tmp_path)


@pytest.mark.parametrize("variant", ["llama", "mistral_tied", "qwen2", "qwen3_bias_tied"])
def test_greedy_generation_equals_transformers(variant, tmp_path):
    model_type, keys = VARIANTS[variant]
    hf = hf_model(model_type, **keys)
    ours = saved(hf, tmp_path / "hf")
    prompt = torch.randint(0, hf.config.vocab_size, (9,), generator=torch.Generator().manual_seed(5)).tolist()
    steps = 16
    mine = generate_ids(ours, prompt, max_new_tokens=steps, stop_ids=set())
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=steps, min_new_tokens=steps, pad_token_id=0)
    assert theirs[0, len(prompt):].tolist() == mine


# -- tiny checkpoints with tokenizers (fastalign.tiny --family), through the command lines --------


@pytest.mark.parametrize("family, has_bos", [("llama", True), ("mistral", True), ("qwen2", False), ("qwen3", False)])
def test_alpaca_query_gets_bos_only_from_tokenizers_that_have_one(family_tiny, family, has_bos):
    tokenizer = load_tokenizer(family_tiny[family])
    assert (tokenizer.chat_template is not None) == family.startswith("qwen")  # Qwen: chat-template-only style
    query = "### Instruction:\nHow do I say sorry?\n\n### Response:"
    plain = tokenizer(query, add_special_tokens=False)["input_ids"]
    # what the tokenizer itself puts in front when asked for special tokens: BOS or nothing
    assert tokenizer(query)["input_ids"] == ([tokenizer.bos_token_id] if has_bos else []) + plain
    group = tokenize_records([Record(index=0, query=query, responses=["Say it plainly.", "Don't."], scores=[7.0, 1.0])],
                             tokenizer, model_max_length=64).groups[0]
    assert group.query_ids == tokenizer(query)["input_ids"]
    assert group.response_ids[0][-1] == tokenizer.eos_token_id
    assert prompt_ids(tokenizer, "How do I say sorry?") == group.query_ids
