"""Fused Stable Alignment LM head: Triton kernels around cuBLAS slice GEMMs.

Details: docs/design.md section 7.17.
"""

from __future__ import annotations

import logging
import os

import torch
import triton
import triton.language as tl

from fastalign.kernels.alignment_head_torch import slice_view, vocab_chunk_size, vocab_slices
from fastalign.kernels.group_math import GroupLayout, GroupOptions, GroupResult

ROWS_PER_PROGRAM = 4  # lse kernel: rows per program, looping over the slice's columns
LSE_BLOCK_COLS = 1024
GRAD_BLOCK_ROWS = 16  # grad kernel: a 2-D grid of [rows, cols] tiles
GRAD_BLOCK_COLS = 512
RESPONSE_BLOCK = 256
NUM_WARPS = 4  # every kernel; Triton's default, stated so the compile test builds the same thing
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

log = logging.getLogger(__name__)


@triton.jit
def _lse_slice_kernel(logits_ptr, stride_row, n_rows, n_cols, target_ptr, col0,
                      run_max_ptr, run_sum_ptr, target_logit_ptr,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    run_max = tl.load(run_max_ptr + rows, mask=row_ok, other=0.0)
    run_sum = tl.load(run_sum_ptr + rows, mask=row_ok, other=0.0)
    target_logit = tl.load(target_logit_ptr + rows, mask=row_ok, other=0.0)
    target_col = tl.load(target_ptr + rows, mask=row_ok, other=-1) - col0
    row_base = logits_ptr + rows.to(tl.int64)[:, None] * stride_row
    for start in range(0, n_cols, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (cols < n_cols)[None, :]
        z = tl.load(row_base + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(run_max, tl.max(z, 1))  # finite: every block has a real column
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), 1)
        run_max = new_max
        hit = (cols[None, :] == target_col[:, None]) & ok  # a later slice's target is no hit
        target_logit += tl.sum(tl.where(hit, z, 0.0), 1)
    tl.store(run_max_ptr + rows, run_max, mask=row_ok)
    tl.store(run_sum_ptr + rows, run_sum, mask=row_ok)
    tl.store(target_logit_ptr + rows, target_logit, mask=row_ok)


@triton.jit
def _response_mean_kernel(value_ptr, response_ptr, out_ptr, BLOCK: tl.constexpr):
    response = tl.program_id(0)
    lo = tl.load(response_ptr + response)
    hi = tl.load(response_ptr + response + 1)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(lo, hi, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        acc += tl.load(value_ptr + idx, mask=idx < hi, other=0.0)
    tl.store(out_ptr + response, tl.sum(acc, 0) / (hi - lo).to(tl.float32))


@triton.jit
def _group_kernel(slot_ptr, max_size, nll_ptr, score_ptr, loss_ptr, penalty_ptr, best_ptr,
                  dloss_ptr, dpenalty_ptr, inv_groups, rating_scale, margin, ratio,
                  MAX_FLOW: tl.constexpr, SEED_MARGINS: tl.constexpr, BLOCK_K: tl.constexpr):
    group = tl.program_id(0)
    col = tl.arange(0, BLOCK_K)
    response = tl.load(slot_ptr + group * max_size + col, mask=col < max_size, other=-1)
    present = response >= 0
    safe = tl.where(present, response, 0)
    nll = tl.load(nll_ptr + safe, mask=present, other=0.0)
    score = tl.load(score_ptr + safe, mask=present, other=float("-inf"))
    size = tl.sum(present.to(tl.int32), 0)

    s_best = tl.max(score, 0)
    best_slot = tl.min(tl.where(present & (score == s_best), col, BLOCK_K), 0)  # lowest index
    is_best = col == best_slot
    nll_best = tl.sum(tl.where(is_best, nll, 0.0), 0)
    if SEED_MARGINS:
        # ref[p] = p-th largest score (absent slots, -inf, sort last). A bitonic sort keeps the
        # program O(K) in registers; ranking by a [K, K] comparison spilled from K = 256 on.
        ref = tl.sort(score, 0, descending=True)
    else:
        ref = score
    margins = (s_best - ref) / rating_scale * margin
    others = present & (col != best_slot)
    neg = nll_best - nll + margins
    num_others = tl.maximum(size - 1, 1).to(tl.float32)
    if MAX_FLOW:
        neg_masked = tl.where(others, neg, float("-inf"))
        aggregate = tl.max(neg_masked, 0)  # tl.max skips NaN (GPU and interpreter alike) ...
        worst = tl.min(tl.where(others & (neg_masked == aggregate), col, BLOCK_K), 0)
        share = tl.where(col == worst, 1.0, 0.0)
        has_nan = tl.sum(tl.where(others & (neg != neg), 1, 0), 0) > 0
        aggregate = tl.where(has_nan, float("nan"), aggregate)  # ... so a NaN nll is put back
    else:
        aggregate = tl.sum(tl.where(others, neg, 0.0), 0) / num_others  # a NaN term gives NaN
        share = tl.zeros([BLOCK_K], dtype=tl.float32) + 1.0 / num_others
    # propagate_nan: the default maximum (max.f32 / maxnumf) returns the non-NaN operand, which
    # would turn a NaN penalty into 0 and a finite loss, hiding the divergence from the trainer.
    penalty = tl.where(size > 1, tl.maximum(aggregate, 0.0, propagate_nan=tl.PropagateNan.ALL), 0.0)
    active = tl.where(penalty > 0, 1.0, 0.0)
    dpen = tl.where(is_best, active, -active * share)
    dpen = tl.where(others | (is_best & (size > 1)), dpen, 0.0)
    dloss = (tl.where(is_best, 1.0, 0.0) + ratio * dpen) * inv_groups

    tl.store(loss_ptr + group, nll_best + ratio * penalty)
    tl.store(penalty_ptr + group, penalty)
    tl.store(best_ptr + group, tl.sum(tl.where(is_best, response, 0), 0))
    tl.store(dloss_ptr + safe, dloss, mask=present)
    tl.store(dpenalty_ptr + safe, dpen, mask=present)


@triton.jit
def _softmax_grad_slice_kernel(logits_ptr, stride_row, n_rows, n_cols, lse_ptr, target_ptr,
                               weight_ptr, col0, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                               ROUND_TO_BF16: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < n_rows
    ok = row_ok[:, None] & (cols < n_cols)[None, :]
    ptrs = logits_ptr + rows.to(tl.int64)[:, None] * stride_row + cols[None, :]
    z = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    w = tl.load(weight_ptr + rows, mask=row_ok, other=0.0)
    target_col = tl.load(target_ptr + rows, mask=row_ok, other=-1) - col0
    onehot = tl.where(cols[None, :] == target_col[:, None], 1.0, 0.0)
    dz = w[:, None] * (tl.exp(z - lse[:, None]) - onehot)
    if ROUND_TO_BF16:  # interpreter only: its bf16 cast truncates; GPUs round to nearest even
        bits = dz.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        dz = bits.to(tl.float32, bitcast=True)
    tl.store(ptrs, dz.to(logits_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- launch configs
# Constexprs and launch options of each kernel, as the drivers below pass them;
# tests/e2e/test_kernels_compile.py compiles exactly these for sm_80 / sm_90 with the real compiler.


def lse_slice_config() -> dict:
    return dict(BLOCK_R=ROWS_PER_PROGRAM, BLOCK_C=LSE_BLOCK_COLS, num_warps=NUM_WARPS)


def response_mean_config() -> dict:
    return dict(BLOCK=RESPONSE_BLOCK, num_warps=NUM_WARPS)


def group_config(max_group_size: int, opts: GroupOptions) -> dict:
    return dict(MAX_FLOW=opts.max_flow, SEED_MARGINS=opts.margin_mode == "seed",
                BLOCK_K=max(triton.next_power_of_2(max_group_size), 2), num_warps=NUM_WARPS)


def softmax_grad_slice_config(logits_dtype: torch.dtype) -> dict:
    return dict(BLOCK_R=GRAD_BLOCK_ROWS, BLOCK_C=GRAD_BLOCK_COLS,
                ROUND_TO_BF16=_INTERPRETED and logits_dtype == torch.bfloat16,
                num_warps=NUM_WARPS)


# ----------------------------------------------------------------------------- drivers


def vocab_chunk(num_tokens: int, weight: torch.Tensor) -> int:
    """Slice width: logits slices are held in the input dtype (bf16 -> 2 bytes per logit)."""
    return vocab_chunk_size(num_tokens, weight.shape[0], weight.shape[1], weight.element_size(),
                            device=weight.device)


def token_logsumexp(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [N, H], weight [V, H], targets int64 [N] -> fp32 (lse [N], target logit [N])."""
    num_tokens, vocab = hidden.shape[0], weight.shape[0]
    run_max = torch.full((num_tokens,), float("-inf"), device=hidden.device)
    run_sum = torch.zeros(num_tokens, device=hidden.device)
    target_logit = torch.zeros(num_tokens, device=hidden.device)
    buffer = torch.empty(num_tokens * min(chunk, vocab), dtype=hidden.dtype, device=hidden.device)
    grid = (triton.cdiv(num_tokens, ROWS_PER_PROGRAM),)
    for start, stop in vocab_slices(vocab, chunk):
        logits = torch.mm(hidden, weight[start:stop].T,
                          out=slice_view(buffer, num_tokens, stop - start))  # [N, C]
        _lse_slice_kernel[grid](logits, logits.stride(0), num_tokens, stop - start, targets, start,
                                run_max, run_sum, target_logit, **lse_slice_config())
    return run_max + torch.log(run_sum), target_logit


def response_mean(token_values: torch.Tensor, response_ptr: torch.Tensor) -> torch.Tensor:
    """Mean of fp32 token values [N] per response (tokens sorted by response, none empty)."""
    num_responses = response_ptr.numel() - 1
    out = torch.empty(num_responses, dtype=torch.float32, device=token_values.device)
    _response_mean_kernel[(num_responses,)](token_values.contiguous(), response_ptr, out,
                                           **response_mean_config())
    return out


def group_stats(nll: torch.Tensor, scores: torch.Tensor, layout: GroupLayout,
                opts: GroupOptions) -> GroupResult:
    """fastalign.kernels.group_math.group_math as one Triton program per group."""
    num_groups, max_size = layout.num_groups, layout.max_group_size
    device = nll.device
    loss = torch.empty(num_groups, dtype=torch.float32, device=device)
    penalty = torch.empty_like(loss)
    best = torch.empty(num_groups, dtype=torch.int64, device=device)
    dloss = torch.zeros_like(nll, dtype=torch.float32)
    dpen = torch.zeros_like(dloss)
    _group_kernel[(num_groups,)](
        layout.slot_response.contiguous(), max_size, nll.float().contiguous(),
        scores.float().contiguous(), loss, penalty, best, dloss, dpen, 1.0 / num_groups,
        opts.rating_scale, opts.margin, opts.ratio, **group_config(max_size, opts))
    return GroupResult(loss_per_group=loss, penalty=penalty, best=best, dloss_dnll=dloss,
                       dpenalty_dnll=dpen)


def head_grads(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
               lse: torch.Tensor, token_weight: torch.Tensor,
               chunk: int, weight_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Backward of sum_t w_t * nll_t -> (grad_hidden fp32 [N, H], grad_weight [V, H] in W's dtype;
    None without `weight_grad`: a frozen head (LoRA) skips its GEMMs and its [V, H] buffer)."""
    num_tokens, hidden_size = hidden.shape
    vocab = weight.shape[0]
    grad_hidden = torch.zeros(num_tokens, hidden_size, dtype=torch.float32, device=hidden.device)
    grad_weight = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if weight_grad else None
    buffer = torch.empty(num_tokens * min(chunk, vocab), dtype=hidden.dtype, device=hidden.device)
    token_weight = token_weight.float().contiguous()
    for start, stop in vocab_slices(vocab, chunk):
        w_slice = weight[start:stop]  # [C, H]
        dz = torch.mm(hidden, w_slice.T, out=slice_view(buffer, num_tokens, stop - start))
        grid = (triton.cdiv(num_tokens, GRAD_BLOCK_ROWS), triton.cdiv(stop - start, GRAD_BLOCK_COLS))
        _softmax_grad_slice_kernel[grid](dz, dz.stride(0), num_tokens, stop - start, lse, targets,
                                         token_weight, start,
                                         **softmax_grad_slice_config(hidden.dtype))
        if grad_weight is not None:
            torch.mm(dz.T, hidden, out=grad_weight[start:stop])  # each row block written once
        grad_hidden = _add_product_fp32(grad_hidden, dz, w_slice)
    return grad_hidden, grad_weight


# Per device type: does `torch.mm(bf16, bf16, out_dtype=torch.float32)` run (CUDA, torch >= 2.8)?
# Probed once on a 1x1 product, so that a later failure of the real GEMM (out of memory, an
# earlier kernel's error) is raised as what it is, never taken for a missing op.
_FP32_OUT_GEMM: dict[str, bool] = {}


def _fp32_out_gemm_runs(a: torch.Tensor) -> bool:
    device = a.device.type
    if device not in _FP32_OUT_GEMM:
        probe = torch.ones(1, 1, dtype=a.dtype, device=a.device)
        try:
            torch.mm(probe, probe, out_dtype=torch.float32)
            _FP32_OUT_GEMM[device] = True
        except torch.OutOfMemoryError:  # a RuntimeError too: never taken for a missing op
            raise
        except (TypeError, NotImplementedError, RuntimeError) as err:  # this torch lacks the op
            _FP32_OUT_GEMM[device] = False  # CPU (interpreter tests): the op is CUDA-only
            log.warning("grad_hidden: torch %s cannot run a %s GEMM with an fp32 output on %s "
                        "(%s: %s); using fp32 copies of each vocabulary slice instead (same "
                        "result, slower)", torch.__version__, a.dtype, device,
                        type(err).__name__, str(err).splitlines()[0] if str(err) else "")
    return _FP32_OUT_GEMM[device]


def _add_product_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc + a @ b in fp32 (acc fp32 [N, H], a [N, C], b [C, H]) without rounding each slice's
    product to a's dtype: with one bf16 partial per vocabulary slice, grad_hidden would be less
    accurate than plain bf16 PyTorch, which rounds once after a single GEMM over the vocabulary.

    Preferred: a bf16 GEMM with an fp32 output (cuBLAS, fp32 C). Otherwise fp32 copies of the
    slice, which give the same exact fp32 sum at the cost of a copy and an fp32 GEMM.
    """
    if a.dtype == torch.float32:
        return acc.addmm_(a, b)
    if _fp32_out_gemm_runs(a):
        return acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    return acc.addmm_(a.float(), b.float())
