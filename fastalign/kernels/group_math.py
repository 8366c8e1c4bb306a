"""Per-group Stable Alignment math on per-response NLLs (plain PyTorch; tiny, O(S) work).

Details: docs/design.md section 7.18.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MARGIN_MODES = ("paper", "seed")


@dataclass(frozen=True)
class GroupOptions:
    rating_scale: float = 7.0
    margin: float = 1.0
    ratio: float = 0.2
    max_flow: bool = False
    margin_mode: str = "paper"


@dataclass(frozen=True)
class GroupLayout:
    """Where each response sits in the dense [G, K] group table.

    slot_response: int64 [G, K], the response index at each slot (in response order), -1 if empty.
    group_of:      int64 [S], the group of each response.
    """

    slot_response: torch.Tensor
    group_of: torch.Tensor

    @property
    def num_groups(self) -> int:
        return self.slot_response.shape[0]

    @property
    def max_group_size(self) -> int:
        return self.slot_response.shape[1]


@dataclass
class GroupResult:
    loss_per_group: torch.Tensor  # fp32 [G]
    penalty: torch.Tensor  # fp32 [G]
    best: torch.Tensor  # int64 [G], response index of each group's best response
    dloss_dnll: torch.Tensor  # fp32 [S], d (mean_g loss_g) / d nll_r
    dpenalty_dnll: torch.Tensor  # fp32 [S], d penalty_{group(r)} / d nll_r


def build_group_layout(group_index: torch.Tensor, num_groups: int,
                       max_group_size: int | None = None) -> GroupLayout:
    """Dense [G, K] table of response indices; responses keep their order inside a group.

    max_group_size: K when the caller already has it on the host (fastalign/loss.py reads it
    with its validation flags); otherwise it is read here (a device->host sync on CUDA).
    """
    num_responses = group_index.numel()
    device = group_index.device
    group_index = group_index.long()
    sizes = torch.zeros(num_groups, dtype=torch.int64, device=device)  # no bincount: it syncs on CUDA
    sizes.scatter_add_(0, group_index, torch.ones_like(group_index))
    if max_group_size is not None:
        max_size = max_group_size
    else:
        max_size = int(sizes.max()) if num_groups else 0
    order = torch.argsort(group_index, stable=True)  # responses grouped, original order kept
    starts = torch.cumsum(sizes, 0) - sizes
    position = torch.arange(num_responses, device=device) - starts[group_index[order]]
    slots = torch.full((num_groups, max_size), -1, dtype=torch.int64, device=device)
    slots[group_index[order], position] = order
    return GroupLayout(slot_response=slots, group_of=group_index.to(torch.int64))


def group_math(nll: torch.Tensor, scores: torch.Tensor, layout: GroupLayout,
               opts: GroupOptions) -> GroupResult:
    """Forward values and per-response derivatives of the objective (docs/design.md section 7.18)."""
    slots = layout.slot_response  # [G, K]
    num_groups, k_max = slots.shape
    present = slots >= 0
    safe = slots.clamp(min=0)
    nll_g = nll.float()[safe]  # [G, K]
    score_g = torch.where(present, scores.float()[safe], float("-inf"))
    size = present.sum(1)  # [G]

    s_best = score_g.max(1).values  # [G]
    # argmax returns the first maximal slot; slots are in response order -> lowest index wins.
    best_slot = torch.argmax((score_g == s_best[:, None]).to(torch.int8), 1)
    col = torch.arange(k_max, device=slots.device)
    is_best = col[None, :] == best_slot[:, None]
    nll_best = nll_g.gather(1, best_slot[:, None]).squeeze(1)

    if opts.margin_mode == "paper":
        ref = score_g
    elif opts.margin_mode == "seed":
        ref = torch.sort(score_g, dim=1, descending=True).values  # [G, K]: j-th largest rating
    else:
        raise ValueError(f"margin_mode must be one of {MARGIN_MODES}, got {opts.margin_mode!r}")
    margins = (s_best[:, None] - ref) / opts.rating_scale * opts.margin
    others = present & ~is_best
    neg = nll_best[:, None] - nll_g + margins  # [G, K]; meaningful where `others`
    num_others = (size - 1).clamp(min=1).to(torch.float32)
    if opts.max_flow:
        neg_masked = torch.where(others, neg, float("-inf"))
        worst = neg_masked.max(1)
        aggregate = worst.values
        share = (col[None, :] == worst.indices[:, None]).float()  # first maximal slot
    else:
        aggregate = torch.where(others, neg, 0.0).sum(1) / num_others
        share = torch.ones_like(neg) / num_others[:, None]
    has_others = size > 1
    penalty = torch.where(has_others, aggregate.clamp(min=0.0), 0.0)
    active = (penalty > 0).float()  # [G]

    # d penalty / d nll: +a on the best, -a * share on the others (share: 1/(k-1) or argmax).
    dpen = torch.where(is_best, active[:, None], -active[:, None] * share)
    dpen = torch.where(others | (is_best & has_others[:, None]), dpen, 0.0)
    dloss = (is_best.float() + opts.ratio * dpen) / max(num_groups, 1)

    # Back to responses: empty slots write to a spare entry S (dropped), so no boolean mask
    # (its nonzero would be a host sync on CUDA); every real slot holds a distinct response.
    num_responses = nll.numel()
    target = torch.where(present, slots, num_responses).view(-1)  # [G*K]
    dloss_dnll = torch.zeros(num_responses + 1, dtype=torch.float32, device=nll.device)
    dpen_dnll = torch.zeros_like(dloss_dnll)
    dloss_dnll.scatter_(0, target, dloss.reshape(-1))
    dpen_dnll.scatter_(0, target, dpen.reshape(-1))
    best = slots.gather(1, best_slot[:, None]).squeeze(1)
    return GroupResult(loss_per_group=nll_best + opts.ratio * penalty, penalty=penalty, best=best,
                       dloss_dnll=dloss_dnll[:num_responses], dpenalty_dnll=dpen_dnll[:num_responses])
