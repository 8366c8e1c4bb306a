"""The model's config: `LlamaConfig`, read from and written to a Hugging Face config.json.

Details: docs/design.md section 7.15.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from fastalign.errors import ModelError
from fastalign.model_dir import refuse_custom_code

if TYPE_CHECKING:
    import torch

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
    def from_pretrained(cls, path) -> LlamaConfig:
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
    def from_hf_dict(cls, hf: dict, source: str = "config") -> LlamaConfig:
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
        # window); elsewhere null means the LlamaConfig default.
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
