"""fastalign.generate: the KV-cached decode equals full recomputation and transformers' generate."""

from __future__ import annotations

import pytest
import torch

from fastalign.cli import run_main
from fastalign.data import load_records, sample_data_path
from fastalign.generate import (
    ALPACA_TEMPLATE,
    KVCache,
    decode_step,
    eos_ids,
    generate,
    generate_ids,
    main,
    next_token,
    prompt_ids,
)
from fastalign.model import Llama
from fastalign.model_dir import load_tokenizer
from fastalign.tiny import build_tiny_llama, sandbox_texts

# max_position_embeddings small enough to matter, GQA (4 query heads over 2 key/value heads)
SHAPE = dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96,
             max_position_embeddings=256)
PROMPTS = ["How do I apologise to a friend I hurt?", "Is it okay to read my partner's messages?"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", sandbox_texts(sample_data_path()),
                            seed=2, **SHAPE)


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    return Llama.from_pretrained(tiny_dir).eval(), load_tokenizer(tiny_dir)


def uncached_greedy(model, ids, steps):
    """Greedy decoding that recomputes the whole sequence with Llama.forward at every step."""
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            t = len(ids)
            hidden = model(torch.tensor(ids), torch.arange(t), torch.tensor([0, t], dtype=torch.int32), t)
            token = int(torch.argmax(hidden[-1] @ model.lm_head.weight.T))
            out.append(token)
            ids.append(token)
    return out


def test_template_is_the_sandbox_query_format():
    query = load_records(sample_data_path()).records[0].query
    instruction = query.removeprefix("### Instruction:\n").removesuffix("\n\n### Response:")
    assert ALPACA_TEMPLATE.format(prompt=instruction) == query


def test_cached_logits_equal_full_forward_in_any_chunking(loaded):
    model, tok = loaded
    ids = prompt_ids(tok, PROMPTS[0])
    t = len(ids)
    with torch.no_grad():
        hidden = model(torch.tensor(ids), torch.arange(t), torch.tensor([0, t], dtype=torch.int32), t)
        full = hidden @ model.lm_head.weight.T  # [t, V]
    # prompt in two chunks (the second attends to cached keys and causally within itself), then single tokens
    cache = KVCache.empty(model, t)
    split = t // 2
    torch.testing.assert_close(decode_step(model, torch.tensor(ids[:split]), cache), full[split - 1])
    torch.testing.assert_close(decode_step(model, torch.tensor(ids[split:-2]), cache), full[-3])
    torch.testing.assert_close(decode_step(model, torch.tensor(ids[-2:-1]), cache), full[-2])
    torch.testing.assert_close(decode_step(model, torch.tensor(ids[-1:]), cache), full[-1])
    assert cache.length == t


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_equals_recompute_and_transformers(tiny_dir, loaded, prompt):
    from transformers import LlamaForCausalLM

    model, tok = loaded
    ids = prompt_ids(tok, prompt)
    steps = 24
    cached = generate_ids(model, ids, max_new_tokens=steps, stop_ids=set())
    assert len(cached) == steps
    assert cached == uncached_greedy(model, ids, steps)
    hf = LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        hf_out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=steps, min_new_tokens=steps,
                             pad_token_id=tok.eos_token_id)
    assert hf_out[0, len(ids):].tolist() == cached


def test_stops_at_eos_without_emitting_it(loaded):
    model, tok = loaded
    ids = prompt_ids(tok, PROMPTS[1])
    free = generate_ids(model, ids, max_new_tokens=12, stop_ids=set())
    stop = free[4]
    first = free.index(stop)
    assert generate_ids(model, ids, max_new_tokens=12, stop_ids={stop}) == free[:first]
    assert eos_ids(model, tok) == {tok.eos_token_id}


def test_sampling_is_seeded_and_tiny_top_p_is_greedy(loaded):
    model, tok = loaded
    one = generate(model, tok, PROMPTS[0], max_new_tokens=16, temperature=1.0, seed=7)
    assert one == generate(model, tok, PROMPTS[0], max_new_tokens=16, temperature=1.0, seed=7)
    greedy = generate(model, tok, PROMPTS[0], max_new_tokens=16)
    assert generate(model, tok, PROMPTS[0], max_new_tokens=16, temperature=1.0, top_p=1e-6, seed=3) == greedy


def test_next_token_samples_the_tempered_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    gen = torch.Generator().manual_seed(0)
    draws = torch.tensor([next_token(logits, 1.0, 0.7, gen) for _ in range(4000)])
    # nucleus {0, 1} (0.5 < 0.7 <= 0.8), renormalised to 0.625 / 0.375
    assert set(draws.tolist()) == {0, 1}
    assert (draws == 0).float().mean().item() == pytest.approx(0.625, abs=0.03)
    draws = torch.tensor([next_token(logits, 2.0, 1.0, gen) for _ in range(4000)])
    expected = torch.softmax(logits / 2.0, dim=-1)
    observed = torch.bincount(draws, minlength=4).float() / len(draws)
    torch.testing.assert_close(observed, expected, atol=0.03, rtol=0)
    assert next_token(logits, 0.0, 0.1, None) == 0


def test_cli_prints_each_prompt_and_response(tiny_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Why should I recycle?\n\nHow can I sleep better?\n")
    assert run_main(main, ["--model_name_or_path", str(tiny_dir), "--prompt", "Hello there",
                           "--prompts_file", str(prompts), "--max_new_tokens", "5"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("### Prompt ") == 3
    assert "### Prompt 3: How can I sleep better?" in printed


@pytest.mark.parametrize("extra, expected", [
    ([], "--prompt"),
    (["--prompt", "hi", "--temperature", "-1"], "--temperature"),
    (["--prompt", "hi", "--top_p", "0"], "--top_p"),
    (["--prompts_file", "/nonexistent/prompts.txt"], "--prompts_file"),
])
def test_cli_errors_are_clean(tiny_dir, extra, expected, capsys):
    assert run_main(main, ["--model_name_or_path", str(tiny_dir), *extra]) == 2
    assert expected in capsys.readouterr().err


def test_cli_missing_model_is_a_clean_error(tmp_path, capsys):
    # an empty directory; `python -m fastalign.generate` itself runs in tests/e2e/test_hostile_model_dir.py
    assert run_main(main, ["--model_name_or_path", str(tmp_path), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "config.json" in err
