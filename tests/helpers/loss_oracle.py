"""Plain full-logits oracle of the Stable Alignment loss: docs/design.md section 1, literally.

Materialises the [T, V] logits, takes log_softmax, averages per response and loops over the groups
in Python; autograd gives the gradients. Tests only (it is the slow, obvious version).
`logits_dtype=None` computes the logits in fp32 (the reference); passing the input dtype (e.g.
bf16) gives "plain PyTorch in bf16", the yardstick for the fused head's bf16 accuracy.
"""

from __future__ import annotations

import torch


def oracle_alignment_loss(hidden, weight, targets, response_index, scores, group_index,
                          rating_scale=7.0, margin=1.0, ratio=0.2, max_flow=False,
                          margin_mode="paper", logits_dtype=None):
    """Returns (loss, nll [S], penalty [G], best [G]); differentiable w.r.t. hidden and weight."""
    if logits_dtype is None:
        logits = hidden.float() @ weight.float().T  # [T, V]
    else:
        logits = (hidden.to(logits_dtype) @ weight.to(logits_dtype).T).float()
    logprobs = torch.log_softmax(logits, dim=-1)
    has_target = targets != -100
    token_nll = -logprobs.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)

    num_responses = scores.shape[0]
    nll = torch.stack([token_nll[has_target & (response_index == r)].mean()
                       for r in range(num_responses)])
    loss, penalty, best = oracle_group_loss(nll, scores, group_index, rating_scale=rating_scale,
                                            margin=margin, ratio=ratio, max_flow=max_flow,
                                            margin_mode=margin_mode)
    return loss, nll, penalty, best


def oracle_group_loss(nll, scores, group_index, rating_scale=7.0, margin=1.0, ratio=0.2,
                      max_flow=False, margin_mode="paper"):
    """The group part on per-response NLLs [S]: (mean loss_g, penalty [G], best [G])."""
    num_responses = scores.shape[0]
    num_groups = int(group_index.max()) + 1
    losses, penalties, bests = [], [], []
    for g in range(num_groups):
        members = [r for r in range(num_responses) if int(group_index[r]) == g]
        ratings = [float(scores[r]) for r in members]
        best_pos = ratings.index(max(ratings))  # first of the top-rated
        best = members[best_pos]
        sorted_ratings = sorted(ratings, reverse=True)
        negs = []
        for pos, r in enumerate(members):
            if pos == best_pos:
                continue
            ref = ratings[pos] if margin_mode == "paper" else sorted_ratings[pos]
            m = (ratings[best_pos] - ref) / rating_scale * margin
            negs.append(nll[best] - nll[r] + m)
        if not negs:
            penalty = nll.new_zeros(())
        elif max_flow:
            worst = int(torch.argmax(torch.stack(negs).detach()))  # first maximum
            penalty = torch.relu(negs[worst])
        else:
            penalty = torch.relu(torch.stack(negs).mean())
        losses.append(nll[best] + ratio * penalty)
        penalties.append(penalty)
        bests.append(best)
    return torch.stack(losses).mean(), torch.stack(penalties), torch.tensor(bests)
