"""Packing, candidate sampling and rank/step sharding (fastalign.data); no tokenizer needed."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
import torch
from helpers.optional_deps import HealthCheck, given, settings, st

from fastalign.data import (
    DataError,
    GroupBatcher,
    TokenizedData,
    TokenizedGroup,
    candidate_mask,
    pack_groups,
    select_candidates,
)
from fastalign.errors import ConfigError

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

token_ids = st.lists(st.integers(0, 50_000), min_size=1, max_size=7)


@st.composite
def groups_strategy(draw, max_groups=6, max_responses=4):
    groups = []
    for index in sorted(draw(st.sets(st.integers(0, 10_000), min_size=1, max_size=max_groups))):
        responses = draw(st.lists(token_ids, min_size=1, max_size=max_responses))
        scores = [float(draw(st.integers(1, 7))) for _ in responses]
        groups.append(
            TokenizedGroup(record_index=index, query_ids=draw(token_ids), response_ids=responses, scores=scores)
        )
    return groups


def make_data(num_groups, *, max_responses=5, seed=0, first_index=0):
    """Random groups with distinct, tagged tokens so every position can be traced back."""
    rng = np.random.default_rng(seed)
    groups = []
    for g in range(num_groups):
        k = int(rng.integers(1, max_responses + 1))
        query = rng.integers(1, 1000, size=int(rng.integers(1, 6))).tolist()
        responses = [rng.integers(1, 1000, size=int(rng.integers(1, 6))).tolist() for _ in range(k)]
        scores = rng.integers(1, 8, size=k).astype(float).tolist()
        groups.append(
            TokenizedGroup(record_index=first_index + 3 * g, query_ids=query, response_ids=responses, scores=scores)
        )
    return TokenizedData(groups=groups, stats={})


def oracle(groups):
    """Straightforward per-sequence construction of every PackedBatch field."""
    ids, positions, targets, response_index, cu, scores, group_index = [], [], [], [], [0], [], []
    for g, group in enumerate(groups):
        for response, score in zip(group.response_ids, group.scores):
            sequence = list(group.query_ids) + list(response)
            s = len(scores)
            for j, token in enumerate(sequence):
                ids.append(token)
                positions.append(j)
                is_response_next = j + 1 < len(sequence) and j + 1 >= len(group.query_ids)
                targets.append(sequence[j + 1] if is_response_next else -100)
                response_index.append(s)
            cu.append(cu[-1] + len(sequence))
            scores.append(score)
            group_index.append(g)
    return ids, positions, targets, response_index, cu, scores, group_index


# ------------------------------------------------------------------------------------ packing


@FAST
@given(groups_strategy())
def test_pack_groups_matches_the_oracle(groups):
    batch = pack_groups(groups)
    ids, positions, targets, response_index, cu, scores, group_index = oracle(groups)
    assert batch.input_ids.dtype == torch.int64 and batch.input_ids.tolist() == ids
    assert batch.position_ids.dtype == torch.int64 and batch.position_ids.tolist() == positions
    assert batch.targets.dtype == torch.int64 and batch.targets.tolist() == targets
    assert batch.response_index.dtype == torch.int64 and batch.response_index.tolist() == response_index
    assert batch.cu_seqlens.dtype == torch.int32 and batch.cu_seqlens.tolist() == cu
    assert batch.scores.dtype == torch.float32 and batch.scores.tolist() == scores
    assert batch.group_index.dtype == torch.int64 and batch.group_index.tolist() == group_index
    assert batch.max_seqlen == max(b - a for a, b in zip(cu, cu[1:]))
    assert batch.record_indices == [g.record_index for g in groups] and batch.num_groups == len(groups)
    assert batch.num_tokens == len(ids) == cu[-1]
    assert (
        batch.num_target_tokens
        == sum(t != -100 for t in targets)
        == sum(len(r) for g in groups for r in g.response_ids)
    )


@FAST
@given(groups_strategy())
def test_packed_invariants(groups):
    """The properties the loss relies on, checked directly on the tensors."""
    batch = pack_groups(groups)
    cu = batch.cu_seqlens.long()
    starts, ends = cu[:-1], cu[1:]
    # positions restart at 0 and count up inside each sequence
    assert torch.equal(batch.position_ids[starts], torch.zeros_like(starts))
    assert torch.equal(batch.position_ids, torch.arange(batch.num_tokens) - starts[batch.response_index])
    # the last token of every sequence predicts nothing (no target crosses a boundary)
    assert (batch.targets[ends - 1] == -100).all()
    sequence = 0
    for g, group in enumerate(groups):
        for response in group.response_ids:
            start = int(starts[sequence])
            last_query = start + len(group.query_ids) - 1
            # the last query token predicts the first response token; earlier query tokens predict nothing
            assert int(batch.targets[last_query]) == response[0]
            assert (batch.targets[start:last_query] == -100).all()
            # every response token (and only those) is the target of the position before it
            assert batch.targets[last_query:int(ends[sequence]) - 1].tolist() == list(response)
            assert int(batch.group_index[sequence]) == g
            sequence += 1
    # group_index contiguous, ascending, 0..G-1; groups whole
    assert torch.equal(torch.unique_consecutive(batch.group_index), torch.arange(len(groups)))
    assert torch.bincount(batch.group_index).tolist() == [len(g.response_ids) for g in groups]


def test_pack_groups_rejects_unusable_groups():
    with pytest.raises(ValueError, match="at least one group"):
        pack_groups([])
    with pytest.raises(ValueError, match="record 4"):
        pack_groups([TokenizedGroup(record_index=4, query_ids=[], response_ids=[[1]], scores=[1.0])])
    with pytest.raises(ValueError, match="empty response"):
        pack_groups([TokenizedGroup(record_index=4, query_ids=[1], response_ids=[[2], []], scores=[1.0, 2.0])])


def test_packed_batch_to_keeps_metadata():
    batch = pack_groups(make_data(3).groups)
    moved = batch.to("cpu", non_blocking=True)
    assert torch.equal(moved.targets, batch.targets) and moved.max_seqlen == batch.max_seqlen
    assert moved.record_indices == batch.record_indices and moved.num_groups == batch.num_groups
    assert moved.num_target_tokens == int((batch.targets != -100).sum())


# ------------------------------------------------------------------------------------ candidates


def test_candidate_sampling_picks_num_comp_in_original_order_and_is_uniform():
    counts = Counter()
    for record_index in range(3000):
        chosen = select_candidates(5, record_index, num_comp=3, seed=11, epoch=0)
        assert len(chosen) == 3 and chosen == sorted(chosen) and set(chosen) <= set(range(5))
        counts[tuple(chosen)] += 1
    assert len(counts) == 10  # every 3-of-5 subset occurs ...
    assert all(200 <= c <= 400 for c in counts.values()), counts  # ... about 300 times each
    assert select_candidates(2, 7, num_comp=3, seed=11, epoch=0) == [0, 1]  # fewer than num_comp: all
    assert select_candidates(6, 7, num_comp=None, seed=11, epoch=0) == list(range(6))


def test_candidates_depend_on_seed_epoch_and_record_index_only():
    picks = {(seed, epoch, index): select_candidates(6, index, num_comp=2, seed=seed, epoch=epoch)
             for seed in (0, 1) for epoch in (0, 1) for index in range(50)}
    # the same inputs give the same draw, whatever else is drawn alongside
    mask = candidate_mask(np.array([3, 6, 6]), np.array([99, 7, 8]), num_comp=2, seed=1, epoch=0)
    assert np.flatnonzero(mask[3:9]).tolist() == picks[(1, 0, 7)]
    assert np.flatnonzero(mask[9:]).tolist() == picks[(1, 0, 8)]
    assert mask[:3].sum() == 2
    # and a different seed or epoch changes the draws
    for a, b in [((0, 0), (0, 1)), ((0, 0), (1, 0))]:
        assert sum(picks[(*a, i)] != picks[(*b, i)] for i in range(50)) > 25


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_batcher_candidates_follow_record_index_not_layout(world_size):
    data = make_data(17, max_responses=6, seed=3)
    num_comp = 2
    for epoch in (0, 1):
        seen = {}
        for rank in range(world_size):
            batcher = GroupBatcher(data, num_comp=num_comp, seed=5, batch_size=2, world_size=world_size, rank=rank)
            for step in batcher.iter_steps(epoch):
                for batch in step.micro_batches:
                    if batch.num_groups == 0:
                        continue
                    for g, record_index in enumerate(batch.record_indices):
                        seen[record_index] = batch.scores[batch.group_index == g].tolist()
        for group in data.groups:
            chosen = select_candidates(
                len(group.response_ids), group.record_index, num_comp=num_comp, seed=5, epoch=epoch
            )
            assert seen[group.record_index] == [group.scores[j] for j in chosen]


def test_batcher_packs_the_chosen_candidates_tokens():
    data = make_data(8, max_responses=6, seed=9)
    batcher = GroupBatcher(data, num_comp=3, seed=2, batch_size=8, shuffle=False)
    (step,) = batcher.iter_steps(epoch=4)
    (batch,) = step.micro_batches
    expected = []
    for group in data.groups:
        chosen = select_candidates(len(group.response_ids), group.record_index, num_comp=3, seed=2, epoch=4)
        expected.append(TokenizedGroup(group.record_index, group.query_ids, [group.response_ids[j] for j in chosen],
                                       [group.scores[j] for j in chosen]))
    reference = pack_groups(expected)
    assert torch.equal(batch.input_ids, reference.input_ids) and torch.equal(batch.targets, reference.targets)
    assert torch.equal(batch.scores, reference.scores)


# ------------------------------------------------------------------------------------ seed_compat


def tagged_data(sizes, scores=None):
    """Group g (record index 5g) has query [1] and k = sizes[g] one-token responses: response j is [10 + j]."""
    groups = [TokenizedGroup(record_index=5 * g, query_ids=[1], response_ids=[[10 + j] for j in range(k)],
                             scores=list(scores[g]) if scores else [float(1 + j % 7) for j in range(k)])
              for g, k in enumerate(sizes)]
    return TokenizedData(groups=groups, stats={})


def packed_draws(data, epoch=0, **options):
    """{record index: ([response index of each packed sequence, in order], [its score])} over all ranks."""
    world_size = options.get("world_size", 1)
    draws = {}
    for rank in range(world_size):
        for step in GroupBatcher(data, rank=rank, **options).iter_steps(epoch):
            for batch in step.micro_batches:
                if batch.num_groups == 0:
                    continue
                last_tokens = batch.input_ids[batch.cu_seqlens[1:].long() - 1]  # [S]: the response token
                for g, record_index in enumerate(batch.record_indices):
                    members = batch.group_index == g
                    draws[record_index] = ((last_tokens[members] - 10).tolist(), batch.scores[members].tolist())
    return draws


def group_sequences(batch, g):
    """The token sequences (query + response) of group g of a packed batch, in packed order."""
    bounds = batch.cu_seqlens.tolist()
    return [tuple(batch.input_ids[bounds[s]:bounds[s + 1]].tolist())
            for s in torch.nonzero(batch.group_index == g).flatten().tolist()]


def test_seed_compat_packs_the_same_candidates_in_a_random_order():
    data = make_data(40, max_responses=6, seed=8)
    for num_comp in (3, None):
        for epoch in (0, 1):
            options = dict(num_comp=num_comp, seed=4, batch_size=3)
            paper = run_epoch(data, epoch=epoch, **options)[0]
            compat = run_epoch(data, epoch=epoch, seed_compat=True, **options)[0]
            for paper_step, compat_step in zip(paper, compat):
                for a, b in zip(paper_step.micro_batches, compat_step.micro_batches):
                    assert a.record_indices == b.record_indices            # same shuffle and packing
                    for g in range(len(a.record_indices)):
                        assert sorted(group_sequences(a, g)) == sorted(group_sequences(b, g))  # the same candidates ...
    # ... in an order that is a permutation drawn per record and per epoch
    data = tagged_data([4] * 60)
    by_epoch = [packed_draws(data, epoch=epoch, num_comp=5, seed=4, batch_size=4, seed_compat=True) for epoch in (0, 1)]
    for draws in by_epoch:
        assert all(sorted(order) == [0, 1, 2, 3] for order, _ in draws.values())
        assert sum(order != [0, 1, 2, 3] for order, _ in draws.values()) > 45       # 23/24 of them expected
        assert len({tuple(order) for order, _ in draws.values()}) > 12              # records differ
    assert sum(by_epoch[0][i][0] != by_epoch[1][i][0] for i in by_epoch[0]) > 45    # epochs differ
    # each response keeps its own score
    for order, scores in by_epoch[0].values():
        assert scores == [float(1 + j % 7) for j in order]


def test_seed_compat_draw_is_distributed_like_random_sample():
    """random.sample(k responses, min(k, num_comp)): every ordered draw equally likely."""
    for k, num_comp, outcomes in [(3, 2, 6), (3, 5, 6)]:   # 3*2 ordered pairs; 3! orders of all three
        draws = packed_draws(tagged_data([k] * 3000), num_comp=num_comp, seed=2, batch_size=50, seed_compat=True)
        counts = Counter(tuple(order) for order, _ in draws.values())
        assert len(counts) == outcomes and all(400 <= c <= 600 for c in counts.values()), counts


def test_seed_compat_truncates_scores_like_int():
    scores = [[6.5, 1.5, 7.0, 3.25]]
    draws = packed_draws(tagged_data([4], scores), num_comp=None, seed=0, seed_compat=True)
    ((order, packed),) = draws.values()
    assert packed == [float(int(scores[0][j])) for j in order]
    assert sorted(packed) == [1.0, 3.0, 6.0, 7.0]                               # 6.5 -> 6, 1.5 -> 1, 3.25 -> 3
    ((order, packed),) = packed_draws(tagged_data([4], scores), num_comp=None, seed=0).values()
    assert order == [0, 1, 2, 3] and packed == scores[0]                        # default: file order, as given


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_seed_compat_order_is_independent_of_world_size_and_accumulation(world_size):
    data = tagged_data([1 + g % 6 for g in range(23)])
    options = dict(num_comp=4, seed=9, batch_size=2, seed_compat=True)
    single = packed_draws(data, epoch=2, **options)
    assert packed_draws(data, epoch=2, world_size=world_size, gradient_accumulation_steps=2, **options) == single
    assert packed_draws(data, epoch=2, **{**options, "batch_size": None}, max_tokens_per_batch=9) == single
    assert len(single) == 23


def test_seed_compat_resume_reproduces_the_remaining_steps():
    data = make_data(30, max_responses=6)
    options = dict(num_comp=3, seed=1, batch_size=2, gradient_accumulation_steps=2, world_size=2, rank=1,
                   seed_compat=True)
    full = list(GroupBatcher(data, **options).iter_steps(epoch=3))
    for start in (1, len(full) - 1):
        resumed = list(GroupBatcher(data, **options).iter_steps(epoch=3, start_step=start))  # a fresh process
        assert [[batch_key(b) for b in s.micro_batches] for s in resumed] == \
               [[batch_key(b) for b in s.micro_batches] for s in full[start:]]


# ------------------------------------------------------------------------------------ sharding


def run_epoch(data, epoch=0, **options):
    """{rank: [OptimizerStep]} for every rank of one epoch."""
    world_size = options.get("world_size", 1)
    return {rank: list(GroupBatcher(data, rank=rank, **options).iter_steps(epoch)) for rank in range(world_size)}


def batch_key(batch):
    return (batch.num_groups, tuple(batch.record_indices), tuple(batch.input_ids.tolist()),
            tuple(batch.targets.tolist()), tuple(batch.scores.tolist()))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(num_groups=st.integers(1, 25), world_size=st.integers(1, 4), accumulation=st.integers(1, 3),
       batch_size=st.integers(1, 3), token_budget=st.one_of(st.none(), st.integers(1, 60)),
       seed=st.integers(0, 2**40), shuffle=st.booleans(), num_comp=st.integers(1, 4))
def test_every_group_once_per_epoch_with_matched_ranks(num_groups, world_size, accumulation, batch_size,
                                                       token_budget, seed, shuffle, num_comp):
    data = make_data(num_groups, seed=seed % 1000)
    options = dict(num_comp=num_comp, seed=seed, batch_size=batch_size, max_tokens_per_batch=token_budget,
                   gradient_accumulation_steps=accumulation, world_size=world_size, shuffle=shuffle)
    per_rank = run_epoch(data, **options)
    num_steps = GroupBatcher(data, **options).steps_per_epoch()
    assert all(len(steps) == num_steps for steps in per_rank.values())
    tokens_of = {g.record_index: {len(g.query_ids) + len(r) for r in g.response_ids} for g in data.groups}
    covered = Counter()
    for s in range(num_steps):
        steps = [per_rank[rank][s] for rank in range(world_size)]
        counts = {len(step.micro_batches) for step in steps}
        assert len(counts) == 1 and 1 <= counts.pop() <= accumulation      # same count on every rank
        real = [b for step in steps for b in step.micro_batches if b.num_groups > 0]
        assert {step.global_groups for step in steps} == {sum(b.num_groups for b in real)}
        assert sum(b.num_groups for step in steps for b in step.micro_batches) / steps[0].global_groups == 1
        if s < num_steps - 1:  # only the last step may run short
            assert (
                all(len(step.micro_batches) == accumulation for step in steps)
                and len(real) == world_size * accumulation
            )
        for step in steps:
            assert step.step_in_epoch == s and step.epoch == 0
            for batch in step.micro_batches:
                assert batch.num_tokens > 0 and len(batch.record_indices) >= 1
                if batch.num_groups == 0:  # filler: one real group, counted nowhere
                    assert len(batch.record_indices) == 1
                    continue
                assert batch.num_groups == len(batch.record_indices)
                if token_budget is None:
                    assert batch.num_groups <= batch_size
                else:
                    assert batch.num_tokens <= token_budget or batch.num_groups == 1
                for g, record_index in enumerate(batch.record_indices):
                    sizes = torch.diff(batch.cu_seqlens.long())[batch.group_index == g].tolist()
                    group = next(x for x in data.groups if x.record_index == record_index)
                    assert len(sizes) == min(len(group.response_ids), num_comp)       # the group is whole
                    assert set(sizes) <= tokens_of[record_index]
                covered.update(batch.record_indices)
    assert covered == Counter(g.record_index for g in data.groups)  # every record exactly once


def test_shuffle_is_seeded_by_seed_and_epoch():
    data = make_data(40)
    options = dict(num_comp=3, seed=7, batch_size=2, world_size=2, gradient_accumulation_steps=2)

    def order(epoch, **overrides):
        steps = run_epoch(data, epoch=epoch, **{**options, **overrides})
        return [[batch_key(b) for step in steps[rank] for b in step.micro_batches] for rank in sorted(steps)]

    assert order(0) == order(0)                   # same seed and epoch: identical batches
    assert order(1) != order(0)                   # another epoch: another order
    assert order(0, seed=8) != order(0)           # another seed: another order
    unshuffled = run_epoch(data, **{**options, "shuffle": False, "world_size": 1, "gradient_accumulation_steps": 1})[0]
    assert [i for step in unshuffled for b in step.micro_batches for i in b.record_indices] == [
        g.record_index for g in data.groups
    ]


@pytest.mark.parametrize("token_budget", [None, 40])
def test_resume_reproduces_the_remaining_steps(token_budget):
    data = make_data(30, max_responses=6)
    options = dict(num_comp=3, seed=1, batch_size=2, max_tokens_per_batch=token_budget,
                   gradient_accumulation_steps=2, world_size=2, rank=1)
    full = list(GroupBatcher(data, **options).iter_steps(epoch=3))
    assert len(full) >= 3
    for start in (1, len(full) - 1, len(full)):
        resumed = list(GroupBatcher(data, **options).iter_steps(epoch=3, start_step=start))  # a fresh process
        assert [s.step_in_epoch for s in resumed] == list(range(start, len(full)))
        assert [[batch_key(b) for b in s.micro_batches] for s in resumed] == \
               [[batch_key(b) for b in s.micro_batches] for s in full[start:]]
        assert [s.global_groups for s in resumed] == [s.global_groups for s in full[start:]]
    with pytest.raises(ValueError, match="outside epoch 3"):
        next(GroupBatcher(data, **options).iter_steps(epoch=3, start_step=len(full) + 1))


def test_last_step_fillers_keep_ranks_matched():
    data = make_data(5)  # 5 micro-batches over 4 ranks x 2 accumulation: one short step
    per_rank = run_epoch(data, num_comp=3, seed=0, batch_size=1, world_size=4, gradient_accumulation_steps=2)
    (steps,) = zip(*per_rank.values())
    assert [len(s.micro_batches) for s in steps] == [2, 2, 2, 2]
    assert [[b.num_groups for b in s.micro_batches] for s in steps] == [[1, 1], [1, 0], [1, 0], [1, 0]]
    assert {s.global_groups for s in steps} == {5}


def test_token_budget_packs_greedily_and_isolates_oversized_groups():
    groups = [TokenizedGroup(record_index=i, query_ids=[1] * q, response_ids=[[2] * r], scores=[3.0])
              for i, (q, r) in enumerate([(2, 2), (2, 2), (3, 3), (20, 20), (1, 1), (1, 1)])]
    data = TokenizedData(groups=groups, stats={})
    batcher = GroupBatcher(data, num_comp=3, seed=0, batch_size=None, max_tokens_per_batch=10, shuffle=False)
    batches = [b for step in batcher.iter_steps(0) for b in step.micro_batches]
    assert [b.record_indices for b in batches] == [[0, 1], [2], [3], [4, 5]]
    assert [b.num_tokens for b in batches] == [8, 6, 40, 4]
    assert batcher.oversized_groups() == 1 and batcher.steps_per_epoch() == 4 == batcher.total_steps(1)


def test_total_steps_sums_epochs_and_batch_size_mode_is_epoch_independent():
    data = make_data(23)
    batcher = GroupBatcher(data, num_comp=2, seed=0, batch_size=2, gradient_accumulation_steps=3, world_size=2)
    assert [batcher.steps_per_epoch(e) for e in range(3)] == [2, 2, 2] and batcher.total_steps(3) == 6


def test_invalid_options_and_empty_data():
    data = make_data(3)
    with pytest.raises(ConfigError, match="--num_comp"):
        GroupBatcher(data, num_comp=0, seed=0)
    with pytest.raises(ConfigError, match="--per_device_train_batch_size"):
        GroupBatcher(data, num_comp=2, seed=0, batch_size=0)
    with pytest.raises(ConfigError, match="--max_tokens_per_batch"):
        GroupBatcher(data, num_comp=2, seed=0, max_tokens_per_batch=0)
    with pytest.raises(ConfigError, match="--gradient_accumulation_steps"):
        GroupBatcher(data, num_comp=2, seed=0, gradient_accumulation_steps=0)
    with pytest.raises(ValueError, match="rank 2"):
        GroupBatcher(data, num_comp=2, seed=0, world_size=2, rank=2)
    with pytest.raises(DataError, match="no usable records"):
        GroupBatcher(TokenizedData(groups=[], stats={"dropped_no_room": 4}), num_comp=2, seed=0)


def test_batch_options_combinations_cover_all_world_sizes_exhaustively():
    """A deterministic sweep next to the hypothesis test: world 1..4 x accumulation 1..3."""
    data = make_data(11, max_responses=4, seed=4)
    for world_size, accumulation in itertools.product(range(1, 5), range(1, 4)):
        per_rank = run_epoch(data, epoch=2, num_comp=2, seed=3, batch_size=2,
                             gradient_accumulation_steps=accumulation, world_size=world_size)
        seen = [i for steps in per_rank.values() for step in steps for b in step.micro_batches if b.num_groups
                for i in b.record_indices]
        assert sorted(seen) == sorted(g.record_index for g in data.groups)
        for s in range(len(per_rank[0])):
            assert len({len(per_rank[r][s].micro_batches) for r in per_rank}) == 1
