"""Where a test runs the Triton kernels, on any machine the suite runs on.

On a machine without CUDA, tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported,
and the kernels run on CPU tensors under the interpreter. On a CUDA machine the interpreter is
off (the `gpu` tests compile the kernels for real in the same process), so the same tests run
the kernels compiled, on CUDA tensors. With neither (interpreter off, no CUDA), Triton cases skip.
"""

from __future__ import annotations

import os

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_DEVICE = "cpu" if INTERPRETED else ("cuda" if torch.cuda.is_available() else None)


def triton_device() -> str:
    """The device for Triton inputs here, or skip the calling test."""
    if TRITON_DEVICE is None:
        pytest.skip("Triton needs CUDA, or TRITON_INTERPRET=1 set before triton is imported")
    return TRITON_DEVICE


def to_device(tree, device):
    """Tensors of a dict/tuple/list (or a tensor) moved to `device`; everything else as is."""
    if isinstance(tree, torch.Tensor):
        return tree.to(device)
    if isinstance(tree, dict):
        return {k: to_device(v, device) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_device(v, device) for v in tree)
    return tree
