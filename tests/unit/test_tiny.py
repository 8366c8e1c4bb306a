"""fastalign.tiny: an offline tiny Llama directory that transformers loads as a real checkpoint."""


import pytest
import torch
import transformers

from fastalign.tiny import build_tiny_llama

TEXTS = [
    "### Instruction:\nHow do I bake bread?\n\n### Response:",
    "Mix flour, water, yeast and salt; knead it, let it rise, then bake at 230 C.",
    "I would rather not say.",
    "\n\nHuman: Is it rude to interrupt?\n\nAssistant: Usually, yes.",
] * 10
ROUND_TRIP = [
    "### Instruction:\nHow do I bake bread?\n\n### Response: Knead it.",
    "  leading spaces,\ttabs\nand trailing newline\n",
    "text the tokenizer never saw: café, naïve, 日本語, emoji \U0001F600, <s> literally",
    "",
]
SHAPE = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96,
             max_position_embeddings=128)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", TEXTS, vocab_size=400, seed=3, **SHAPE)


def test_tokenizer_loads_with_special_tokens_and_round_trips_text(tiny_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == ("<s>", "</s>", "<unk>")
    assert tokenizer.pad_token is None
    assert tokenizer.model_max_length == SHAPE["max_position_embeddings"]
    assert 259 < len(tokenizer) <= 400  # 256 bytes + 3 specials + learned merges
    for text in ROUND_TRIP:
        with_bos = tokenizer(text).input_ids
        plain = tokenizer(text, add_special_tokens=False).input_ids
        assert with_bos == [tokenizer.bos_token_id] + plain
        assert tokenizer.unk_token_id not in plain
        assert tokenizer.decode(plain) == text
    # Training merged frequent words: a seen sentence takes far fewer tokens than bytes.
    seen = TEXTS[1]
    assert len(tokenizer(seen, add_special_tokens=False).input_ids) < len(seen.encode()) / 2


def test_model_loads_with_matching_config_and_runs(tiny_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    model, info = transformers.LlamaForCausalLM.from_pretrained(tiny_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    config = model.config
    assert config.vocab_size == len(tokenizer)
    assert (config.bos_token_id, config.eos_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size, config.max_position_embeddings) == (64, 2, 4, 2, 96, 128)
    assert (tiny_dir / "model.safetensors").is_file()
    # transformers writes weights 0600; the builder gives every file the umask's usual mode
    assert {p.stat().st_mode for p in tiny_dir.iterdir()} == {(tiny_dir / "config.json").stat().st_mode}
    ids = torch.tensor([tokenizer(ROUND_TRIP[0]).input_ids])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_same_seed_gives_identical_files_and_rng_is_left_alone(tiny_dir, tmp_path):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    again = build_tiny_llama(tmp_path / "again", TEXTS, vocab_size=400, seed=3, **SHAPE)
    assert torch.equal(torch.rand(3), expected_next)  # global RNG untouched by the build
    names = sorted(p.name for p in tiny_dir.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(names)
    for name in names:
        assert (tiny_dir / name).read_bytes() == (again / name).read_bytes(), name
    assert [p.name for p in tmp_path.iterdir()] == ["again"]  # no staging directory left behind

    other = build_tiny_llama(tmp_path / "again", TEXTS, vocab_size=400, seed=4, **SHAPE)  # rebuild in place
    assert (other / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()
    assert (other / "model.safetensors").read_bytes() != (tiny_dir / "model.safetensors").read_bytes()


def test_cli_refuses_a_sandbox_file_it_cannot_use_without_a_traceback(tmp_path, capsys):
    # the command's own entry (python -m fastalign.tiny = run_main(main)); `python -m` itself runs in
    # tests/e2e/test_tiny_e2e.py
    from fastalign.cli import run_main
    from fastalign.tiny import main

    sandbox = tmp_path / "sandbox.jsonl"
    sandbox.write_text('{"query": "q", "responses": ["a"], "scores": [9]}\n')
    assert run_main(main, [str(tmp_path / "bad"), "--data", str(sandbox)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert not (tmp_path / "bad").exists()
