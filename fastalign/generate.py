"""Text generation with a fastalign Llama and a key/value cache: see what a trained model says.

Details: docs/design.md section 7.14.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fastalign import peft_io
from fastalign.cli import BOOLEAN_FLAG, run_main
from fastalign.errors import ConfigError
from fastalign.model import Llama
from fastalign.model_dir import load_tokenizer

ALPACA_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:"


@dataclass
class KVCache:
    """Rotated keys and values of every layer for the positions decoded so far.

    keys[i], values[i]: [capacity, Hkv, D] for layer i; positions [0, length) are filled.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0

    @classmethod
    def empty(cls, model: Llama, capacity: int) -> KVCache:
        config, param = model.config, model.embed_tokens.weight
        shape = (capacity, config.num_key_value_heads, config.head_dim)
        make = lambda: [param.new_empty(shape) for _ in model.layers]  # noqa: E731
        return cls(keys=make(), values=make())


def _attend(layer, x: torch.Tensor, cos, sin, cache: KVCache, index: int) -> torch.Tensor:
    """Self-attention of the new positions x [t, H] over the cached ones plus themselves (causal)."""
    attn = layer.self_attn
    t, start = x.shape[0], cache.length
    q, k, v = attn.project(x, cos, sin)  # [t, Hq, D], [t, Hkv, D] x2
    cache.keys[index][start:start + t] = k
    cache.values[index][start:start + t] = v
    keys = cache.keys[index][:start + t].transpose(0, 1)  # [Hkv, start+t, D]
    values = cache.values[index][:start + t].transpose(0, 1)
    # new position start+i sees cached positions and new ones up to itself
    key_positions = torch.arange(start + t, device=x.device)  # [start+t]
    query_positions = torch.arange(start, start + t, device=x.device)  # [t]
    visible = key_positions[None, :] <= query_positions[:, None]  # [t, start+t]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), keys, values, attn_mask=visible,
                                         enable_gqa=attn.num_kv_heads != attn.num_heads)  # [Hq, t, D]
    return attn.o_proj(out.transpose(0, 1).reshape(t, attn.num_heads * attn.head_dim))


@torch.no_grad()
def decode_step(model: Llama, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run input_ids [t] at positions cache.length.. through the model; logits [V] of the last one."""
    t = input_ids.shape[0]
    model.config.check_length(cache.length + t)
    hidden = model.embed_tokens(input_ids)  # [t, H]
    positions = torch.arange(cache.length, cache.length + t, device=input_ids.device)
    cos, sin = model.rotary(positions, hidden.dtype)
    for index, layer in enumerate(model.layers):
        hidden = hidden + _attend(layer, layer.input_layernorm(hidden), cos, sin, cache, index)
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    cache.length += t
    return model.lm_head(model.norm(hidden[-1:]))[0].float()


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Greedy (temperature 0) or a sample from softmax(logits / temperature) cut to the top-p nucleus."""
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def eos_ids(model: Llama, tokenizer) -> set[int]:
    """Token ids that end a generation: the config's eos_token_id (int or list) and the tokenizer's."""
    configured = model.config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [configured])
    ids.add(tokenizer.eos_token_id)
    return {i for i in ids if i is not None}


def generate_ids(model: Llama, prompt_ids: Sequence[int], *, max_new_tokens: int, stop_ids: set[int],
                 temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None) -> list[int]:
    """New token ids after `prompt_ids` (the stopping EOS not included)."""
    device = model.embed_tokens.weight.device
    cache = KVCache.empty(model, len(prompt_ids) + max_new_tokens)
    logits = decode_step(model, torch.tensor(prompt_ids, dtype=torch.long, device=device), cache)
    generated: list[int] = []
    while len(generated) < max_new_tokens:
        token = next_token(logits, temperature, top_p, generator)
        if token in stop_ids:
            break
        generated.append(token)
        if len(generated) < max_new_tokens:
            logits = decode_step(model, torch.tensor([token], device=device), cache)
    return generated


def prompt_ids(tokenizer, text: str, template: bool = True) -> list[int]:
    """Token ids of a prompt as training tokenizes a query: BOS (when the tokenizer has one), then the text."""
    query = ALPACA_TEMPLATE.format(prompt=text) if template else text
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer(query, add_special_tokens=False)["input_ids"]


def generate(model: Llama, tokenizer, prompt: str, *, max_new_tokens: int = 128, temperature: float = 0.0,
             top_p: float = 1.0, template: bool = True, seed: int | None = None) -> str:
    """The model's response to one prompt, as text."""
    check_sampling(max_new_tokens, temperature, top_p)
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=model.embed_tokens.weight.device)
        generator.manual_seed(0 if seed is None else seed)
    was_training = model.training
    model.eval()
    try:
        ids = generate_ids(model, prompt_ids(tokenizer, prompt, template), max_new_tokens=max_new_tokens,
                           stop_ids=eos_ids(model, tokenizer), temperature=temperature, top_p=top_p,
                           generator=generator)
    finally:
        model.train(was_training)
    return tokenizer.decode(ids, skip_special_tokens=True)


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if max_new_tokens < 1:
        raise ConfigError(f"--max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature >= 0:
        raise ConfigError(f"--temperature must be >= 0 (0: greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"--top_p must be in (0, 1], got {top_p}")


def read_prompts(path: str) -> list[str]:
    """One prompt per non-empty line of a text file."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ConfigError(f"--prompts_file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--prompts_file {path}: cannot read it as UTF-8 text ({err})") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise ConfigError(f"--prompts_file {path}: no prompts (expected one per line)")
    return prompts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastalign.generate", allow_abbrev=False,
                                description="Generate responses with a (trained) Llama directory, KV-cached.")
    p.add_argument("--model_name_or_path", required=True,
                   help="HF model directory: Llama, Mistral, Qwen2 or Qwen3 (config.json, weights, tokenizer); or "
                   "a PEFT LoRA adapter directory (the base model named by its adapter_config.json).")
    p.add_argument("--prompt", action="append", default=[], help="A prompt (repeat the flag for several).")
    p.add_argument("--prompts_file", default=None, help="A text file with one prompt per line.")
    p.add_argument("--max_new_tokens", type=int, default=128, help="Most tokens generated per prompt. Default 128.")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sample.")
    p.add_argument("--top_p", type=float, default=1.0, help="Nucleus sampling mass when sampling. Default 1.")
    p.add_argument("--no_template", default=False,
                   help="Send prompts as they are, without the Alpaca template.", **BOOLEAN_FLAG)
    p.add_argument("--seed", type=int, default=0, help="Sampling seed. Default 0.")
    p.add_argument("--bf16", default=False, help="Run the model in bfloat16. Default False.", **BOOLEAN_FLAG)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prompts = list(args.prompt) + (read_prompts(args.prompts_file) if args.prompts_file else [])
    if not prompts:
        raise ConfigError("give at least one --prompt or a --prompts_file")
    check_sampling(args.max_new_tokens, args.temperature, args.top_p)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = peft_io.load_model(args.model_name_or_path, device=device,
                               dtype=torch.bfloat16 if args.bf16 else torch.float32)  # or an adapter directory
    tokenizer = load_tokenizer(model.source_dir)
    for i, prompt in enumerate(prompts):
        response = generate(model, tokenizer, prompt, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_p=args.top_p, template=not args.no_template,
                            seed=args.seed + i)
        print(f"### Prompt {i + 1}: {prompt}\n{response.strip()}\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
