"""PyTorch twin of the fused alignment head (fastalign/kernels/alignment_head.py): same streaming algorithm,
torch ops only. Used on CPU, for backend="torch", and as the Triton path's oracle in tests.

All inputs are already compacted by fastalign/loss.py to the N tokens that have a target (the
`-100` positions cost nothing), sorted by response. Everything is computed in fp32 (bf16/fp16
inputs are upcast one vocabulary slice at a time), so the twin is at least as accurate as the
full-logits computation while never holding more than one [N, C] slice of logits.

Vocabulary streaming (why slices of the vocabulary rather than of the tokens): each slice of
grad_weight rows is then produced by a single GEMM over all tokens and written once, instead of
a [V, H] read-modify-write per token chunk; grad_hidden ([N, H], small) is what accumulates.
"""

from __future__ import annotations

import torch

from fastalign.kernels.group_math import group_math as group_stats  # noqa: F401  (the twin's group step)

# Transient budget for one logits slice [N, C] (plus the fp32 copy of the weight slice [C, H]).
# CPU: 32 MiB; a slice that stays in cache is as fast or faster than a wide one, and the peak
# memory drops by the difference (benchmarks/RESULTS.md, "Where the time goes").
CPU_CHUNK_BYTES = 32 << 20
GPU_CHUNK_BYTES = 256 << 20
MIN_CHUNK_COLUMNS = 128


def vocab_chunk_size(num_tokens: int, vocab: int, hidden: int, logit_bytes: int = 4,
                     budget_bytes: int | None = None, device: torch.device | str = "cpu") -> int:
    """Columns C of one vocabulary slice, from (T, V, H).

    Rule: the largest power of two C with C * (T * logit_bytes + H * 4) <= budget (32 MiB on
    CPU, 256 MiB on CUDA: CPU_CHUNK_BYTES, GPU_CHUNK_BYTES), at least 128 columns (so the GEMMs stay
    efficient; the transient is then max(budget, 128 * (T * logit_bytes + H * 4))) and at most V
    rounded up to a power of two. The H * 4 term is the twin's fp32 copy of the weight slice.
    No term grows with T x V: the slice narrows as T grows.
    """
    if budget_bytes is None:
        budget_bytes = GPU_CHUNK_BYTES if torch.device(device).type == "cuda" else CPU_CHUNK_BYTES
    per_column = max(num_tokens, 1) * logit_bytes + hidden * 4
    columns = max(budget_bytes // per_column, 1)
    columns = 1 << (columns.bit_length() - 1)  # power of two <= budget
    vocab_cap = 1 << max(vocab - 1, 0).bit_length()
    return int(min(max(columns, MIN_CHUNK_COLUMNS), vocab_cap))


def vocab_chunk(num_tokens: int, weight: torch.Tensor) -> int:
    """The twin's slice width: its logits slices are fp32."""
    return vocab_chunk_size(num_tokens, weight.shape[0], weight.shape[1], 4, device=weight.device)


def vocab_slices(vocab: int, chunk: int):
    for start in range(0, vocab, chunk):
        yield start, min(start + chunk, vocab)


def slice_view(buffer: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A contiguous [rows, cols] view of the reusable slice buffer (the last slice is narrower)."""
    return buffer.view(-1)[: rows * cols].view(rows, cols)


def token_logsumexp(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over the vocabulary: per token, logsumexp of its logits and its target logit.

    hidden [N, H], weight [V, H], targets int64 [N] in [0, V). Returns fp32 (lse [N], target [N]).
    """
    num_tokens = hidden.shape[0]
    vocab = weight.shape[0]
    h32 = hidden.float()
    run_max = torch.full((num_tokens,), float("-inf"), device=hidden.device)
    run_sum = torch.zeros(num_tokens, device=hidden.device)
    target_logit = torch.zeros(num_tokens, device=hidden.device)
    buffer = torch.empty(num_tokens * min(chunk, vocab), device=hidden.device)
    for start, stop in vocab_slices(vocab, chunk):
        logits = torch.mm(h32, weight[start:stop].float().T,
                          out=slice_view(buffer, num_tokens, stop - start))  # [N, C] fp32
        in_slice = (targets >= start) & (targets < stop)
        local = (targets - start).clamp(0, stop - start - 1)
        target_logit = torch.where(in_slice, logits.gather(1, local[:, None]).squeeze(1),
                                   target_logit)
        new_max = torch.maximum(run_max, logits.amax(1))
        slice_sum = logits.sub_(new_max[:, None]).exp_().sum(1)  # in place: no second buffer
        run_sum = run_sum * torch.exp(run_max - new_max) + slice_sum
        run_max = new_max
    return run_max + torch.log(run_sum), target_logit


def response_mean(token_values: torch.Tensor, response_ptr: torch.Tensor) -> torch.Tensor:
    """Mean of fp32 token values [N] per response; tokens sorted by response, response r owns
    token_values[ptr[r]:ptr[r+1]] (every response non-empty). An fp64 prefix sum keeps this exact
    to fp32 and deterministic on every device (no scatter atomics)."""
    prefix = torch.zeros(token_values.numel() + 1, dtype=torch.float64, device=token_values.device)
    torch.cumsum(token_values.double(), 0, out=prefix[1:])
    sums = prefix[response_ptr[1:]] - prefix[response_ptr[:-1]]
    counts = (response_ptr[1:] - response_ptr[:-1]).double()
    return (sums / counts).float()


def head_grads(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
               lse: torch.Tensor, token_weight: torch.Tensor,
               chunk: int, weight_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Backward of sum_t token_weight_t * nll_t over the (active) tokens given.

    dZ = w * (softmax - onehot) per slice of recomputed logits; grad_hidden = dZ @ W,
    grad_weight = dZ^T @ hidden. The per-token weight w is a row scale, so it is applied to the
    small [N, H] side (hidden rows before the grad_weight GEMM, grad_hidden rows at the end)
    instead of to every logit: one pass less over each slice.
    Returns (grad_hidden fp32 [N, H], grad_weight [V, H] in weight's dtype; None without
    `weight_grad`: a frozen head (LoRA) skips its GEMMs and its [V, H] buffer).
    """
    num_tokens, hidden_size = hidden.shape
    vocab = weight.shape[0]
    h32 = hidden.float()
    weighted_hidden = h32 * token_weight[:, None]  # [N, H]
    grad_hidden = torch.zeros(num_tokens, hidden_size, device=hidden.device)
    grad_weight = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if weight_grad else None
    buffer = torch.empty(num_tokens * min(chunk, vocab), device=hidden.device)
    for start, stop in vocab_slices(vocab, chunk):
        w_slice = weight[start:stop].float()  # [C, H]
        probs = torch.mm(h32, w_slice.T, out=slice_view(buffer, num_tokens, stop - start))
        probs.sub_(lse[:, None]).exp_()  # softmax slice, [N, C]
        # - onehot: -1 at each target in this slice, -0 (a no-op) elsewhere. A scatter rather than
        # boolean indexing, whose nonzero would be a host sync per slice on CUDA.
        in_slice = (targets >= start) & (targets < stop)
        local = (targets - start).clamp(0, stop - start - 1)
        probs.scatter_add_(1, local[:, None], in_slice.to(probs.dtype).neg_()[:, None])
        if grad_weight is not None and grad_weight.dtype == torch.float32:
            torch.mm(probs.T, weighted_hidden, out=grad_weight[start:stop])
        elif grad_weight is not None:
            grad_weight[start:stop] = torch.mm(probs.T, weighted_hidden)
        grad_hidden.addmm_(probs, w_slice)
    grad_hidden.mul_(token_weight[:, None])
    return grad_hidden, grad_weight
