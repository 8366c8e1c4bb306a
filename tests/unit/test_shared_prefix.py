"""Shared-prefix packing: each query runs once per group, and every number equals the unshared layout.

Oracles: the unshared layout (query + response per segment, today's packing) for the loss, every
nll_r and the gradient of every parameter; a dense [T, Tk] mask for the attention itself; the
batch_size micro-batches of the plan for step-level packing.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers.models import VOCAB, assert_layouts_equal, loss_nll_grads, synthetic_groups

from fastalign.attention import varlen_attention
from fastalign.data import GroupBatcher, TokenizedData, pack_groups, packed_tokens, sample_data_path, tokenize_records
from fastalign.data.records import load_records
from fastalign.errors import DataError
from fastalign.hf_config import LlamaConfig
from fastalign.model import Llama


def random_llama(vocab: int = VOCAB, dtype: torch.dtype = torch.float32, **keys) -> Llama:
    config = LlamaConfig(**{**dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   initializer_range=0.2, rms_norm_eps=1e-5), **keys})
    model = Llama(config)
    model.init_weights(torch.Generator().manual_seed(0))
    return model.to(dtype)


def test_shared_layout_packs_each_query_once():
    groups = synthetic_groups()
    batch = pack_groups(groups, share_prefix=True)
    # per group: Lq - 1 query tokens once, then (copy of the last query token + response) per response
    assert batch.num_tokens == sum(packed_tokens(len(g.query_ids), [len(r) for r in g.response_ids], True)
                                   for g in groups)
    first = groups[0]
    q = first.query_ids
    r = first.response_ids[0]
    assert batch.input_ids[:len(q) - 1 + 1 + len(r)].tolist() == q[:-1] + [q[-1]] + r
    assert batch.position_ids[:len(q) + len(r)].tolist() == list(range(len(q) + len(r)))
    assert batch.targets[:len(q) - 1].tolist() == [-100] * (len(q) - 1)          # the query segment
    assert batch.targets[len(q) - 1:len(q) + len(r)].tolist() == r + [-100]       # copy predicts r[0]
    # the one-token query has no query segment: its responses start with a copy at position 0
    assert batch.cu_seqlens.tolist()[:4] == [0, len(q) - 1, len(q) + len(r), len(q) + len(r) + 4]
    assert batch.kv_index.numel() == batch.cu_seqlens_k[-1]
    assert batch.max_seqlen_k == max(len(g.query_ids) + len(x) for g in groups for x in g.response_ids)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_sdpa_shared_keys_match_a_dense_mask_forward_and_backward(kv_heads):
    batch = pack_groups(synthetic_groups(), share_prefix=True)
    t, heads, dim = batch.num_tokens, 4, 8
    # oracle mask [T, T]: query i of segment n sees the first Lk - Lq + i + 1 of the segment's keys
    mask = torch.zeros(t, t, dtype=torch.bool)
    cu, cu_k = batch.cu_seqlens.tolist(), batch.cu_seqlens_k.tolist()
    for n in range(len(cu) - 1):
        keys = batch.kv_index[cu_k[n]:cu_k[n + 1]]
        lq, lk = cu[n + 1] - cu[n], len(keys)
        for i in range(lq):
            mask[cu[n] + i, keys[:lk - lq + i + 1]] = True
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(t, h, dim, generator=generator, requires_grad=True) for h in (heads, kv_heads, kv_heads))
    grad_out = torch.randn(t, heads, dim, generator=generator)
    out = varlen_attention(q, k, v, batch.cu_seqlens, batch.max_seqlen, "sdpa", batch.kv_index,
                           batch.cu_seqlens_k, batch.max_seqlen_k)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    expected = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                              attn_mask=mask, enable_gqa=kv_heads != heads).transpose(0, 1)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad_out)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_flags", [{}, dict(margin_mode="seed", max_flow=True)])
def test_fp32_shared_equals_unshared_on_synthetic_groups(loss_flags):
    assert_layouts_equal(random_llama(), synthetic_groups(), **loss_flags)


def test_fp32_shared_equals_unshared_on_the_bundled_data(hf_tokenizer):  # noqa: F811
    records = load_records(sample_data_path()).records[:10]
    data = tokenize_records(records, hf_tokenizer, model_max_length=40)  # short: responses get truncated
    assert data.stats["truncated_responses"] > 0
    model = random_llama(vocab=len(hf_tokenizer))
    assert_layouts_equal(model, data.groups, rtol=1e-5)


def test_bf16_shared_is_no_worse_than_unshared_against_fp32():
    groups = synthetic_groups(seed=5)
    reference = loss_nll_grads(random_llama(), pack_groups(groups))[1]
    bf16 = random_llama(dtype=torch.bfloat16)
    error_unshared = (loss_nll_grads(bf16, pack_groups(groups))[1] - reference).abs().max()
    error_shared = (loss_nll_grads(bf16, pack_groups(groups, share_prefix=True))[1] - reference).abs().max()
    # bf16 rounding differs between the layouts (other sums), not its size: allow 25% of noise
    assert error_shared <= 1.25 * error_unshared + 1e-3, (error_shared, error_unshared)


def test_dict_records_are_validated_like_file_records(hf_tokenizer):  # noqa: F811
    good = {"query": "Is it legal?", "responses": ["No.", "Yes."], "scores": [6, 2]}
    data = tokenize_records([good, dict(good, category="law")], hf_tokenizer, model_max_length=64)
    assert [g.record_index for g in data.groups] == [0, 1]
    with pytest.raises(DataError, match=r"record 1, field 'scores\[0\]': score 9 is outside \[1, 7\]"):
        tokenize_records([good, dict(good, scores=[9, 2])], hf_tokenizer)
    with pytest.raises(DataError, match="record 0, field 'responses': missing"):
        tokenize_records([{"query": "q", "scores": [1]}], hf_tokenizer)


def real_groups(step) -> list[int]:
    return [i for mb in step.micro_batches if mb.num_groups for i in mb.record_indices]


def budget_batcher(groups, rank=0, world_size=1, **options):
    data = TokenizedData(groups=groups, stats={})
    return GroupBatcher(data, num_comp=None, seed=7, batch_size=1, gradient_accumulation_steps=4,
                        world_size=world_size, rank=rank, shuffle=True, **options)


@pytest.mark.parametrize("share_prefix", [False, True])
def test_step_level_packing_keeps_each_steps_groups_and_matches_ranks(share_prefix):
    groups = synthetic_groups() + synthetic_groups(seed=1) + synthetic_groups(seed=2)  # 15 groups
    for index, group in enumerate(groups):
        group.record_index = index
    for world_size in (1, 2):
        plain = [budget_batcher(groups, r, world_size, share_prefix=share_prefix) for r in range(world_size)]
        packed = [budget_batcher(groups, r, world_size, share_prefix=share_prefix, step_token_budget=60)
                  for r in range(world_size)]
        assert packed[0].steps_per_epoch(0) == plain[0].steps_per_epoch(0)
        for a_steps, b_steps in zip(zip(*(b.iter_steps(0) for b in plain)), zip(*(b.iter_steps(0) for b in packed))):
            counts = {len(step.micro_batches) for step in b_steps}
            assert len(counts) == 1  # every rank runs as many micro-batches: collectives stay matched
            for a, b in zip(a_steps, b_steps):
                assert a.global_groups == b.global_groups
                assert real_groups(a) == real_groups(b)  # same groups, same order, on the same rank
                for mb in b.micro_batches:
                    assert mb.num_groups == 0 or mb.num_tokens <= 60 or mb.num_groups == 1
                    assert mb.shares_prefix == share_prefix
            assert sum(len(s.micro_batches) for s in b_steps) <= sum(len(s.micro_batches) for s in a_steps)
