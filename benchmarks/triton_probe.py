"""The smallest Triton kernel, for gpu_check's environment stage: its first launch builds Triton's
C launcher (C compiler + Python headers), so a machine that cannot build it fails here, in
seconds, with one cause, instead of in every Triton test and benchmark."""

import torch
import triton
import triton.language as tl


@triton.jit
def _add_one(x_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) + 1.0, mask=mask)


def add_one(x: torch.Tensor) -> torch.Tensor:
    """x + 1 in place for a 1-D float32 tensor of at most 1024 elements (one program)."""
    _add_one[(1,)](x, x.numel(), BLOCK=triton.next_power_of_2(max(x.numel(), 1)))
    return x
