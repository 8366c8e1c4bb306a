"""Triton kernels for fastalign, each beside a plain-PyTorch twin (used on CPU and as test oracle).

- alignment_head.py        fused Stable Alignment LM head (Triton + cuBLAS slice GEMMs)
- alignment_head_torch.py  its PyTorch twin, and the vocabulary-slice rule both use
- group_math.py            per-group best / margins / penalty / gradient weights (PyTorch; the
                           reference of the Triton group kernel)
fastalign/loss.py drives them (validation, autograd, backend choice). On CPU the Triton kernels
run under TRITON_INTERPRET=1, which compiles nothing; tests/e2e/test_kernels_compile.py compiles them
for sm_80 and sm_90 with Triton's own compiler and ptxas, no GPU needed.

It lives inside the fastalign package: a top-level `kernels` would shadow the hub package of that
import name, which transformers >= 5.25 requires and imports (tests/unit/test_packaging.py).
"""
