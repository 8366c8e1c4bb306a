"""fastalign.loss.stable_alignment_loss against the full-logits oracle (tests/helpers/loss_oracle.py).

Both backends run here: "torch" (the twin) and "triton" (on CPU under TRITON_INTERPRET=1, set by
conftest.py; shapes stay small because the interpreter is slow; on a CUDA machine the same cases
run compiled on CUDA tensors, see tests/helpers/devices.py). TestGPU repeats the checks compiled for real
on CUDA, plus production-size shapes.
"""

from __future__ import annotations

import collections
import contextlib
import math

import pytest
import torch
from helpers.devices import to_device, triton_device
from helpers.loss_oracle import oracle_alignment_loss, oracle_group_loss
from torch.utils._python_dispatch import TorchDispatchMode

from fastalign import loss as loss_module
from fastalign.errors import FastalignError
from fastalign.kernels import alignment_head_torch
from fastalign.kernels.alignment_head_torch import vocab_chunk_size
from fastalign.kernels.group_math import GroupOptions, GroupResult, build_group_layout, group_math
from fastalign.loss import LossInputError, stable_alignment_loss

try:
    from fastalign.kernels import alignment_head as triton_head
except ImportError:  # no triton on this platform: the triton cases skip
    triton_head = None

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    triton_head is None, reason="triton not importable"))]


# ----------------------------------------------------------------------------- batches


def make_batch(group_sizes, hidden_size, vocab, *, num_tokens=None, seed=0, dtype=torch.float32,
               device="cpu", scale=1.0, scores=None, easy_best=(), hard_best=()):
    """A packed batch like fastalign.data.pack_groups makes: one sequence per response, each a
    query (targets -100 except its last position) followed by response tokens (last -100).

    easy_best: groups whose best response's targets are the argmax tokens (low NLL, so the
    penalty is inactive); hard_best: groups whose *other* responses get the argmax tokens (penalty
    active). num_tokens fixes T exactly (sequence lengths are split to sum to it).
    """
    gen = torch.Generator().manual_seed(seed)
    num_responses = sum(group_sizes)
    group_index = torch.repeat_interleave(torch.arange(len(group_sizes)), torch.tensor(group_sizes))
    if scores is None:
        scores = torch.randint(1, 8, (num_responses,), generator=gen).float()
    scores = torch.as_tensor(scores, dtype=torch.float32)
    if num_tokens is None:
        lengths = torch.randint(4, 10, (num_responses,), generator=gen)
    else:
        lengths = torch.full((num_responses,), num_tokens // num_responses)
        lengths[: num_tokens % num_responses] += 1
    assert int(lengths.min()) >= 3, "each sequence needs a query token and a response token"
    response_index = torch.repeat_interleave(torch.arange(num_responses), lengths)
    total = int(lengths.sum())
    # On a GPU the big tensors are drawn there (a [128256, 4096] weight is 2 GiB of fp32 draws).
    big_gen = gen if torch.device(device).type == "cpu" else torch.Generator(device).manual_seed(seed)
    hidden = torch.randn(total, hidden_size, generator=big_gen, device=device) * scale
    weight = torch.randn(vocab, hidden_size, generator=big_gen, device=device) * (2.0 / math.sqrt(hidden_size))
    targets = torch.randint(0, vocab, (total,), generator=gen)
    argmax_tokens = (hidden @ weight.T).argmax(1).cpu() if (easy_best or hard_best) else None
    starts = torch.cumsum(lengths, 0) - lengths
    for r in range(num_responses):
        s, n = int(starts[r]), int(lengths[r])
        query = max(1, n // 3)
        targets[s: s + query - 1] = -100  # query positions before the last one
        targets[s + n - 1] = -100  # the last position predicts nothing in this sequence
        g = int(group_index[r])
        members = (group_index == g).nonzero().squeeze(1)
        best = int(members[torch.argmax(scores[members])])
        if (g in easy_best and r == best) or (g in hard_best and r != best):
            span = slice(s + query - 1, s + n - 1)
            targets[span] = argmax_tokens[span]
    batch = dict(hidden=hidden.to(dtype), weight=weight.to(dtype), targets=targets,
                 response_index=response_index, scores=scores, group_index=group_index)
    return {k: v.to(device) for k, v in batch.items()}


def run_fused(batch, backend, grad_mix=None, **opts):
    """Loss, nll, penalty, best and grads of (loss + mix . nll + mix' . penalty), on the batch's device.

    The triton backend runs where tests/helpers/devices.py says (CPU under the interpreter, else CUDA).
    """
    if backend == "triton":
        device = triton_device()
        return to_device(_run_fused(to_device(batch, device), backend, to_device(grad_mix, device),
                                    **opts), batch["hidden"].device)
    return _run_fused(batch, backend, grad_mix, **opts)


def _run_fused(batch, backend, grad_mix, **opts):
    hidden = batch["hidden"].detach().clone().requires_grad_(True)
    weight = batch["weight"].detach().clone().requires_grad_(True)
    out = stable_alignment_loss(hidden, weight, batch["targets"], batch["response_index"],
                                batch["scores"], batch["group_index"], backend=backend, **opts)
    _backward(out.loss, out.nll, out.penalty, grad_mix)
    return dict(loss=out.loss.detach(), nll=out.nll.detach(), penalty=out.penalty.detach(),
                best=out.best, grad_hidden=hidden.grad, grad_weight=weight.grad)


def run_oracle(batch, grad_mix=None, logits_dtype=None, **opts):
    hidden = batch["hidden"].detach().clone().requires_grad_(True)
    weight = batch["weight"].detach().clone().requires_grad_(True)
    loss, nll, penalty, best = oracle_alignment_loss(
        hidden, weight, batch["targets"], batch["response_index"], batch["scores"],
        batch["group_index"], logits_dtype=logits_dtype, **opts)
    _backward(loss, nll, penalty, grad_mix)
    return dict(loss=loss.detach(), nll=nll.detach(), penalty=penalty.detach(), best=best,
                grad_hidden=hidden.grad, grad_weight=weight.grad)


def _backward(loss, nll, penalty, grad_mix):
    total = loss
    if grad_mix is not None:
        nll_mix, penalty_mix = grad_mix
        total = total + (nll * nll_mix.to(nll.device)).sum() + (penalty * penalty_mix.to(nll.device)).sum()
    total.backward()


def assert_matches(got, want, rtol=2e-5, atol=2e-6):
    assert torch.equal(got["best"].cpu(), want["best"].cpu())
    for key in ("loss", "nll", "penalty"):
        torch.testing.assert_close(got[key].float().cpu(), want[key].float().cpu(), rtol=rtol,
                                   atol=atol, msg=lambda m, key=key: f"{key}: {m}")
    for key in ("grad_hidden", "grad_weight"):
        g, w = got[key].float().cpu(), want[key].float().cpu()
        scale = w.abs().max().item()
        torch.testing.assert_close(g, w, rtol=rtol * 10, atol=atol + 5e-6 * scale,
                                   msg=lambda m, key=key: f"{key}: {m}")


def errors_vs(reference, got):
    """Max abs error of each output against the fp32 reference, computed where `got` lives."""
    return {k: (got[k].float() - reference[k].float().to(got[k].device)).abs().max().item()
            for k in ("loss", "nll", "penalty", "grad_hidden", "grad_weight")}


# ----------------------------------------------------------------------------- fp32 vs oracle


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_flow", [False, True])
@pytest.mark.parametrize("margin_mode", ["paper", "seed"])
def test_fp32_matches_oracle_k1_to_8(backend, max_flow, margin_mode):
    # groups of every size 1..8 in one call; penalty active in some groups, inactive in others
    batch = make_batch([3, 1, 8, 2, 5, 4, 7, 6], 31, 123, seed=1, easy_best=(0, 3, 4),
                       hard_best=(2, 5, 6, 7))
    gen = torch.Generator().manual_seed(5)
    mix = (torch.randn(36, generator=gen), torch.randn(8, generator=gen))
    opts = dict(max_flow=max_flow, margin_mode=margin_mode, ratio=0.7, margin=1.5)
    want = run_oracle(batch, grad_mix=mix, **opts)
    got = run_fused(batch, backend, grad_mix=mix, **opts)
    assert_matches(got, want)
    active = want["penalty"] > 0
    assert bool(active.any()) and bool((~active[[0, 3, 4]]).all()), "batch must mix both cases"


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_T47_H31_V123(backend):
    batch = make_batch([2, 3, 1], 31, 123, num_tokens=47, seed=2)
    assert batch["hidden"].shape == (47, 31)
    assert_matches(run_fused(batch, backend), run_oracle(batch))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_V32003_single_and_many_slices(backend, monkeypatch):
    batch = make_batch([3, 2], 31, 32003, num_tokens=47, seed=3, hard_best=(0,))
    want = run_oracle(batch)
    assert_matches(run_fused(batch, backend), want)
    if backend == "torch":  # a small budget: 16 slices of 2048 columns, the last one partial
        monkeypatch.setattr(alignment_head_torch, "CPU_CHUNK_BYTES", 2048 * (47 * 4 + 31 * 4))
        assert vocab_chunk_size(47, 32003, 31) == 2048
        assert_matches(run_fused(batch, backend), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_slices_partial_last(backend, monkeypatch):
    # 128-column slices over V = 1000: 8 slices, the last one 104 columns wide
    batch = make_batch([2, 3], 17, 1000, seed=4, hard_best=(1,))
    monkeypatch.setattr(alignment_head_torch, "CPU_CHUNK_BYTES", 1)
    assert vocab_chunk_size(40, 1000, 17) == 128
    assert_matches(run_fused(batch, backend, max_flow=True), run_oracle(batch, max_flow=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_in_ratings(backend):
    # best score tied (lowest index wins), ties among the others, and an all-equal group
    scores = [5, 7, 7, 3, 3, 4, 4, 4, 2, 6, 6]
    batch = make_batch([4, 4, 3], 19, 97, seed=6, scores=scores, hard_best=(0, 1, 2))
    for max_flow in (False, True):
        for margin_mode in ("paper", "seed"):
            opts = dict(max_flow=max_flow, margin_mode=margin_mode)
            got = run_fused(batch, backend, **opts)
            assert got["best"].tolist() == [1, 5, 9]
            assert_matches(got, run_oracle(batch, **opts))


@pytest.mark.parametrize("backend", BACKENDS)
def test_unsorted_groups_and_responses(backend):
    # groups interleaved in response order and responses interleaved in token order
    batch = make_batch([2, 3, 2], 13, 61, seed=7, hard_best=(1,))
    batch["group_index"] = torch.tensor([2, 0, 1, 2, 1, 0, 1])
    perm = torch.randperm(batch["targets"].numel(), generator=torch.Generator().manual_seed(0))
    for key in ("hidden", "targets", "response_index"):
        batch[key] = batch[key][perm]
    assert_matches(run_fused(batch, backend), run_oracle(batch))


# ----------------------------------------------------------------------------- group math


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_margins_reproduce_original_indexing(backend):
    # ratings [3, 7, 5] sort to [7, 5, 3]: response 0 (rated 3) is paired with 7 -> margin 0,
    # response 2 (rated 5) with 3 -> margin 4/7. Paper margins are 4/7 and 2/7.
    nll = torch.tensor([1.2, 1.0, 1.5])
    scores = torch.tensor([3.0, 7.0, 5.0])
    layout = build_group_layout(torch.zeros(3, dtype=torch.int64), 1)
    stats = group_math if backend == "torch" else triton_group_stats
    expected = {  # (margin_mode, max_flow) -> penalty
        ("seed", True): 1.0 - 1.5 + 4 / 7,  # response 2 is the worst
        ("seed", False): 0.0,  # mean(-0.2, 0.0714) < 0
        ("paper", True): 1.0 - 1.2 + 4 / 7,  # response 0 is the worst
        ("paper", False): ((1.0 - 1.2 + 4 / 7) + (1.0 - 1.5 + 2 / 7)) / 2,
    }
    for (mode, max_flow), penalty in expected.items():
        opts = GroupOptions(rating_scale=7.0, margin=1.0, ratio=0.5, max_flow=max_flow,
                            margin_mode=mode)
        out = stats(nll, scores, layout, opts)
        assert out.best.tolist() == [1]
        assert out.penalty.item() == pytest.approx(penalty, abs=1e-6)
        assert out.loss_per_group.item() == pytest.approx(1.0 + 0.5 * penalty, abs=1e-6)
        active = float(penalty > 0)
        if max_flow:
            worst = 2 if mode == "seed" else 0
            want = [0.0, 0.0, 0.0]
            want[worst] = -0.5 * active
        else:
            want = [-0.5 * active / 2, 0.0, -0.5 * active / 2]
        want[1] = 1.0 + 0.5 * active
        torch.testing.assert_close(out.dloss_dnll, torch.tensor(want))


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_math_random_groups_vs_oracle(backend):
    # many random groups (sizes 1..8, integer ratings so ties are common, NLLs close enough that
    # penalties are both active and inactive): values, and d loss / d nll against autograd
    stats = group_math if backend == "torch" else triton_group_stats
    gen = torch.Generator().manual_seed(21)
    seen_active = seen_inactive = 0
    for trial in range(12):
        sizes = torch.randint(1, 9, (6,), generator=gen).tolist()
        group_index = torch.repeat_interleave(torch.arange(6), torch.tensor(sizes))
        group_index = group_index[torch.randperm(len(group_index), generator=gen)]  # interleaved
        scores = torch.randint(1, 8, (len(group_index),), generator=gen).float()
        nll = (2.0 + 0.3 * torch.randn(len(group_index), generator=gen)).requires_grad_(True)
        opts = GroupOptions(rating_scale=7.0, margin=1.0, ratio=0.3, max_flow=trial % 2 == 1,
                            margin_mode="seed" if trial % 4 >= 2 else "paper")
        loss, penalty, best = oracle_group_loss(nll, scores, group_index, **vars(opts))
        (dloss,) = torch.autograd.grad(loss, nll)
        out = stats(nll.detach(), scores, build_group_layout(group_index, 6), opts)
        assert out.best.tolist() == best.tolist()
        torch.testing.assert_close(out.penalty, penalty.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out.loss_per_group.mean(), loss.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out.dloss_dnll, dloss, rtol=1e-6, atol=1e-7)
        seen_active += int((penalty > 0).sum())
        seen_inactive += int((penalty == 0).sum())
    assert seen_active > 10 and seen_inactive > 10


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_flow", [False, True])
@pytest.mark.parametrize("nan_at", [0, 2])  # a non-best response, the best one
def test_nan_nll_gives_nan_loss_and_penalty(backend, max_flow, nan_at):
    # The trainer stops on a non-finite loss; a NaN nll must never come out as penalty 0 and a
    # finite loss (a NaN-dropping max: the GPU's max.f32, the interpreter's tl.max alike).
    stats = group_math if backend == "torch" else triton_group_stats
    nll = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5])
    nll[nan_at] = float("nan")
    scores = torch.tensor([5.0, 2.0, 7.0, 6.0, 1.0])  # group 0: responses 0-2 (best 2), group 1: 3-4
    layout = build_group_layout(torch.tensor([0, 0, 0, 1, 1]), 2)
    out = stats(nll, scores, layout, GroupOptions(ratio=0.5, max_flow=max_flow))
    assert torch.isnan(out.penalty[0]) and torch.isnan(out.loss_per_group[0])
    assert torch.isfinite(out.penalty[1]) and torch.isfinite(out.loss_per_group[1])  # the other group
    assert out.best.tolist() == [2, 3]


def test_nan_hidden_state_gives_a_nan_loss_on_both_backends():
    for backend in ("torch", "triton") if triton_head is not None else ("torch",):
        batch = make_batch([3, 2], 16, 90, seed=19)
        others = (batch["response_index"] == 1) & (batch["targets"] != -100)  # a scored token of a
        # response of group 0 that is not its best...
        if int(batch["scores"][1]) == int(batch["scores"][:3].max()):
            batch["scores"][1] = 0.5  # ... made sure of
        batch["hidden"][others.nonzero()[0]] = float("nan")
        got = run_fused(batch, backend)
        assert torch.isnan(got["loss"]), backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_response_groups_have_no_penalty(backend):
    batch = make_batch([1, 1], 11, 50, seed=8)
    got = run_fused(batch, backend, max_flow=True)
    assert got["penalty"].tolist() == [0.0, 0.0]
    assert_matches(got, run_oracle(batch, max_flow=True))


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("backend", BACKENDS)
def test_inactive_penalty_responses_and_ignored_positions_get_no_gradient(backend):
    batch = make_batch([3, 3], 23, 89, seed=9, easy_best=(0,), hard_best=(1,))
    got = run_fused(batch, backend)
    assert got["penalty"][0] == 0 and got["penalty"][1] > 0
    grad_rows = got["grad_hidden"].abs().sum(1)
    best0 = int(got["best"][0])
    skipped = (batch["group_index"][batch["response_index"]] == 0) & (batch["response_index"] != best0)
    ignored = batch["targets"] == -100
    assert bool((grad_rows[skipped | ignored] == 0).all())
    assert bool((grad_rows[~(skipped | ignored)] > 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [3e3, 1e-4])
def test_extreme_logits_stay_finite(backend, scale):
    # |logits| ~ 1e4 (exp overflows without the running max) and ~1e-4 (near-uniform softmax)
    batch = make_batch([3, 2], 16, 300, seed=10, scale=scale)
    got = run_fused(batch, backend)
    for key in ("loss", "nll", "penalty", "grad_hidden", "grad_weight"):
        assert bool(torch.isfinite(got[key]).all()), key
    assert_matches(got, run_oracle(batch), rtol=1e-5, atol=1e-5 * max(scale, 1.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    batch = make_batch([4, 2], 29, 700, seed=11, hard_best=(0,))
    first, second = run_fused(batch, backend), run_fused(batch, backend)
    for key in first:
        assert torch.equal(first[key], second[key]), key


# ----------------------------------------------------------------------------- low precision


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab,slice_budget", [(123, None), (32003, None), (2000, 1)])
def test_low_precision_no_worse_than_plain_torch(backend, dtype, vocab, slice_budget, monkeypatch):
    # slice_budget 1: the smallest slices (128 columns, 16 of them), so grad_hidden accumulates
    # over many slices (it must not round each slice's product to bf16)
    if slice_budget is not None:
        monkeypatch.setattr(alignment_head_torch, "CPU_CHUNK_BYTES", slice_budget)
    batch = make_batch([3, 4, 1], 64, vocab, num_tokens=47, seed=12, dtype=dtype, hard_best=(1,))
    batch32 = dict(batch, hidden=batch["hidden"].float(), weight=batch["weight"].float())
    reference = run_oracle(batch32)
    plain = errors_vs(reference, run_oracle(batch, logits_dtype=dtype))
    fused = run_fused(batch, backend)
    assert fused["grad_hidden"].dtype == dtype and fused["grad_weight"].dtype == dtype
    got = errors_vs(reference, fused)
    for key, err in got.items():
        ref_scale = reference[key].abs().max().item()
        assert err <= 1.1 * plain[key] + 1e-4 * ref_scale + 1e-6, (key, err, plain[key])


@pytest.mark.parametrize("backend", BACKENDS)
def test_hidden_in_another_dtype_is_cast_to_the_lm_head_dtype(backend):
    batch = make_batch([2, 3], 16, 200, seed=18, dtype=torch.bfloat16)
    if backend == "triton":
        batch = to_device(batch, triton_device())
    hidden32 = batch["hidden"].float().requires_grad_(True)
    weight = batch["weight"].detach().clone().requires_grad_(True)
    out = stable_alignment_loss(hidden32, weight, batch["targets"], batch["response_index"],
                                batch["scores"], batch["group_index"], backend=backend)
    out.loss.backward()
    same = run_fused(batch, backend)  # hidden already bf16: the same computation
    assert hidden32.grad.dtype == torch.float32 and weight.grad.dtype == torch.bfloat16
    assert torch.equal(out.loss.detach().cpu(), same["loss"])
    assert torch.equal(hidden32.grad.cpu(), same["grad_hidden"].float())
    assert torch.equal(weight.grad.cpu(), same["grad_weight"])


# ----------------------------------------------------------------------------- errors


def triton_group_stats(nll, scores, layout, opts):
    """The Triton group kernel on the device tests/helpers/devices.py picks; results back on CPU."""
    device = triton_device()
    layout = type(layout)(**{k: v.to(device) for k, v in vars(layout).items()})
    out = triton_head.group_stats(nll.to(device), scores.to(device), layout, opts)
    return GroupResult(**to_device(vars(out), "cpu"))


def _call(batch, **kw):
    return stable_alignment_loss(batch["hidden"], batch["weight"], batch["targets"],
                                 batch["response_index"], batch["scores"], batch["group_index"], **kw)


@pytest.mark.parametrize("bad_id", [123, 5000, -5])
def test_out_of_range_target_is_a_clear_error(bad_id):
    batch = make_batch([2], 8, 123, seed=13)
    pos = int((batch["targets"] != -100).nonzero()[1])
    batch["targets"][pos] = bad_id
    with pytest.raises(LossInputError, match=rf"targets\[{pos}\] = {bad_id} is out of range "
                                             r"for a vocabulary of 123 tokens"):
        _call(batch)


def test_response_without_target_tokens_names_it():
    batch = make_batch([2, 2], 8, 50, seed=14)
    batch["targets"][batch["response_index"] == 2] = -100
    with pytest.raises(LossInputError, match=r"response 2 \(group 1\) has no target tokens"):
        _call(batch)


def test_shape_and_dtype_mismatches_are_clear_errors():
    batch = make_batch([2], 8, 50, seed=15)
    with pytest.raises(LossInputError, match="hidden size mismatch"):
        _call(dict(batch, weight=batch["weight"][:, :7]))
    with pytest.raises(LossInputError, match=r"group_index must be \[S\] with S = len\(scores\)"):
        _call(dict(batch, scores=batch["scores"][:1]))
    with pytest.raises(LossInputError, match="must be float tensors"):
        _call(dict(batch, hidden=batch["hidden"].long()))
    with pytest.raises(LossInputError, match="group 1 has no responses"):
        _call(dict(batch, group_index=torch.tensor([0, 2])))
    with pytest.raises(LossInputError, match="margin_mode"):
        _call(batch, margin_mode="orig")
    assert issubclass(LossInputError, FastalignError) and issubclass(LossInputError, ValueError)


@pytest.mark.parametrize("num_groups", [None, 2])
@pytest.mark.parametrize("problem,message", [
    ("nan_score", r"scores\[3\] = nan is not a finite number"),
    ("negative_group", r"group_index\[1\] = -1 is negative"),
    ("bad_response", r"response_index\[\d+\] = 4 is out of range for 4 responses"),
    ("empty_group", r"group 1 has no responses \(groups must be numbered 0..G-1 without gaps; "
                    r"G = 2\)"),
])
def test_each_input_check_names_its_problem(problem, message, num_groups):
    # every check is one flag of the single validation read; each still gets its own message
    batch = make_batch([2, 2], 8, 50, seed=19)
    if problem == "nan_score":
        batch["scores"][3] = float("nan")
    elif problem == "negative_group":
        batch["group_index"][1] = -1
    elif problem == "bad_response":
        pos = int((batch["targets"] != -100).nonzero()[-1])
        batch["response_index"][pos] = 4
    else:  # group 1 empty: only group 0 is left (G = 2 must be given or implied by a gap)
        batch["group_index"] = torch.tensor([0, 0, 0, 0]) if num_groups else torch.tensor([0, 0, 2, 2])
        message = message if num_groups else message.replace("G = 2", "G = 3")
    with pytest.raises(LossInputError, match=message):
        _call(batch, num_groups=num_groups)


def test_num_groups_is_checked_against_group_index():
    batch = make_batch([2, 3, 1], 8, 50, seed=20, hard_best=(1,))
    got = run_fused(batch, "torch")
    hidden = batch["hidden"].detach().clone().requires_grad_(True)
    out = stable_alignment_loss(hidden, batch["weight"], batch["targets"], batch["response_index"],
                                batch["scores"], batch["group_index"], num_groups=3)
    out.loss.backward()
    assert torch.equal(out.loss.detach(), got["loss"]) and torch.equal(out.best, got["best"])
    assert torch.equal(hidden.grad, got["grad_hidden"])
    with pytest.raises(LossInputError, match=r"group_index\[5\] = 2 is out of range for "
                                             r"num_groups = 2"):
        _call(batch, num_groups=2)
    with pytest.raises(LossInputError, match=r"group 3 has no responses .*G = 4\)"):
        _call(batch, num_groups=4)
    for bad in (0, True, 2.0):
        with pytest.raises(LossInputError, match="num_groups must be a positive int"):
            _call(batch, num_groups=bad)


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    batch = make_batch([2], 8, 50, seed=16)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(LossInputError, match="TRITON_INTERPRET=1"):
        _call(batch, backend="triton")


# ----------------------------------------------------------------------------- host syncs

_ATEN = torch.ops.aten
# Ops that make the host wait for the device on CUDA: scalar reads (.item(), int(), bool()) and
# ops whose output shape depends on values (bincount reads max/min on CUDA).
_SYNCING_OPS = {_ATEN._local_scalar_dense.default, _ATEN.nonzero.default, _ATEN.bincount.default,
                _ATEN.masked_select.default, _ATEN.equal.default, _ATEN.is_nonzero.default,
                _ATEN.repeat_interleave.Tensor, _ATEN._unique2.default,
                _ATEN.unique_consecutive.default, _ATEN.unique_dim.default}
# Indexing ops that run a nonzero when an index is a boolean mask.
_INDEX_OPS = {_ATEN.index.Tensor, _ATEN.index_put.default, _ATEN.index_put_.default,
              _ATEN._index_put_impl_.default}


class HostSyncCounter(TorchDispatchMode):
    """Counts what would be a device->host sync on CUDA, on any device (here: CPU, where nothing
    actually waits): syncing aten ops, boolean-mask indexing, and whole-tensor reads (.tolist(),
    .cpu(), .numpy(), which dispatch nothing for a CPU tensor, so they are patched in by the
    `host_syncs` fixture). Anything run under `paused()` is not counted."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self.counting = True

    @contextlib.contextmanager
    def paused(self):
        self.counting, before = False, self.counting
        try:
            yield
        finally:
            self.counting = before

    def total(self) -> int:
        return sum(self.counts.values())

    def record(self, name: str) -> None:
        if self.counting:
            self.counts[name] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _SYNCING_OPS:
            self.record(str(func))
        elif func in _INDEX_OPS and any(
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                for i in args[1] if i is not None):
            self.record(f"{func}[boolean mask]")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def host_syncs(monkeypatch):
    """A HostSyncCounter whose .tolist() / .cpu() / .numpy() reads are counted while it is active."""
    counter = HostSyncCounter()
    for name in ("tolist", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            if counter in torch.utils._python_dispatch._get_current_dispatch_mode_stack():
                counter.record(f"Tensor.{_name}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counter


def _forward_backward_syncs(counter, batch, **kw):
    """(forward syncs, backward syncs) of one twin call."""
    hidden = batch["hidden"].detach().clone().requires_grad_(True)
    weight = batch["weight"].detach().clone().requires_grad_(True)
    with counter:
        out = stable_alignment_loss(hidden, weight, batch["targets"], batch["response_index"],
                                    batch["scores"], batch["group_index"], backend="torch", **kw)
    forward = dict(counter.counts)
    counter.counts.clear()
    with counter:
        out.loss.backward()
    backward = dict(counter.counts)
    counter.counts.clear()
    return forward, backward


@pytest.mark.parametrize("num_groups", [3, None])
def test_validation_reads_the_device_once(host_syncs, monkeypatch, num_groups):
    # Everything stable_alignment_loss does itself (checks, token plan, the streamed head) costs
    # one host read; the group table and the twin's group step (fastalign/kernels/group_math.py, with
    # their own inherent reads) are not counted here.
    for module, name in ((loss_module, "build_group_layout"), (alignment_head_torch, "group_stats")):
        original = getattr(module, name)

        def paused(*args, _original=original, **kwargs):
            with host_syncs.paused():
                return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, paused)
    batch = make_batch([2, 3, 4], 17, 300, seed=22, hard_best=(1,))
    forward, _ = _forward_backward_syncs(host_syncs, batch, num_groups=num_groups)
    assert sum(forward.values()) <= 1, forward


def test_syncs_do_not_grow_with_vocabulary_slices(host_syncs, monkeypatch):
    # forward + backward of the twin, group math included: a fixed number of syncs, the same for
    # one slice of the vocabulary as for eight; the backward's one is the active-token compaction
    batch = make_batch([2, 3, 4], 17, 1000, seed=4, hard_best=(1,))
    one_slice = _forward_backward_syncs(host_syncs, batch, num_groups=3)
    monkeypatch.setattr(alignment_head_torch, "CPU_CHUNK_BYTES", 1)
    assert vocab_chunk_size(batch["targets"].numel(), 1000, 17) == 128  # 8 slices
    eight_slices = _forward_backward_syncs(host_syncs, batch, num_groups=3)
    assert one_slice == eight_slices
    assert sum(eight_slices[1].values()) <= 1, eight_slices[1]


def test_host_sync_counter_sees_scalar_reads_masks_and_tensor_reads(host_syncs):
    flags = torch.tensor([0, 3, 0])
    with host_syncs:
        bool(flags.any()), flags[flags > 0], flags.tolist(), flags.nonzero()
    assert host_syncs.total() == 4, host_syncs.counts
    with host_syncs, host_syncs.paused():
        int(flags.max())
    assert host_syncs.total() == 4


# ----------------------------------------------------------------------------- chunk rule


def test_chunk_rule_bounds_the_transient():
    for tokens, vocab, hidden in [(8192, 32000, 1024), (8192, 128256, 4096), (47, 123, 31),
                                  (131072, 32000, 4096)]:
        for logit_bytes in (2, 4):
            for device in ("cpu", "cuda"):
                chunk = vocab_chunk_size(tokens, vocab, hidden, logit_bytes, device=device)
                budget = (alignment_head_torch.GPU_CHUNK_BYTES if device == "cuda"
                          else alignment_head_torch.CPU_CHUNK_BYTES)
                assert chunk & (chunk - 1) == 0 and chunk >= 128
                assert chunk < 2 * vocab
                transient = chunk * (tokens * logit_bytes + hidden * 4)
                assert transient <= max(budget, 128 * (tokens * logit_bytes + hidden * 4))
    assert vocab_chunk_size(8192, 32000, 1024, 4, device="cuda") == 4096  # 256 MiB / (8192*4 + 1024*4) = 7281
    assert vocab_chunk_size(8192, 32000, 1024, 4) == 512  # CPU: 32 MiB / (8192*4 + 1024*4) = 910
    assert vocab_chunk_size(47, 123, 31) == 128


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
class TestGPU:
    """The same checks compiled for real on CUDA (run by `make gpu-check`), plus large shapes."""

    @pytest.mark.parametrize("max_flow", [False, True])
    @pytest.mark.parametrize("margin_mode", ["paper", "seed"])
    def test_fp32_matches_oracle(self, max_flow, margin_mode):
        torch.backends.cuda.matmul.allow_tf32 = False
        batch = make_batch([3, 1, 8, 2, 5, 4, 7, 6], 64, 32003, seed=1, device="cuda",
                           easy_best=(0, 3), hard_best=(2, 5, 6, 7))
        opts = dict(max_flow=max_flow, margin_mode=margin_mode)
        assert_matches(run_fused(batch, "triton", **opts), run_oracle(batch, **opts), rtol=5e-5,
                       atol=5e-6)

    def test_deterministic(self):
        batch = make_batch([4, 2, 3], 256, 32000, seed=11, device="cuda", dtype=torch.bfloat16)
        first, second = run_fused(batch, "triton"), run_fused(batch, "triton")
        for key in first:
            assert torch.equal(first[key], second[key]), key

    @pytest.mark.parametrize("vocab", [32000, 128256])
    def test_large_bf16_no_worse_than_plain_torch(self, vocab):
        # T = 8192 tokens, H = 4096: 16 groups of 4 responses of 128 tokens
        batch = make_batch([4] * 16, 4096, vocab, num_tokens=8192, seed=17, device="cuda",
                           dtype=torch.bfloat16)
        batch32 = dict(batch, hidden=batch["hidden"].float(), weight=batch["weight"].float())
        torch.backends.cuda.matmul.allow_tf32 = False
        reference = run_fused(batch32, "torch")  # fp32 streaming twin (checked vs oracle above)
        plain = errors_vs(reference, run_oracle(batch, logits_dtype=torch.bfloat16))
        got = errors_vs(reference, run_fused(batch, "triton"))
        for key, err in got.items():
            ref_scale = reference[key].abs().max().item()
            # cuBLAS may tile the sliced GEMMs differently from the full one, so the bf16
            # roundings are other samples of the same error: a wider factor than on CPU
            assert err <= 1.5 * plain[key] + 1e-4 * ref_scale, (key, err, plain[key])


# ----------------------------------------------------------------------------- fp32 grad_hidden


@pytest.mark.skipif(triton_head is None, reason="triton not importable")
def test_grad_hidden_fallback_is_exact_fp32_and_logged_once(monkeypatch, caplog):
    # The path of a torch without `mm(..., out_dtype=float32)` (here: CPU, where the op does not
    # exist): probed once, logged once, and the product still summed in fp32, never as a
    # bf16-rounded slice.
    monkeypatch.setattr(triton_head, "_FP32_OUT_GEMM", {})
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(7, 33, generator=gen).bfloat16()
    b = torch.randn(33, 5, generator=gen).bfloat16()
    acc = torch.randn(7, 5, generator=gen)
    want = acc.clone().addmm_(a.float(), b.float())
    with caplog.at_level("WARNING", logger=triton_head.__name__):
        got = triton_head._add_product_fp32(acc.clone(), a, b)
        again = triton_head._add_product_fp32(acc.clone(), a, b)
    assert got.dtype == torch.float32 and torch.equal(got, want) and torch.equal(again, want)
    warnings = [r for r in caplog.records if "fp32 copies" in r.getMessage()]
    assert len(warnings) == 1 and "on cpu" in warnings[0].getMessage()
    assert triton_head._FP32_OUT_GEMM == {"cpu": False}


@pytest.mark.skipif(triton_head is None, reason="triton not importable")
@pytest.mark.parametrize("probed", [True, None], ids=["after-the-probe", "in-the-probe"])
def test_grad_hidden_out_of_memory_is_never_swallowed(monkeypatch, probed):
    # Out of memory (a RuntimeError subclass) is raised as what it is, in the real GEMM and in
    # the 1x1 probe alike, and never makes the slower path permanent.
    monkeypatch.setattr(triton_head, "_FP32_OUT_GEMM", {"cpu": probed} if probed else {})

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(triton_head.torch, "mm", out_of_memory)
    a, b = torch.ones(2, 3, dtype=torch.bfloat16), torch.ones(3, 2, dtype=torch.bfloat16)
    with pytest.raises(torch.OutOfMemoryError):
        triton_head._add_product_fp32(torch.zeros(2, 2), a, b)
    assert triton_head._FP32_OUT_GEMM == ({"cpu": True} if probed else {})  # not taken for a missing op


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_with_a_host_plan_reads_nothing_from_the_device(host_syncs, backend):
    # The trainer plans each micro-batch on its host copy before queueing the model's forward;
    # the loss's forward, group step included, must then never wait for the device.
    from fastalign.loss import plan_loss

    batch = make_batch([2, 3, 4], 17, 300, seed=23, hard_best=(1,))
    plan = plan_loss(batch["targets"], batch["response_index"], batch["scores"],
                     batch["group_index"], vocab=300, num_groups=3)
    if backend == "triton":
        device = triton_device()
        batch, plan = to_device(batch, device), plan.to(device)
    with host_syncs:
        out = _call(batch, backend=backend, num_groups=3, plan=plan)
    assert host_syncs.total() == 0, dict(host_syncs.counts)
    want = _call(batch, backend=backend)  # planned inside: the same numbers
    assert torch.equal(out.loss, want.loss) and torch.equal(out.nll, want.nll)


def test_a_plan_for_another_batch_is_refused():
    from fastalign.loss import plan_loss

    batch = make_batch([2, 3], 17, 300, seed=24)
    other = make_batch([3, 3], 17, 300, seed=25)
    plan = plan_loss(other["targets"], other["response_index"], other["scores"],
                     other["group_index"], vocab=300)
    with pytest.raises(LossInputError, match="plan does not match this call: it covers"):
        _call(batch, plan=plan)
    plan = plan_loss(batch["targets"], batch["response_index"], batch["scores"],
                     batch["group_index"], vocab=299)
    with pytest.raises(LossInputError, match="checked for a vocabulary of 299"):
        _call(batch, plan=plan)
