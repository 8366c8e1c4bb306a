"""Models and packed batches compared across implementations and layouts: logits of our Llama
against transformers', and the shared-prefix layout against the unshared one."""

from __future__ import annotations

import torch
from transformers import LlamaForCausalLM

from fastalign.data import TokenizedGroup, pack_groups
from fastalign.loss import stable_alignment_loss
from fastalign.model import Llama

TOL = dict(atol=1e-4, rtol=1e-4)
FAMILY_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM"}


def packed_batch(lengths, vocab_size, seed=1):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (sum(lengths),), generator=g)
    position_ids = torch.cat([torch.arange(n) for n in lengths])
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return input_ids, position_ids, cu_seqlens, max(lengths)


def our_logits(model: Llama, batch) -> torch.Tensor:
    return model(*batch) @ model.lm_head.weight.T


def hf_logits_per_sequence(model: LlamaForCausalLM, batch) -> torch.Tensor:
    input_ids, _, cu_seqlens, _ = batch
    bounds = cu_seqlens.tolist()
    with torch.no_grad():
        return torch.cat([model(input_ids[a:b][None]).logits[0] for a, b in zip(bounds[:-1], bounds[1:])])


VOCAB = 97


def synthetic_groups(seed: int = 0, vocab: int = VOCAB) -> list[TokenizedGroup]:
    """k = 1..5, odd lengths, ties, a one-token query, a two-token query, one-token responses."""
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    shapes = [  # (query length, response lengths, scores)
        (7, [5], [4.0]),
        (1, [3, 6], [2.0, 6.0]),                       # one-token query: no query segment
        (13, [1, 9, 4], [5.0, 5.0, 1.0]),              # a tie for best, a one-token response
        (2, [11, 2, 7, 3], [3.0, 7.0, 7.0, 7.0]),
        (9, [6, 1, 13, 5, 8], [1.0, 2.0, 3.0, 4.0, 4.0]),
    ]
    return [TokenizedGroup(record_index=i, query_ids=ids(q), response_ids=[ids(n) for n in lengths], scores=scores)
            for i, (q, lengths, scores) in enumerate(shapes)]


def loss_nll_grads(model: Llama, batch, **loss_flags):
    """(loss, nll [S], {parameter name: gradient}) of one packed batch, fp32 loss head (torch twin)."""
    model.zero_grad(set_to_none=True)
    hidden = model(batch.input_ids, batch.position_ids, **batch.attention_inputs())
    out = stable_alignment_loss(hidden, model.lm_head.weight, batch.targets, batch.response_index, batch.scores,
                                batch.group_index, ratio=0.5, backend="torch", **loss_flags)
    out.loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return out.loss.detach(), out.nll.detach(), grads


def assert_layouts_equal(model: Llama, groups: list[TokenizedGroup], rtol: float = 1e-5, **loss_flags) -> None:
    unshared = pack_groups(groups, share_prefix=False)
    shared = pack_groups(groups, share_prefix=True)
    assert shared.num_tokens < unshared.num_tokens or all(len(g.query_ids) == 1 for g in groups)
    assert shared.sequence_tokens == unshared.sequence_tokens == unshared.num_tokens
    assert shared.num_target_tokens == unshared.num_target_tokens
    loss_u, nll_u, grads_u = loss_nll_grads(model, unshared, **loss_flags)
    loss_s, nll_s, grads_s = loss_nll_grads(model, shared, **loss_flags)
    torch.testing.assert_close(loss_s, loss_u, rtol=rtol, atol=0)
    torch.testing.assert_close(nll_s, nll_u, rtol=rtol, atol=0)
    for name, grad in grads_u.items():
        relative = (grads_s[name] - grad).norm() / grad.norm()
        assert relative <= rtol, f"{name}: gradient differs by {relative:.2e} (relative)"
