"""A plain Llama over packed batches, loaded from and saved to Hugging Face checkpoints.

    model = Llama.from_pretrained(path, dtype=torch.bfloat16, device="cuda")
    hidden = model(input_ids, position_ids, cu_seqlens, max_seqlen)   # [T, H], after the final norm
    hidden = model(batch.input_ids, batch.position_ids, **batch.attention_inputs())  # a PackedBatch
    model.lm_head.weight                                              # [V, H]; the loss applies it
    model.save_pretrained(out_dir)                                    # transformers loads it as is

The model never computes logits: the loss streams `hidden @ lm_head.weight.T` chunk by chunk.
`DecoderLayer` is the unit FSDP wraps and that activation checkpointing and torch.compile apply
to. Attention runs through `fastalign.attention.varlen_attention`; the backend is chosen once
(`set_attention_backend`, `--attn_implementation`) and read back from `model.attn_backend`.

Supported configs: the Llama-architecture decoders (RMSNorm, SwiGLU, grouped-query attention,
explicit `head_dim`, RoPE with `rope_theta` and no scaling, or `linear` or `llama3` scaling, in the
old key style (`rope_theta`, `rope_scaling`) or the transformers 5 one (`rope_parameters`)) of four
`model_type`s, which differ only in the attention projections (`FAMILIES`):
    llama    LLaMA 1/2/3.x, Vicuna, Alpaca, TinyLlama, ...; `attention_bias` (q/k/v/o biases) honoured
    mistral  Mistral; `sliding_window` honoured by refusing longer sequences (below it, sliding-window
             attention is full causal attention)
    qwen2    Qwen2 / Qwen2.5: q/k/v biases; sliding window as Qwen2's config places it (refused likewise)
    qwen3    Qwen3 (dense): per-head RMSNorm of q and k before RoPE (`q_norm`, `k_norm`); `attention_bias`
Anything else (other model types, mixture-of-experts, MLP biases, other activations, other RoPE
types, quantized checkpoints) is refused with a message naming the key.

Loading keeps host memory near one copy of the model in its target dtype: the model is built on
the meta device (no memory), cast to the target dtype there, materialised with `to_empty` (memory
is allocated, not written), and every weight is then read from disk straight into its parameter
(`fastalign.hf_weights.CheckpointReader`). No full fp32 copy, no state dict, each weight read once.

Distributed training: each rank reads what it needs. The trainer builds the model on meta,
shards it with FSDP2, materialises the local shards, calls `check_checkpoint(reader)` and fills
each shard with `reader.read(name, dtype, rows=slice(a, b))` (only those rows are read from
disk), then `init_buffers()`. No rank ever holds the full model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastalign.attention import resolve_backend, varlen_attention
from fastalign.errors import ModelError
from fastalign.hf_weights import (
    SAFETENSORS_INDEX,
    SAFETENSORS_SINGLE,
    WEIGHT_FILE_GLOBS,
    CheckpointReader,
    hf_name,
    plan_shards,
    write_safetensors,
)
from fastalign.model_dir import load_tokenizer, refuse_custom_code

__all__ = ["LlamaConfig", "Llama", "DecoderLayer", "CheckpointReader", "load_tokenizer"]

log = logging.getLogger(__name__)

# Files that travel with a model directory besides config and weights.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
                   "chat_template.json")
_ROPE_TYPES = {"default": (), "linear": ("factor",),
               "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


@dataclass(frozen=True)
class Family:
    """What sets one `model_type` apart: its transformers classes, the config keys only it has
    (read from config.json and written back), and the transformers defaults of keys a file may omit
    where they differ from LlamaConfig's."""

    architectures: tuple[str, ...]  # the first is written back
    keys: tuple[str, ...]
    defaults: dict


_QWEN_WINDOW_KEYS = ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types")
_QWEN_DEFAULTS = dict(bos_token_id=None, eos_token_id=None, max_position_embeddings=32768,
                      use_sliding_window=False, sliding_window=4096, max_window_layers=28)
FAMILIES = {
    "llama": Family(("LlamaForCausalLM", "LLaMAForCausalLM"), ("attention_bias",), {}),  # 2nd: early conversions
    "mistral": Family(("MistralForCausalLM",), ("sliding_window",),
                      dict(max_position_embeddings=4096 * 32, sliding_window=4096)),
    "qwen2": Family(("Qwen2ForCausalLM",), _QWEN_WINDOW_KEYS, _QWEN_DEFAULTS),
    "qwen3": Family(("Qwen3ForCausalLM",), ("attention_bias", *_QWEN_WINDOW_KEYS), {**_QWEN_DEFAULTS, "head_dim": 128}),
}
_FAMILY_FIELDS = ("attention_bias", *_QWEN_WINDOW_KEYS)
# Config keys of mixture-of-experts variants: a dense model would silently ignore their experts.
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size", "num_experts_per_tok")


@dataclass
class LlamaConfig:
    """The numbers that define a Llama; defaults are transformers' LlamaConfig defaults.

    rope_scaling: None for plain RoPE, else {"rope_type": "linear" | "llama3", <its parameters>}.
    torch_dtype: dtype name the checkpoint was saved in (informational).
    model_type: "llama", "mistral", "qwen2" or "qwen3" (`FAMILIES`); the fields after it are the
    family's own config keys as transformers names them (None where the family has no such key);
    `qkv_bias`, `o_bias`, `qk_norm` and `attention_window` say what they mean for the layers.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: = num_attention_heads (multi-head attention)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    torch_dtype: str | None = None
    model_type: str = "llama"
    attention_bias: bool = False  # llama, qwen3: biases on q/k/v/o_proj
    use_sliding_window: bool | None = None  # qwen2, qwen3
    sliding_window: int | None = None  # mistral, qwen2, qwen3 (qwen: only with use_sliding_window)
    max_window_layers: int | None = None  # qwen2, qwen3: layers from this index on slide
    layer_types: list[str] | None = None  # qwen2, qwen3: per layer, overrides max_window_layers

    def __post_init__(self):
        if self.model_type not in FAMILIES:
            raise ModelError(f"model_type {self.model_type!r} is not supported (supported: {', '.join(FAMILIES)})")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ModelError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type")
            if rope_type not in ("linear", "llama3"):
                raise ModelError(f"rope_scaling type {rope_type!r} is not supported "
                                 f"(supported: none, 'linear', 'llama3')")
            missing = [k for k in _ROPE_TYPES[rope_type] if k not in self.rope_scaling]
            if missing:
                raise ModelError(f"rope_scaling of type {rope_type!r} lacks {', '.join(missing)}")
        if self.layer_types is not None:
            odd = sorted(set(self.layer_types) - {"full_attention", "sliding_attention"})
            if odd or len(self.layer_types) != self.num_hidden_layers:
                raise ModelError(f"layer_types must list 'full_attention' or 'sliding_attention' for each of the "
                                 f"{self.num_hidden_layers} layers, got {self.layer_types}")

    # -- what the family's keys mean for the layers ---------------------------------------------

    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.model_type != "qwen2" and self.attention_bias

    @property
    def qk_norm(self) -> bool:
        return self.model_type == "qwen3"

    @property
    def attention_window(self) -> int | None:
        """The sliding window some layers attend within, as transformers applies the config; None: none.

        A query attends to the `window` latest keys (itself included), so a sequence of at most
        `window` tokens sees exactly what full causal attention sees; longer ones are refused.
        """
        if self.model_type == "mistral":
            return self.sliding_window
        if self.model_type == "llama" or not self.use_sliding_window or self.sliding_window is None:
            return None
        if self.layer_types is not None:
            sliding = "sliding_attention" in self.layer_types
        else:
            sliding = self.num_hidden_layers > self.max_window_layers
        return self.sliding_window if sliding else None

    def check_length(self, length: int) -> None:
        """Refuse a sequence longer than the sliding window (full attention would differ from the model's)."""
        window = self.attention_window
        if window is not None and length > window:
            raise ModelError(f"a sequence of {length} tokens exceeds this {self.model_type} model's sliding_window "
                             f"of {window}; fastalign computes full attention, which equals sliding-window attention "
                             f"only up to {window} tokens: keep sequences (--model_max_length) at most {window}")

    # -- Hugging Face config.json ------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path) -> "LlamaConfig":
        file = Path(path) / "config.json"
        refuse_custom_code(path)  # before anything reads the directory: its auto_map would name code
        try:
            hf = json.loads(file.read_text())
        except FileNotFoundError:
            raise ModelError(f"{path}: no config.json (expected a Hugging Face model directory)") from None
        except (OSError, ValueError) as err:
            raise ModelError(f"{file}: not readable JSON ({err})") from None
        return cls.from_hf_dict(hf, source=str(file))

    @classmethod
    def from_hf_dict(cls, hf: dict, source: str = "config") -> "LlamaConfig":
        """Parse an HF config of a supported family (transformers 4 or 5 keys); refuse what this
        model cannot run, naming the key."""

        def refuse(reason: str):
            raise ModelError(f"{source}: {reason}; fastalign trains Llama-architecture decoders only "
                             f"(model_type {', '.join(FAMILIES)}: RMSNorm, SwiGLU, dense MLP without biases, "
                             f"RoPE: default, linear or llama3)")

        model_type = hf.get("model_type", "llama")
        if model_type not in FAMILIES:
            refuse(f"model_type {model_type!r} is not supported")
        family = FAMILIES[model_type]
        unsupported = [a for a in hf.get("architectures") or [] if a not in family.architectures]
        if unsupported:
            refuse(f"architectures {unsupported} are not supported for model_type {model_type!r} "
                   f"(expected {family.architectures[0]})")
        if hf.get("hidden_act", "silu") != "silu":
            refuse(f"hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
        if hf.get("mlp_bias"):
            refuse("mlp_bias=true is not supported")
        moe = [f"{k}={hf[k]}" for k in _MOE_KEYS if hf.get(k)]
        if moe:
            refuse(f"mixture-of-experts models are not supported ({', '.join(moe)})")
        if hf.get("quantization_config"):
            refuse("quantized checkpoints (quantization_config) are not supported")

        # RoPE: transformers 5 writes rope_parameters (with rope_theta inside); older files write
        # rope_theta and rope_scaling (type under "type" or "rope_type"); LLaMA 1 files neither.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        if rope_type not in _ROPE_TYPES:
            refuse(f"RoPE type {rope_type!r} is not supported")
        if float(rope.pop("partial_rotary_factor", hf.get("partial_rotary_factor") or 1.0)) != 1.0:
            refuse("partial_rotary_factor != 1 is not supported")
        if rope_type == "llama3":
            rope.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings", 2048))
        rope_scaling = None if rope_type == "default" else {"rope_type": rope_type, **rope}

        # Keys of other families are not read: their transformers class ignores them too.
        known = {f.name for f in fields(cls)} - {"rope_theta", "rope_scaling", "torch_dtype", "model_type",
                                                  *(set(_FAMILY_FIELDS) - set(family.keys))}
        # An explicit null keeps a family default's meaning (Mistral's sliding_window: null = no
        # window); elsewhere null means the LlamaConfig default, as before.
        values = {**family.defaults,
                  **{k: hf[k] for k in known if k in hf and (hf[k] is not None or k in family.defaults)}}
        try:
            return cls(**values, model_type=model_type, rope_theta=rope_theta, rope_scaling=rope_scaling,
                       torch_dtype=hf.get("dtype") or hf.get("torch_dtype"))
        except ModelError as err:
            raise ModelError(f"{source}: {err}") from None

    def to_hf_dict(self, dtype: torch.dtype | None = None) -> dict:
        """config.json content that transformers 5 reads (rope_parameters) and 4.x too (rope_theta,
        rope_scaling), as the family's own class (Qwen2ForCausalLM, ...)."""
        family = FAMILIES[self.model_type]
        out = {"architectures": [family.architectures[0]], "model_type": self.model_type}
        out.update({k: v for k, v in asdict(self).items()
                    if k not in ("rope_scaling", "torch_dtype", "model_type", *_FAMILY_FIELDS) or k in family.keys})
        out.update(hidden_act="silu", attention_dropout=0.0, use_cache=True, rope_scaling=self.rope_scaling,
                   rope_parameters={"rope_type": "default", **(self.rope_scaling or {}),
                                    "rope_theta": self.rope_theta})
        if self.model_type == "llama":
            out.update(mlp_bias=False)
        if out.get("layer_types") is None:
            out.pop("layer_types", None)  # transformers derives it from max_window_layers
        dtype_name = str(dtype).removeprefix("torch.") if dtype is not None else self.torch_dtype
        if dtype_name:
            out.update(dtype=dtype_name, torch_dtype=dtype_name)
        return out

    # -- counting ----------------------------------------------------------------------------

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Distinct parameters (a tied lm_head counted once); without embeddings: no embed_tokens."""
        h, d = self.hidden_size, self.head_dim
        attn = h * d * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        attn += self.qkv_bias * d * (self.num_attention_heads + 2 * self.num_key_value_heads)
        attn += self.o_bias * h + self.qk_norm * 2 * d
        layer = attn + 3 * h * self.intermediate_size + 2 * h
        body = self.num_hidden_layers * layer + h
        embed = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else embed
        return body + head + (embed if include_embeddings else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token of a sequence of `seq_len` tokens.

        6*N for the matmuls, N = every parameter that multiplies activations: all but the
        embedding table, with lm_head counted even when tied (the loss still runs that GEMM). Plus
        causal attention as actually computed: 6 * layers * heads * head_dim * seq_len (half of
        PaLM's 12*L*H*Q*T, which counts the masked half too). Counted on the full, unsharded model.
        """
        n = self.num_parameters(include_embeddings=False)
        if self.tie_word_embeddings:
            n += self.vocab_size * self.hidden_size  # the lm_head GEMM runs on the shared table
        attention = 6 * self.num_hidden_layers * self.num_attention_heads * self.head_dim * seq_len
        return 6 * n + attention


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, round to the activation dtype, then scale: the same order as
        # transformers, so bf16 results match it bit for bit where the kernels agree.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rotary_inv_freq(config: LlamaConfig, device=None) -> torch.Tensor:
    """fp32 [head_dim/2] inverse frequencies, with linear or llama3 scaling applied."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # llama3: keep short wavelengths, divide long ones by `factor`, blend smoothly in between.
    context = scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= context / high) & (wavelen <= context / low)
    return torch.where(is_medium, blended, scaled)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on x [T, heads, D] with cos/sin [T, 1, D] (half-split layout, as HF Llama weights use)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=config.o_bias)
        # Qwen3: RMSNorm over each head's D features of q and k, before RoPE (weights [D], shared by heads).
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else nn.Identity()
        self.backend = "sdpa"  # set for all layers at once by Llama.set_attention_backend

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [T, H] -> q [T, Hq, D], k [T, Hkv, D] (both rotated), v [T, Hkv, D]; cos, sin [T, 1, D]."""
        t = x.shape[0]
        q = _rotate(self.q_norm(self.q_proj(x).view(t, self.num_heads, self.head_dim)), cos, sin)
        k = _rotate(self.k_norm(self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)), cos, sin)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        return q, k, v

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen, kv_index=None, cu_seqlens_k=None, max_seqlen_k=None):
        q, k, v = self.project(x, cos, sin)
        out = varlen_attention(q, k, v, cu_seqlens, max_seqlen, self.backend,
                               kv_index, cu_seqlens_k, max_seqlen_k)  # [T, Hq, D]
        return self.o_proj(out.reshape(x.shape[0], self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm attention + SwiGLU MLP with residuals: the FSDP / checkpointing / compile unit."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, hidden, cos, sin, cu_seqlens, max_seqlen: int, kv_index=None, cu_seqlens_k=None,
                max_seqlen_k: int | None = None):
        """hidden [T, H]; cos, sin [T, 1, head_dim] in hidden's dtype; cu_seqlens int32 [N+1];
        kv_index, cu_seqlens_k: the shared-prefix keys of each segment (fastalign.attention)."""
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, cu_seqlens, max_seqlen,
                                         kv_index, cu_seqlens_k, max_seqlen_k)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", rotary_inv_freq(config), persistent=False)  # fp32 [head_dim/2]
        self.source_dir: Path | None = None  # where from_pretrained read it (tokenizer files come from here)
        self._tie_weights()

    # -- forward -----------------------------------------------------------------------------

    def forward(self, input_ids, position_ids, cu_seqlens, max_seqlen: int, kv_index=None, cu_seqlens_k=None,
                max_seqlen_k: int | None = None) -> torch.Tensor:
        """input_ids, position_ids int64 [T]; cu_seqlens int32 [N+1] -> hidden [T, H] after the final norm.

        kv_index int64 [Tk], cu_seqlens_k int32 [N+1], max_seqlen_k: a shared-prefix batch's key
        segments (fastalign.data.packing; None: each segment attends to itself).
        """
        if kv_index is None:
            max_seqlen_k = max_seqlen
        self.config.check_length(max(max_seqlen, max_seqlen_k))  # the longest query + response
        hidden = self.embed_tokens(input_ids)
        cos, sin = self.rotary(position_ids, hidden.dtype)
        for layer in self.layers:
            hidden = layer(hidden, cos, sin, cu_seqlens, max_seqlen, kv_index, cu_seqlens_k, max_seqlen_k)
        return self.norm(hidden)

    def rotary(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, head_dim] in `dtype` for position_ids [T] (what every layer's attention takes).

        Angles in fp32 (positions up to 128k need it), rounded once to the activation dtype.
        """
        freqs = position_ids[:, None].float() * self.inv_freq.float()  # [T, D/2]
        angles = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, D]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    # -- attention backend ---------------------------------------------------------------------

    @property
    def attn_backend(self) -> str:
        return self.layers[0].self_attn.backend if len(self.layers) else "sdpa"

    def set_attention_backend(self, name: str = "auto", *, device=None, dtype: torch.dtype | None = None) -> str:
        """Choose the attention backend once (device/dtype default to the parameters'); returns it.

        Call again after moving the model or when mixed precision computes in another dtype than
        the parameters are stored in (FSDP2 param_dtype).
        """
        param = self.embed_tokens.weight
        backend = resolve_backend(name, device or param.device, dtype or param.dtype, self.config.head_dim)
        for layer in self.layers:
            layer.self_attn.backend = backend
        log.info("attention backend: %s", backend)
        return backend

    # -- parameters and buffers ----------------------------------------------------------------

    def _tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def _apply(self, fn, recurse=True):
        # Module._apply (behind .to(), .to_empty(), .cuda()) can replace each module's parameter by
        # a new object, which would silently untie lm_head from the embedding, and casts the
        # rotary frequencies with the weights (bf16 frequencies garble long positions) or leaves
        # them uninitialised (to_empty): tie again and recompute them after it.
        result = super()._apply(fn, recurse)
        self._tie_weights()
        self.init_buffers()
        return result

    def init_buffers(self) -> None:
        """Recompute the non-persistent rotary frequencies in fp32 (also done by .to / to_empty)."""
        self.inv_freq = rotary_inv_freq(self.config, device=self.inv_freq.device)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Random init as transformers does: N(0, initializer_range) matrices, unit norm weights, zero biases."""
        std = self.config.initializer_range
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.normal_(0.0, std, generator=generator)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- loading -------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.float32, device="cpu",
                        attn_implementation: str = "auto") -> "Llama":
        """Load an HF directory of a supported family (`FAMILIES`) into `dtype` on `device`; peak
        host memory ~ one model copy."""
        path = Path(path)
        config = LlamaConfig.from_pretrained(path)
        reader = CheckpointReader(path)
        with torch.device("meta"):
            model = cls(config)
        model.to(dtype=dtype)  # on meta: records the dtype, allocates nothing
        model.to_empty(device=device)
        model.load_weights(reader)
        model.source_dir = path
        model.set_attention_backend(attn_implementation)
        return model

    def check_checkpoint(self, reader: CheckpointReader) -> None:
        """Raise ModelError naming every missing, unknown or wrongly shaped weight."""
        expected = {name: param.shape for name, param in self.named_parameters()}
        found = set(reader.names())
        ignorable = {"lm_head.weight"} if self.config.tie_word_embeddings else set()  # some tied files keep it
        missing = [hf_name(n) for n in expected if n not in found]
        unknown = [hf_name(n) for n in reader.names() if n not in expected and n not in ignorable]
        wrong = [f"{hf_name(n)} {list(reader.shape(n))} (config needs {list(s)})"
                 for n, s in expected.items() if n in found and reader.shape(n) != s]
        problems = [f"{label}: {_first(items)}" for label, items in
                    (("missing weights", missing), ("unknown weights", unknown), ("wrong shapes", wrong)) if items]
        if problems:
            raise ModelError(f"{reader.path}: the weights do not match config.json: " + "; ".join(problems)
                             + (f" (a {self.config.model_type} model of this config has no such weights)"
                                if unknown else ""))

    def load_weights(self, reader: CheckpointReader) -> None:
        """Fill every (materialised, unsharded) parameter from `reader`, in file order."""
        self.check_checkpoint(reader)
        params = dict(self.named_parameters())
        for name in reader.names():
            if name in params:
                reader.read_into(name, params[name].data)

    # -- saving --------------------------------------------------------------------------------

    def save_pretrained(self, path, *, state_dict: dict[str, torch.Tensor] | None = None,
                        tokenizer_dir=None, max_shard_size: int = 5 * 10**9) -> None:
        """Write an HF model directory that transformers loads as the family's class (LlamaForCausalLM,
        MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM).

        state_dict: full tensors under our names (default: this model's); a trainer passes the
        dict gathered from FSDP shards on rank 0. Weights keep their dtype; above
        `max_shard_size` bytes they are split into shards with an index. Tokenizer files and
        generation_config.json come from `tokenizer_dir` (default: the directory loaded from).
        Files appear only when complete: they are written into a temporary directory that is
        renamed to `path`, or, when `path` already holds other files (a training output dir),
        moved into it one by one with config.json last, replacing any older weight files.
        """
        path = Path(path)
        tensors = self._hf_tensors(self.state_dict() if state_dict is None else state_dict)
        tmp = path / f".tmp-save-{os.getpid()}" if path.is_dir() else path.with_name(f".{path.name}.tmp-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        try:
            self._write_weights(tmp, tensors, max_shard_size)
            source = Path(tokenizer_dir) if tokenizer_dir is not None else self.source_dir
            self._write_side_files(tmp, source)
            floating = next((t.dtype for t in tensors.values() if t.is_floating_point()), None)
            (tmp / "config.json").write_text(json.dumps(self.config.to_hf_dict(floating), indent=2) + "\n")
            _commit_dir(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _hf_tensors(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        expected = [name for name, _ in self.named_parameters()]  # tied lm_head appears once
        missing = [n for n in expected if n not in state_dict]
        extra = [n for n in state_dict if n not in expected
                 and not (n == "lm_head.weight" and self.config.tie_word_embeddings)]
        if missing or extra:
            raise ValueError(f"save_pretrained: state_dict does not match the model: "
                             f"missing {_first(missing)}; unexpected {_first(extra)}")
        return {hf_name(n): state_dict[n].detach() for n in expected}

    @staticmethod
    def _write_weights(directory: Path, tensors: dict[str, torch.Tensor], max_shard_size: int) -> None:
        sizes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
        shards = plan_shards(sizes.items(), max_shard_size)
        if len(shards) == 1:
            write_safetensors(directory / SAFETENSORS_SINGLE, tensors)
            return
        weight_map = {}
        for i, names in enumerate(shards, start=1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(directory / file, {n: tensors[n] for n in names})
            weight_map.update(dict.fromkeys(names, file))
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")

    def _write_side_files(self, directory: Path, source: Path | None) -> None:
        """Tokenizer files and generation_config.json from `source`; a minimal generation config without."""
        for name in TOKENIZER_FILES + ("generation_config.json",):
            if source is not None and (source / name).is_file():
                shutil.copy2(source / name, directory / name)
        if not (directory / "generation_config.json").exists():
            generation = {"bos_token_id": self.config.bos_token_id, "eos_token_id": self.config.eos_token_id}
            (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def _first(items: list[str], limit: int = 8) -> str:
    """A readable list: the first `limit` items and how many more."""
    if not items:
        return "none"
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _commit_dir(tmp: Path, path: Path) -> None:
    """Make the complete `tmp` appear as `path` (see Llama.save_pretrained)."""
    if not path.exists():
        tmp.rename(path)
        return
    new_files = {f.name for f in tmp.iterdir()}
    for pattern in WEIGHT_FILE_GLOBS:  # weights of an earlier save that this one does not overwrite
        for old in path.glob(pattern):
            if old.name not in new_files:
                old.unlink()
    for f in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):
        os.replace(f, path / f.name)
    tmp.rmdir()

