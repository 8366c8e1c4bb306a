"""Every attention backend available on this GPU agrees with SDPA in bf16 (run by `make gpu-check`).

Tolerance in the manner of flash-attn's own tests: a backend's error against an fp32 reference may
be at most twice the error of bf16 SDPA against that reference (plus a small floor).
"""

import pytest
import torch

from fastalign.attention import available_backends, varlen_attention
from fastalign.hf_config import LlamaConfig
from fastalign.model import Llama

pytestmark = pytest.mark.gpu
FAST_BACKENDS = ["flash_attn", "torch_varlen"]
LENGTHS = [37, 1, 128, 300, 64, 2]


def require(backend: str, head_dim: int):
    available = available_backends("cuda", torch.bfloat16, head_dim)
    if backend not in available:
        pytest.skip(f"{backend} not available here (available: {available})")


def assert_close_as_sdpa(out, sdpa_bf16, ref_fp32, what):
    err = (out.float() - ref_fp32).abs().max().item()
    sdpa_err = (sdpa_bf16.float() - ref_fp32).abs().max().item()
    assert err <= 2 * sdpa_err + 1e-3 * ref_fp32.abs().max().item(), (what, err, sdpa_err)


def packed_qkv(num_heads, num_kv_heads, head_dim, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    t = sum(LENGTHS)
    q, k, v = (torch.randn(t, h, head_dim, device="cuda", generator=g).to(dtype).requires_grad_()
               for h in (num_heads, num_kv_heads, num_kv_heads))
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    return q, k, v, cu


def forward_backward(backend, q, k, v, cu, grad_out):
    out = varlen_attention(q, k, v, cu, max(LENGTHS), backend)
    out.backward(grad_out.to(out.dtype))
    grads = [t.grad for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    return out.detach(), grads


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("num_kv_heads", [8, 2])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_backend_agrees_with_sdpa_forward_and_backward(backend, num_kv_heads, head_dim):
    require(backend, head_dim)
    q, k, v, cu = packed_qkv(8, num_kv_heads, head_dim, torch.bfloat16)
    grad_out = torch.randn_like(q, dtype=torch.float32)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref_out, ref_grads = forward_backward("sdpa", q32, k32, v32, cu, grad_out)
    sdpa_out, sdpa_grads = forward_backward("sdpa", q, k, v, cu, grad_out)
    out, grads = forward_backward(backend, q, k, v, cu, grad_out)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    assert_close_as_sdpa(out, sdpa_out, ref_out, "out")
    for name, g, sg, rg in zip("qkv", grads, sdpa_grads, ref_grads):
        assert g.shape == rg.shape
        assert_close_as_sdpa(g, sg, rg, f"d{name}")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_model_with_backend_agrees_with_sdpa(backend):
    config = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0)
    require(backend, config.head_dim)
    torch.manual_seed(0)
    model = Llama(config).cuda()
    model.init_weights()
    t = sum(LENGTHS)
    input_ids = torch.randint(0, 1000, (t,), device="cuda")
    position_ids = torch.cat([torch.arange(n, device="cuda") for n in LENGTHS])
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32, device="cuda")

    def run(backend_name, dtype):
        model.to(dtype)
        model.set_attention_backend(backend_name)
        hidden = model(input_ids, position_ids, cu, max(LENGTHS))
        hidden.float().square().mean().backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        return hidden.detach().float(), grads

    ref_hidden, ref_grads = run("sdpa", torch.float32)
    sdpa_hidden, sdpa_grads = run("sdpa", torch.bfloat16)
    hidden, grads = run(backend, torch.bfloat16)
    assert model.attn_backend == backend
    assert_close_as_sdpa(hidden, sdpa_hidden, ref_hidden, "hidden")
    for name in ("layers.0.self_attn.q_proj.weight", "layers.1.self_attn.k_proj.weight", "embed_tokens.weight"):
        assert_close_as_sdpa(grads[name], sdpa_grads[name], ref_grads[name], name)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("num_kv_heads", [8, 2])
def test_backend_runs_shared_prefix_segments_as_sdpa_does(backend, num_kv_heads):
    """Gathered keys (kv_index, cu_seqlens_k != cu_seqlens): the backend's causal alignment must be
    bottom-right, as the SDPA fallback's explicit mask (itself tested against a dense mask on CPU)."""
    from fastalign.data import TokenizedGroup, pack_groups

    require(backend, 64)
    g = torch.Generator().manual_seed(1)
    shapes = [(37, [1, 128, 9]), (1, [300, 2]), (64, [5, 64, 17, 3, 1])]  # (query, response lengths)
    groups = [TokenizedGroup(record_index=i, query_ids=torch.randint(0, 50, (q,), generator=g).tolist(),
                             response_ids=[torch.randint(0, 50, (n,), generator=g).tolist() for n in lengths],
                             scores=[1.0] * len(lengths)) for i, (q, lengths) in enumerate(shapes)]
    batch = pack_groups(groups, share_prefix=True).to("cuda")
    t = batch.num_tokens
    q, k, v = (
        torch.randn(t, h, 64, device="cuda").to(torch.bfloat16).requires_grad_()
        for h in (8, num_kv_heads, num_kv_heads)
    )
    grad_out = torch.randn_like(q, dtype=torch.float32)

    def run(name, q, k, v):
        out = varlen_attention(q, k, v, batch.cu_seqlens, batch.max_seqlen, name, batch.kv_index,
                               batch.cu_seqlens_k, batch.max_seqlen_k)
        grads = torch.autograd.grad(out, (q, k, v), grad_out.to(out.dtype))
        return out.detach(), grads

    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref_out, ref_grads = run("sdpa", q32, k32, v32)
    sdpa_out, sdpa_grads = run("sdpa", q, k, v)
    out, grads = run(backend, q, k, v)
    assert_close_as_sdpa(out, sdpa_out, ref_out, "out")
    for name, got, sdpa, ref in zip("qkv", grads, sdpa_grads, ref_grads):
        assert_close_as_sdpa(got, sdpa, ref, f"d{name}")
