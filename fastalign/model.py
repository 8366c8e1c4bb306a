"""A plain Llama over packed batches: the nn.Modules (config in `fastalign.hf_config`, Hugging Face
directory loading and saving in `fastalign.hf_io`).

Details: docs/design.md section 7.21.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from fastalign import hf_io
from fastalign.attention import resolve_backend, varlen_attention
from fastalign.errors import ModelError, brief_list
from fastalign.hf_weights import CheckpointReader, hf_name

if TYPE_CHECKING:
    from fastalign.hf_config import LlamaConfig

__all__ = ["Llama", "DecoderLayer"]

log = logging.getLogger(__name__)


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

    # -- Hugging Face model directories (fastalign.hf_io) ------------------------------------------

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.float32, device="cpu",
                        attn_implementation: str = "auto") -> Llama:
        """Load an HF directory of a supported family into `dtype` on `device`; peak host memory ~
        one model copy (`fastalign.hf_io.load_pretrained`)."""
        return hf_io.load_pretrained(cls, path, dtype, device, attn_implementation)

    def save_pretrained(self, path, *, state_dict: dict[str, torch.Tensor] | None = None,
                        tokenizer_dir=None, max_shard_size: int = 5 * 10**9) -> None:
        """Write an HF model directory that transformers loads as the family's class; the arguments
        and the all-or-nothing file handling: `fastalign.hf_io.save_pretrained`."""
        hf_io.save_pretrained(self, path, state_dict=state_dict, tokenizer_dir=tokenizer_dir,
                              max_shard_size=max_shard_size)

    def check_checkpoint(self, reader: CheckpointReader) -> None:
        """Raise ModelError naming every missing, unknown or wrongly shaped weight."""
        expected = {name: param.shape for name, param in self.named_parameters()}
        found = set(reader.names())
        ignorable = {"lm_head.weight"} if self.config.tie_word_embeddings else set()  # some tied files keep it
        missing = [hf_name(n) for n in expected if n not in found]
        unknown = [hf_name(n) for n in reader.names() if n not in expected and n not in ignorable]
        wrong = [f"{hf_name(n)} {list(reader.shape(n))} (config needs {list(s)})"
                 for n, s in expected.items() if n in found and reader.shape(n) != s]
        problems = [f"{label}: {brief_list(items)}" for label, items in
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
