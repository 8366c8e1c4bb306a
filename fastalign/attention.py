"""Causal attention over a packed batch of sequences, behind one function and three backends.

Details: docs/design.md section 7.1.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
from functools import lru_cache

import torch
import torch.nn.functional as F

from fastalign.errors import ConfigError

log = logging.getLogger(__name__)

BACKENDS = ("flash_attn", "torch_varlen", "sdpa")
# Names users may know from transformers' `attn_implementation`, mapped to ours.
_ALIASES = {"flash_attention_2": "flash_attn", "varlen": "torch_varlen"}
_HALF_DTYPES = (torch.bfloat16, torch.float16)


@lru_cache(maxsize=1)
def _torch_varlen_attn():
    """torch's varlen_attn and the keyword that makes it causal, or None when this torch lacks it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    # torch 2.10+ takes window_size=(-1, 0) for causal; the first release (2.9) took is_causal.
    if "window_size" in params:
        causal_kwargs = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal_kwargs = {"is_causal": True}
    else:
        return None
    return varlen_attn, causal_kwargs, "enable_gqa" in params


@lru_cache(maxsize=1)
def flash_attn_status():
    """(flash_attn_varlen_func, None) when flash-attn imports for real, else (None, why not).

    Imported, not just looked up: a wheel built against another torch or CUDA is found by
    importlib but fails at import (undefined symbol, wrong libcudart) and would otherwise crash
    the first forward. The reason is logged once; "auto" then falls back to the next backend.
    """
    if importlib.util.find_spec("flash_attn") is None:
        return None, "the flash-attn package is not installed (pip install flash-attn)"
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception as err:  # ImportError, OSError, RuntimeError: whatever a broken build raises
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        reason = f"flash-attn is installed but fails to import ({type(err).__name__}: {detail})"
        log.warning("attention: %s; it will not be used", reason)
        return None, reason
    return flash_attn_varlen_func, None


def _unavailable_reason(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int | None) -> str | None:
    """Why `backend` cannot run with these settings, or None when it can."""
    if backend == "sdpa":
        return None
    if device.type != "cuda":
        return f"needs a CUDA device (the model is on {device.type})"
    if dtype not in _HALF_DTYPES:
        return f"needs bf16 or fp16 (the model computes in {str(dtype).removeprefix('torch.')})"
    if head_dim is not None and (head_dim > 256 or head_dim % 8):
        return f"needs head_dim <= 256 and a multiple of 8 (head_dim is {head_dim})"
    if backend == "flash_attn":
        return flash_attn_status()[1]
    if _torch_varlen_attn() is None:
        return f"this torch ({torch.__version__}) has no torch.nn.attention.varlen.varlen_attn"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "needs a GPU of compute capability 8.0 or newer"
    return None


def available_backends(device, dtype: torch.dtype, head_dim: int | None = None) -> list[str]:
    """The backends that can run on `device` in `dtype`, best first (always ends with "sdpa")."""
    device = torch.device(device)
    return [b for b in BACKENDS if _unavailable_reason(b, device, dtype, head_dim) is None]


def resolve_backend(name: str = "auto", device="cpu", dtype: torch.dtype = torch.float32,
                    head_dim: int | None = None) -> str:
    """Turn an `--attn_implementation` value into a backend that runs here, or say why it cannot.

    "auto" picks the best available backend; a named backend that cannot run is an error (a
    silent fallback would hide a 2-5x slowdown).
    """
    device = torch.device(device)
    wanted = _ALIASES.get(name, name)
    if wanted == "auto":
        return available_backends(device, dtype, head_dim)[0]
    if wanted not in BACKENDS:
        raise ConfigError(f"--attn_implementation: unknown value {name!r}; "
                          f"choose auto, {', '.join(BACKENDS)}")
    reason = _unavailable_reason(wanted, device, dtype, head_dim)
    if reason is not None:
        raise ConfigError(f"--attn_implementation {name}: not available here: {reason}")
    return wanted


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, backend: str, kv_index: torch.Tensor | None = None,
                     cu_seqlens_k: torch.Tensor | None = None, max_seqlen_k: int | None = None) -> torch.Tensor:
    """Causal attention within each packed segment.

    q [T, Hq, D], k and v [T, Hkv, D] with Hq a multiple of Hkv (grouped-query attention);
    cu_seqlens int32 [N+1]; max_seqlen = longest segment. Without `kv_index` each segment attends
    to itself; with it (int64 [Tk]), segment n attends to k/v[kv_index[cu_seqlens_k[n]:
    cu_seqlens_k[n+1]]], causal aligned bottom-right (docs/design.md section 7.1). Returns [T, Hq, D] in
    q's dtype. Scale is 1/sqrt(D).
    """
    if kv_index is None:
        cu_seqlens_k, max_seqlen_k = cu_seqlens, max_seqlen
    else:
        k, v = k.index_select(0, kv_index), v.index_select(0, kv_index)  # [Tk, Hkv, D]
    if backend == "flash_attn":
        flash_attn_varlen_func = flash_attn_status()[0]
        # flash-attn handles Hkv < Hq natively (each K/V head serves Hq/Hkv query heads).
        return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k,
                                      dropout_p=0.0, causal=True)
    if backend == "torch_varlen":
        varlen_attn, causal_kwargs, has_gqa_flag = _torch_varlen_attn()
        if k.shape[1] != q.shape[1]:
            if has_gqa_flag:
                causal_kwargs = {**causal_kwargs, "enable_gqa": True}
            else:
                k, v = _repeat_kv(k, v, q.shape[1])
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k, **causal_kwargs)
    if backend == "sdpa":
        return _sdpa_per_sequence(q, k, v, cu_seqlens, None if kv_index is None else cu_seqlens_k)
    raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")


def _repeat_kv(k: torch.Tensor, v: torch.Tensor, num_q_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expand [T, Hkv, D] K/V to [T, Hq, D]: query head h reads K/V head h // (Hq / Hkv)."""
    groups = num_q_heads // k.shape[1]
    return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)


def keep_sdpa_loop_out_of_compiled_graphs() -> None:
    """Before torch.compile (fastalign.distributed.apply_compile): Dynamo cannot trace a loop whose
    trip count comes from tensor data; keeping the sdpa fallback out of the graph lets a compiled
    decoder layer run it with one graph break instead of failing. Done here, not as a decorator at
    import: `torch.compiler.disable` imports torch._dynamo (seconds; benchmarks/RESULTS.md, "Start-up"), which
    `import fastalign.train` (--help, a refused flag) then does not pay. (Building the model on
    the meta device imports it anyway in torch 2.13: meta ops run torch._refs, which import it.)"""
    global _sdpa_per_sequence
    _sdpa_per_sequence = torch.compiler.disable(_sdpa_loop)


def _sdpa_loop(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
               cu_seqlens_k: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA on each segment's slice: O(sum Lq_i Lk_i) work, no [T, T] mask over the whole pack.

    k, v are the segments' keys/values laid out by `cu_seqlens_k` (None: by `cu_seqlens`).
    """
    lengths = _lengths(cu_seqlens)  # one host sync per layer: acceptable for the fallback
    key_lengths = lengths if cu_seqlens_k is None else _lengths(cu_seqlens_k)
    gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
    outputs = []
    # torch.split, not t[start:end]: its backward concatenates the S per-sequence gradients once,
    # where each slice's backward would write its gradient into a fresh zero [T, H, D] tensor.
    for qi, ki, vi in zip(q.split(lengths), k.split(key_lengths), v.split(key_lengths)):
        # [L, H, D] -> [1, H, L, D]: with the leading batch dimension PyTorch on CPU takes its flash
        # kernel (_scaled_dot_product_flash_attention_for_cpu); 3-D [H, L, D] inputs take the math
        # path (bmm, tril, softmax), several times slower (benchmarks/RESULTS.md, "Where the time goes").
        lq, lk = qi.shape[0], ki.shape[0]
        qi, ki, vi = (t.transpose(0, 1).unsqueeze(0) for t in (qi, ki, vi))
        if lq == lk:
            out = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, **gqa)  # [1, Hq, L, D]
        else:  # bottom-right causal: query i sees keys 0 .. lk - lq + i (SDPA's is_causal is top-left)
            mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
            out = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, **gqa)
        outputs.append(out.squeeze(0).transpose(0, 1))
    return torch.cat(outputs, dim=0)


def _lengths(cu_seqlens: torch.Tensor) -> list[int]:
    bounds = cu_seqlens.tolist()
    return [end - start for start, end in zip(bounds[:-1], bounds[1:])]


_sdpa_per_sequence = _sdpa_loop  # the compile-disabled wrapper once keep_sdpa_loop_out_of_compiled_graphs ran
