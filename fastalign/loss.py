"""The Stable Alignment objective on packed batches, with a fused streaming LM head.

Details: docs/design.md section 7.19.
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass
from types import ModuleType

import torch

from fastalign.errors import FastalignError
from fastalign.kernels import alignment_head_torch
from fastalign.kernels.group_math import MARGIN_MODES, GroupLayout, GroupOptions, build_group_layout

# fastalign.kernels.alignment_head (triton) is imported where used: only the Triton backend pays for it,
# and an ImportError there becomes a message naming the backend.

IGNORE_INDEX = -100
BACKENDS = ("auto", "triton", "torch")


class LossInputError(FastalignError, ValueError):
    """Inputs the loss cannot use (names the argument, the offending index and the reason)."""


@dataclass
class AlignmentLossOutput:
    loss: torch.Tensor  # fp32 scalar
    nll: torch.Tensor  # fp32 [S]
    penalty: torch.Tensor  # fp32 [G]
    best: torch.Tensor  # int64 [G]


@dataclass
class _TokenPlan:
    """The N positions that carry a target, sorted by response (the order every kernel uses)."""

    position: torch.Tensor  # int64 [N], index into [0, T)
    target: torch.Tensor  # int64 [N]
    response: torch.Tensor  # int64 [N]
    response_ptr: torch.Tensor  # int64 [S+1], response r owns tokens ptr[r]:ptr[r+1]
    response_tokens: torch.Tensor  # int64 [S], n_r


@dataclass
class LossPlan:
    """Everything the loss derives from a batch's index tensors alone (validated): the target
    positions and the [G, K] group table. `plan_loss` makes it; on host tensors that costs no
    device sync, and `to(device)` queues the copies."""

    tokens: _TokenPlan
    layout: GroupLayout
    num_tokens: int  # T
    vocab: int  # V it was validated against

    def to(self, device, non_blocking: bool = False) -> LossPlan:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)

        tokens = _TokenPlan(**{k: move(v) for k, v in vars(self.tokens).items()})
        layout = GroupLayout(slot_response=move(self.layout.slot_response),
                             group_of=move(self.layout.group_of))
        return LossPlan(tokens=tokens, layout=layout, num_tokens=self.num_tokens, vocab=self.vocab)


def plan_loss(targets: torch.Tensor, response_index: torch.Tensor, scores: torch.Tensor,
              group_index: torch.Tensor, *, vocab: int, num_groups: int | None = None) -> LossPlan:
    """Validate a batch's index tensors and lay out its tokens and groups for the loss.

    The trainer calls this on the host copy of each micro-batch before the model's forward is
    queued, so the loss itself never waits for the device (see "Host syncs" above).
    """
    _check_indices(targets, response_index, scores, group_index)
    return _make_plan(targets, response_index, scores, group_index, vocab=vocab,
                      num_groups=_checked_num_groups(num_groups))


def _make_plan(targets, response_index, scores, group_index, *, vocab: int,
               num_groups: int | None) -> LossPlan:
    """plan_loss after its shape/dtype/device checks (the caller made them)."""
    tokens, num_groups, max_group_size = _plan_tokens(targets, response_index, scores, group_index,
                                                      vocab=vocab, num_groups=num_groups)
    layout = build_group_layout(group_index, num_groups, max_group_size)
    return LossPlan(tokens=tokens, layout=layout, num_tokens=targets.shape[0], vocab=vocab)


def stable_alignment_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          response_index: torch.Tensor, scores: torch.Tensor,
                          group_index: torch.Tensor, rating_scale: float = 7.0,
                          margin: float = 1.0, ratio: float = 0.2, max_flow: bool = False,
                          margin_mode: str = "paper", backend: str = "auto", *,
                          num_groups: int | None = None,
                          plan: LossPlan | None = None) -> AlignmentLossOutput:
    """Stable Alignment loss of one packed micro-batch (docs/design.md section 7.19).

    hidden [T, H] and weight [V, H] (lm_head); targets int [T] (-100: no loss), response_index int [T],
    scores float [S], group_index int [S] (0..G-1). Returns loss (fp32 scalar), nll (fp32 [S]),
    penalty (fp32 [G]) and best (int64 [G]).

    plan: `plan_loss(...)` of these same index tensors, made beforehand (then moved to hidden's
    device); without it the plan is made here, from the tensors on hidden's device.
    """
    opts = GroupOptions(rating_scale=float(rating_scale), margin=float(margin),
                        ratio=float(ratio), max_flow=bool(max_flow), margin_mode=margin_mode)
    _check_options(opts, backend)
    _check_shapes(hidden, weight, targets, response_index, scores, group_index)
    impl = _resolve_backend(backend, hidden.device)
    if hidden.dtype != weight.dtype:  # e.g. an fp32 final norm before a bf16 lm_head
        hidden = hidden.to(weight.dtype)  # the GEMMs run in the lm_head's dtype, as in nn.Linear
    num_groups = _checked_num_groups(num_groups)
    if plan is None:  # the index tensors were checked with hidden above
        plan = _make_plan(targets, response_index, scores, group_index, vocab=weight.shape[0],
                          num_groups=num_groups)
    else:
        _check_plan(plan, hidden, weight, scores, num_groups)
    loss, nll, penalty, best = _AlignmentHead.apply(hidden, weight, scores, plan.tokens,
                                                    plan.layout, opts, impl)
    return AlignmentLossOutput(loss=loss, nll=nll, penalty=penalty, best=best)


def _checked_num_groups(num_groups) -> int | None:
    if num_groups is None:
        return None
    if isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral) \
            or num_groups < 1:
        raise LossInputError(f"num_groups must be a positive int (the number of groups in "
                             f"group_index) or None, got {num_groups!r}")
    return int(num_groups)


def _check_plan(plan: LossPlan, hidden, weight, scores, num_groups: int | None) -> None:
    """A plan made for another batch, model or device is refused (shapes only: no sync)."""
    problems = []
    if plan.num_tokens != hidden.shape[0]:
        problems.append(f"it covers {plan.num_tokens} positions, hidden has {hidden.shape[0]}")
    if plan.tokens.response_tokens.shape[0] != scores.shape[0]:
        problems.append(f"it has {plan.tokens.response_tokens.shape[0]} responses, scores "
                        f"{scores.shape[0]}")
    if plan.vocab != weight.shape[0]:
        problems.append(f"it was checked for a vocabulary of {plan.vocab}, weight has "
                        f"{weight.shape[0]} rows")
    if num_groups is not None and plan.layout.num_groups != num_groups:
        problems.append(f"it has {plan.layout.num_groups} groups, num_groups is {num_groups}")
    if plan.tokens.position.device != hidden.device:
        problems.append(f"it is on {plan.tokens.position.device}, hidden on {hidden.device} "
                        "(LossPlan.to(device))")
    if problems:
        raise LossInputError("plan does not match this call: " + "; ".join(problems))


# ----------------------------------------------------------------------------- dispatch


def _resolve_backend(backend: str, device: torch.device) -> ModuleType:
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return alignment_head_torch
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise LossInputError(
            f"backend='triton' needs CUDA tensors (got {device.type}); on CPU it runs only under "
            "Triton's interpreter (set TRITON_INTERPRET=1 before importing triton), otherwise "
            "use backend='torch' or 'auto'")
    try:
        from fastalign.kernels import alignment_head
    except ImportError as err:
        if backend == "auto":  # CUDA without triton: the twin still works
            return alignment_head_torch
        raise LossInputError(f"backend='triton' needs triton, which failed to import: {err}; "
                             "use backend='torch' or 'auto'") from err
    return alignment_head


class _AlignmentHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, scores, plan: _TokenPlan, layout: GroupLayout,
                opts: GroupOptions, impl: ModuleType):
        weight = weight.contiguous()  # no-op for an lm_head; slices must be contiguous rows
        tokens_hidden = hidden.index_select(0, plan.position)  # [N, H]
        chunk = impl.vocab_chunk(tokens_hidden.shape[0], weight)
        lse, target_logit = impl.token_logsumexp(tokens_hidden, weight, plan.target, chunk)
        nll = impl.response_mean(lse - target_logit, plan.response_ptr)  # [S]
        group = impl.group_stats(nll, scores, layout, opts)
        loss = group.loss_per_group.sum() / layout.num_groups
        ctx.save_for_backward(hidden, weight, lse)
        ctx.plan, ctx.layout, ctx.group, ctx.impl = plan, layout, group, impl
        ctx.mark_non_differentiable(group.best)
        ctx.set_materialize_grads(False)
        return loss, nll, group.penalty, group.best

    @staticmethod
    def backward(ctx, grad_loss, grad_nll, grad_penalty, _grad_best):
        hidden, weight, lse = ctx.saved_tensors
        plan, group, impl = ctx.plan, ctx.group, ctx.impl
        # d out / d nll_r, per response; the heads only ever see this per-token weight.
        coef = torch.zeros_like(group.dloss_dnll)
        if grad_loss is not None:
            coef = coef + grad_loss.float() * group.dloss_dnll
        if grad_nll is not None:
            coef = coef + grad_nll.float()
        if grad_penalty is not None:
            coef = coef + grad_penalty.float()[ctx.layout.group_of] * group.dpenalty_dnll
        token_weight = (coef / plan.response_tokens.float())[plan.response]  # [N]
        active = torch.nonzero(token_weight != 0).squeeze(1)  # skip zero-weight responses
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        if active.numel() == 0:
            grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
            return grad_hidden, grad_weight, None, None, None, None, None
        position = plan.position[active]
        tokens_hidden = hidden.index_select(0, position)
        chunk = impl.vocab_chunk(tokens_hidden.shape[0], weight)
        grad_tokens, grad_weight = impl.head_grads(tokens_hidden, weight, plan.target[active],
                                                   lse[active], token_weight[active], chunk,
                                                   weight_grad=ctx.needs_input_grad[1])  # frozen head: none
        if grad_hidden is not None:
            grad_hidden.index_copy_(0, position, grad_tokens.to(hidden.dtype))
        return grad_hidden, grad_weight, None, None, None, None, None


# ----------------------------------------------------------------------------- validation


def _check_options(opts: GroupOptions, backend: str) -> None:
    if opts.margin_mode not in MARGIN_MODES:
        raise LossInputError(f"margin_mode must be one of {MARGIN_MODES}, got {opts.margin_mode!r}")
    if backend not in BACKENDS:
        raise LossInputError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not opts.rating_scale > 0:
        raise LossInputError(f"rating_scale must be > 0, got {opts.rating_scale}")


def _check_shapes(hidden, weight, targets, response_index, scores, group_index) -> None:
    if hidden.dim() != 2 or weight.dim() != 2:
        raise LossInputError(f"hidden must be [T, H] and weight [V, H]; got hidden "
                             f"{tuple(hidden.shape)} and weight {tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise LossInputError(f"hidden size mismatch: hidden {tuple(hidden.shape)} vs weight "
                             f"{tuple(weight.shape)} (both must end in H)")
    if not hidden.dtype.is_floating_point or not weight.dtype.is_floating_point:
        raise LossInputError(f"hidden and weight must be float tensors; got {hidden.dtype} and "
                             f"{weight.dtype}")
    _check_indices(targets, response_index, scores, group_index, num_tokens=hidden.shape[0],
                   device=hidden.device)


def _check_indices(targets, response_index, scores, group_index, *, num_tokens: int | None = None,
                   device: torch.device | None = None) -> None:
    """Shapes, dtypes and devices of the index tensors (num_tokens / device: hidden's when the
    loss checks them, else targets')."""
    reference = "hidden" if device is not None else "targets"
    if scores.dim() != 1:
        raise LossInputError(f"scores must be [S] (one rating per response); got shape "
                             f"{tuple(scores.shape)}")
    num_tokens = targets.shape[0] if num_tokens is None else num_tokens
    device = targets.device if device is None else device
    num_responses = scores.shape[0]
    for name, tensor, length in (("targets", targets, num_tokens),
                                 ("response_index", response_index, num_tokens),
                                 ("scores", scores, num_responses),
                                 ("group_index", group_index, num_responses)):
        if tensor.dim() != 1 or tensor.shape[0] != length:
            expected = ("[T] with T = hidden.shape[0]" if name in ("targets", "response_index")
                        else "[S] with S = len(scores)")
            raise LossInputError(f"{name} must be {expected}; got shape {tuple(tensor.shape)} "
                                 f"(T = {num_tokens}, S = {scores.shape[0]})")
        if tensor.device != device:
            raise LossInputError(f"{name} is on {tensor.device} but {reference} is on {device}")
    for name, tensor in (("targets", targets), ("response_index", response_index),
                         ("group_index", group_index)):
        if tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
            raise LossInputError(f"{name} must be an integer tensor, got {tensor.dtype}")
    if num_responses == 0:
        raise LossInputError("scores is empty: a batch needs at least one response")


# Flags of the one validation read, in the order their errors are reported.
_FLAGS = ("scores_not_finite", "group_negative", "target_out_of_range", "response_out_of_range",
          "response_without_targets", "group_numbering")


def _plan_tokens(targets, response_index, scores, group_index, *, vocab: int,
                 num_groups: int | None) -> tuple[_TokenPlan, int, int]:
    """Checks the index tensors and compacts the target positions with one device->host read.

    Returns the plan, G (num_groups, or max(group_index) + 1 when not given) and K (the largest
    group's size).
    """
    device = targets.device
    num_responses = scores.shape[0]
    targets, response_index, groups = targets.long(), response_index.long(), group_index.long()
    has_target = targets != IGNORE_INDEX  # [T]
    bad_target = has_target & ((targets < 0) | (targets >= vocab))
    bad_response = has_target & ((response_index < 0) | (response_index >= num_responses))
    # Target tokens per response; positions without a (valid) response go to an overflow bin S.
    bins = torch.where(has_target & ~bad_response, response_index, num_responses)
    counts = torch.zeros(num_responses + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, bins, torch.ones_like(bins))
    response_tokens = counts[:num_responses]  # [S]
    # Responses per group. Without num_groups, G <= S when no group is empty (S responses fill
    # at most S groups), so S bins (+ overflow) suffice; negatives are flagged on their own.
    group_bins = num_responses if num_groups is None else num_groups
    sizes = torch.zeros(group_bins + 1, dtype=torch.int64, device=device)
    sizes.scatter_add_(0, groups.clamp(0, group_bins), torch.ones_like(groups))
    largest = groups.max()
    if num_groups is None:  # 0..largest all present <=> largest + 1 distinct values below S
        bad_numbering = (largest >= num_responses) | ((sizes[:-1] > 0).sum() != largest + 1)
    else:
        bad_numbering = (largest + 1 != num_groups) | (sizes[:-1] == 0).any()
    flags = (~torch.isfinite(scores.float()).all(), (groups < 0).any(), bad_target.any(),
             bad_response.any(), (response_tokens == 0).any(), bad_numbering)
    read = torch.stack([flag.long() for flag in flags]
                       + [has_target.sum(), largest, sizes[:-1].max()]).tolist()  # one host read
    if any(read[:len(_FLAGS)]):
        _raise_input_error(dict(zip(_FLAGS, read)), targets, response_index, scores, groups,
                           vocab=vocab, num_groups=num_groups)
    num_target_tokens, largest_group, max_group_size = read[len(_FLAGS):]
    if num_groups is None:
        num_groups = largest_group + 1

    # Target positions sorted by response, in position order inside one (stable sort; the -100
    # positions get key S and sort last): no nonzero, as N is already known.
    key = torch.where(has_target, response_index, num_responses)
    position = torch.argsort(key, stable=True)[:num_target_tokens]  # [N]
    ptr = torch.zeros(num_responses + 1, dtype=torch.int64, device=device)
    torch.cumsum(response_tokens, 0, out=ptr[1:])
    plan = _TokenPlan(position=position, target=targets[position],
                      response=response_index[position], response_ptr=ptr,
                      response_tokens=response_tokens)
    return plan, num_groups, max_group_size


def _raise_input_error(flags: dict[str, int], targets, response_index, scores, groups, *,
                       vocab: int, num_groups: int | None) -> None:
    """The first problem the flags report, as a LossInputError naming the index and the reason."""
    num_responses = scores.shape[0]

    def first(mask: torch.Tensor) -> int:
        return int(torch.nonzero(mask)[0])

    if flags["scores_not_finite"]:
        bad = first(~torch.isfinite(scores.float()))
        raise LossInputError(f"scores[{bad}] = {scores[bad].item()} is not a finite number")
    if flags["group_negative"]:
        bad = first(groups < 0)
        raise LossInputError(f"group_index[{bad}] = {int(groups[bad])} is negative")
    has_target = targets != IGNORE_INDEX
    if flags["target_out_of_range"]:
        pos = first(has_target & ((targets < 0) | (targets >= vocab)))
        raise LossInputError(f"targets[{pos}] = {int(targets[pos])} is out of range for a vocabulary "
                             f"of {vocab} tokens (valid: 0..{vocab - 1}, or {IGNORE_INDEX} to ignore)")
    if flags["response_out_of_range"]:
        pos = first(has_target & ((response_index < 0) | (response_index >= num_responses)))
        raise LossInputError(f"response_index[{pos}] = {int(response_index[pos])} is out of range "
                             f"for {num_responses} responses (len(scores))")
    if flags["response_without_targets"]:
        counts = torch.bincount(response_index[has_target], minlength=num_responses)
        empty = first(counts == 0)
        raise LossInputError(
            f"response {empty} (group {int(groups[empty])}) has no target tokens: every "
            f"position with response_index == {empty} has target {IGNORE_INDEX}, so its NLL (a mean "
            "over its tokens) is undefined")
    if num_groups is not None and int(groups.max()) >= num_groups:
        bad = first(groups >= num_groups)
        raise LossInputError(f"group_index[{bad}] = {int(groups[bad])} is out of range for "
                             f"num_groups = {num_groups} (groups must be numbered 0..G-1)")
    if num_groups is None:
        num_groups = int(groups.max()) + 1
    empty = first(torch.bincount(groups, minlength=num_groups) == 0)
    raise LossInputError(f"group_index: group {empty} has no responses (groups must be "
                         f"numbered 0..G-1 without gaps; G = {num_groups})")
