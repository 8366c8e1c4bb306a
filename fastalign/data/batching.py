"""Candidate sampling and the resumable plan of micro-batches over steps, accumulation and ranks.

Details: docs/design.md section 7.5.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from fastalign.data.packing import PackedBatch, pack_groups
from fastalign.data.tokenization import TokenizedData, TokenizedGroup
from fastalign.errors import ConfigError, DataError

# ---------------------------------------------------------------------------------------------
# Candidate sampling
# ---------------------------------------------------------------------------------------------

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser over a uint64 array (wrapping arithmetic): a well-mixed 64-bit hash."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _as_uint64(value: int) -> np.ndarray:
    return np.array([value & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64)


def draw_ranks(num_responses: np.ndarray, record_indices: np.ndarray, *, seed: int, epoch: int) -> np.ndarray:
    """Each response's place in a random order of its group: int64 [sum(k)], in group order.

    num_responses [G] (k of each group), record_indices [G]. Group g's entries are a permutation of
    0..k_g-1: the ranks of the hashes of (seed, epoch, record index, response index), so the order
    is uniformly random and depends on nothing else (not the rank, the world size or the other
    records). The first num_comp of that order are the candidates (candidate_mask); with
    GroupBatcher's seed_compat they are also packed in that order, as `random.sample` returns its draw.
    """
    num_responses = np.asarray(num_responses, dtype=np.int64)
    total = int(num_responses.sum())
    group_of = np.repeat(np.arange(len(num_responses)), num_responses)            # [R]
    starts = np.zeros(len(num_responses), dtype=np.int64)
    np.cumsum(num_responses[:-1], out=starts[1:])
    local = np.arange(total, dtype=np.int64) - starts[group_of]                    # response index in group
    with np.errstate(over="ignore"):
        key = _splitmix64(_splitmix64(_as_uint64(seed)) ^ _as_uint64(epoch))
        key = _splitmix64(key ^ np.asarray(record_indices, dtype=np.int64).astype(np.uint64)[group_of])
        key = _splitmix64(key ^ local.astype(np.uint64))
    order = np.lexsort((key, group_of))            # by group, then by key within the group
    rank_in_group = np.empty(total, dtype=np.int64)
    rank_in_group[order] = np.arange(total, dtype=np.int64) - starts[group_of[order]]
    return rank_in_group


def candidate_mask(num_responses: np.ndarray, record_indices: np.ndarray, *, num_comp: int | None,
                   seed: int, epoch: int) -> np.ndarray:
    """Which responses each group uses this epoch, as a flat bool mask over all responses.

    num_responses [G] (k of each group), record_indices [G]; returns bool [sum(k)] in group order.
    A group with k <= num_comp (or num_comp None) keeps all; otherwise exactly num_comp responses,
    the first num_comp of its draw_ranks order: a uniform random subset that depends on nothing
    else (not the rank, the world size or the other records).
    """
    num_responses = np.asarray(num_responses, dtype=np.int64)
    total = int(num_responses.sum())
    if num_comp is None or total == 0 or int(num_responses.max()) <= num_comp:
        return np.ones(total, dtype=bool)
    return draw_ranks(num_responses, record_indices, seed=seed, epoch=epoch) < num_comp


def select_candidates(num_responses: int, record_index: int, *, num_comp: int | None, seed: int,
                      epoch: int) -> list[int]:
    """The response indices (ascending) one record uses in `epoch`; see candidate_mask."""
    mask = candidate_mask(np.array([num_responses]), np.array([record_index]), num_comp=num_comp,
                          seed=seed, epoch=epoch)
    return np.flatnonzero(mask).tolist()


# ---------------------------------------------------------------------------------------------
# Batching over steps, accumulation and ranks
# ---------------------------------------------------------------------------------------------


@dataclass
class OptimizerStep:
    epoch: int
    step_in_epoch: int
    micro_batches: list[PackedBatch]  # this rank's; the same count on every rank
    global_groups: int                # real groups of this step over all micro-batches and ranks


@dataclass
class _EpochPlan:
    selected: np.ndarray              # bool [R]: candidate mask over all responses
    draw_rank: np.ndarray | None      # int64 [R]: draw_ranks, the candidates' order (seed_compat only)
    group_tokens: np.ndarray          # int64 [G]: packed tokens of each group with its candidates (in the layout)
    micro_batches: list[np.ndarray]   # group positions of each micro-batch, in epoch order
    num_steps: int


class GroupBatcher:
    """Candidate sampling + packing + rank sharding with a resumable, deterministic plan.

    `batch_size` groups per micro-batch, or with `max_tokens_per_batch` (which then takes
    precedence) as many consecutive groups as fit that many tokens; a group larger than the budget
    goes alone in its micro-batch. See docs/design.md section 7.5 for the dealing of micro-batches to
    steps and ranks and for filler batches.

    `seed_compat=True` reproduces the original collator for `--margin_mode seed`: every group's
    candidates (the same ones as without it) are packed in a random order seeded by (seed, epoch,
    record index) -- the order `random.sample` put them in, even when k <= num_comp -- and their
    scores are truncated with int() (6.5 -> 6). Deterministic and independent of rank, world size
    and resumption like the rest of the plan. Default False: file order, scores as given.
    """

    def __init__(self, data: TokenizedData, *, num_comp: int | None, seed: int, batch_size: int | None = 1,
                 max_tokens_per_batch: int | None = None, gradient_accumulation_steps: int = 1,
                 world_size: int = 1, rank: int = 0, shuffle: bool = True, seed_compat: bool = False,
                 step_token_budget: int | None = None, share_prefix: bool = False):
        if not data.groups:
            raise DataError("no usable records left after tokenization "
                            f"(tokenization stats: {dict(data.stats)})")
        if num_comp is not None and num_comp < 1:
            raise ConfigError(f"--num_comp must be at least 1, got {num_comp}")
        if max_tokens_per_batch is None:
            if batch_size is None or batch_size < 1:
                raise ConfigError(f"--per_device_train_batch_size must be at least 1, got {batch_size}")
        elif max_tokens_per_batch < 1:
            raise ConfigError(f"--max_tokens_per_batch must be at least 1, got {max_tokens_per_batch}")
        if step_token_budget is not None:
            if step_token_budget < 1:
                raise ConfigError(f"--max_tokens_per_batch must be at least 1, got {step_token_budget}")
            if max_tokens_per_batch is not None:
                raise ValueError("step_token_budget re-cuts batch_size micro-batches; it excludes max_tokens_per_batch")
        if gradient_accumulation_steps < 1:
            raise ConfigError(f"--gradient_accumulation_steps must be at least 1, got {gradient_accumulation_steps}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size} processes")
        if seed < 0:
            raise ConfigError(f"--seed must be non-negative, got {seed}")
        self.data = data
        self.num_comp = num_comp
        self.seed = seed
        self.batch_size = batch_size
        self.max_tokens_per_batch = max_tokens_per_batch
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.world_size = world_size
        self.rank = rank
        self.shuffle = shuffle
        self.seed_compat = seed_compat
        self.step_token_budget = step_token_budget
        self.share_prefix = share_prefix

        groups = data.groups
        self._num_responses = np.array([len(g.response_ids) for g in groups], dtype=np.int64)     # [G]
        self._record_indices = np.array([g.record_index for g in groups], dtype=np.int64)         # [G]
        self._response_starts = np.zeros(len(groups) + 1, dtype=np.int64)                         # [G+1]
        np.cumsum(self._num_responses, out=self._response_starts[1:])
        self._group_of_response = np.repeat(np.arange(len(groups)), self._num_responses)          # [R]
        query_lengths = np.array([len(g.query_ids) for g in groups], dtype=np.int64)
        response_lengths = np.array([len(r) for g in groups for r in g.response_ids], dtype=np.int64)
        # Packed tokens of each response, and of each group besides its responses (fastalign.data.packing):
        # unshared, every response carries the whole query; shared, one token of it (its copy of the
        # last query token) and the group's query segment holds the other Lq - 1 once.
        if share_prefix:
            self._response_tokens = 1 + response_lengths                                          # [R]
            self._group_base_tokens = query_lengths - 1                                           # [G]
        else:
            self._response_tokens = query_lengths[self._group_of_response] + response_lengths      # [R]
            self._group_base_tokens = np.zeros(len(groups), dtype=np.int64)                       # [G]
        self._plans: dict[int, _EpochPlan] = {}

    # -- planning ------------------------------------------------------------------------------

    @property
    def slots_per_step(self) -> int:
        return self.world_size * self.gradient_accumulation_steps

    def _plan(self, epoch: int) -> _EpochPlan:
        plan = self._plans.get(epoch)
        if plan is not None:
            return plan
        num_groups = len(self.data.groups)
        draw_rank = None
        if self.seed_compat:
            draw_rank = draw_ranks(self._num_responses, self._record_indices, seed=self.seed, epoch=epoch)
            selected = np.ones(len(draw_rank), dtype=bool) if self.num_comp is None else draw_rank < self.num_comp
        else:
            selected = candidate_mask(self._num_responses, self._record_indices, num_comp=self.num_comp,
                                      seed=self.seed, epoch=epoch)
        group_tokens = self._group_base_tokens + np.bincount(
            self._group_of_response[selected], weights=self._response_tokens[selected],
            minlength=num_groups).astype(np.int64)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(num_groups)
        else:
            order = np.arange(num_groups)
        if self.max_tokens_per_batch is None:
            micro_batches = [order[i:i + self.batch_size] for i in range(0, num_groups, self.batch_size)]
        else:
            micro_batches = self._fill_token_budget(order, group_tokens)
        plan = _EpochPlan(selected=selected, draw_rank=draw_rank, group_tokens=group_tokens,
                          micro_batches=micro_batches, num_steps=-(-len(micro_batches) // self.slots_per_step))
        if len(self._plans) >= 2:  # current and next epoch are all a run needs
            self._plans.pop(next(iter(self._plans)))
        self._plans[epoch] = plan
        return plan

    def _fill_token_budget(self, order: np.ndarray, group_tokens: np.ndarray,
                           budget: int | None = None) -> list[np.ndarray]:
        """Greedy: consecutive groups of `order` while their tokens fit the budget."""
        budget = self.max_tokens_per_batch if budget is None else budget
        micro_batches: list[np.ndarray] = []
        start, used = 0, 0
        tokens_in_order = group_tokens[order].tolist()
        for i, tokens in enumerate(tokens_in_order):
            if i > start and used + tokens > budget:
                micro_batches.append(order[start:i])
                start, used = i, 0
            used += tokens
        micro_batches.append(order[start:])
        return micro_batches

    def steps_per_epoch(self, epoch: int = 0) -> int:
        """Optimizer steps in `epoch`, the same on every rank. Fixed with `batch_size`; with
        `max_tokens_per_batch` it can differ slightly between epochs (the packing follows the
        epoch's shuffle and candidates), hence the argument."""
        return self._plan(epoch).num_steps

    def total_steps(self, num_epochs: int) -> int:
        return sum(self.steps_per_epoch(epoch) for epoch in range(num_epochs))

    def oversized_groups(self, epoch: int = 0) -> int:
        """Groups that exceed max_tokens_per_batch on their own (each packed alone); 0 without a budget."""
        if self.max_tokens_per_batch is None:
            return 0
        return int((self._plan(epoch).group_tokens > self.max_tokens_per_batch).sum())

    def step_assignment(self, epoch: int, step: int, rank: int | None = None) -> tuple[list[np.ndarray | None], int]:
        """(micro-batches of `rank` in `step` as group positions, None for a filler; global_groups)."""
        plan = self._plan(epoch)
        rank = self.rank if rank is None else rank
        slots = plan.micro_batches[step * self.slots_per_step:(step + 1) * self.slots_per_step]
        per_rank_slots = [slots[r::self.world_size] for r in range(self.world_size)]
        if self.step_token_budget is not None:  # step-level packing: re-cut each rank's groups
            per_rank_slots = [self._fill_token_budget(np.concatenate(own), plan.group_tokens, self.step_token_budget)
                              if own else [] for own in per_rank_slots]
        per_rank = max(len(own) for own in per_rank_slots)
        mine: list[np.ndarray | None] = list(per_rank_slots[rank])
        mine += [None] * (per_rank - len(mine))
        return mine, sum(len(micro) for micro in slots)

    # -- iteration -----------------------------------------------------------------------------

    def iter_steps(self, epoch: int, start_step: int = 0) -> Iterator[OptimizerStep]:
        """This rank's optimizer steps of `epoch` from `start_step` on (packing happens lazily)."""
        num_steps = self.steps_per_epoch(epoch)
        if not 0 <= start_step <= num_steps:
            raise ValueError(f"start_step {start_step} is outside epoch {epoch}'s {num_steps} steps")
        for step in range(start_step, num_steps):
            assignment, global_groups = self.step_assignment(epoch, step)
            micro_batches = [self._pack(epoch, positions) if positions is not None else self._filler(epoch, step)
                             for positions in assignment]
            yield OptimizerStep(epoch=epoch, step_in_epoch=step, micro_batches=micro_batches,
                                global_groups=global_groups)

    def _candidates(self, epoch: int, position: int) -> TokenizedGroup:
        """The group at `position` as packed in `epoch`: its candidates, in order, with their scores."""
        group = self.data.groups[position]
        plan = self._plan(epoch)
        responses = slice(self._response_starts[position], self._response_starts[position + 1])
        selected = plan.selected[responses]
        if self.seed_compat:
            chosen = np.flatnonzero(selected)
            chosen = chosen[np.argsort(plan.draw_rank[responses][chosen])].tolist()  # draw order
            scores = [float(int(group.scores[j])) for j in chosen]                   # the original's int()
        elif selected.all():
            return group
        else:
            chosen = np.flatnonzero(selected).tolist()
            scores = [group.scores[j] for j in chosen]
        return TokenizedGroup(record_index=group.record_index, query_ids=group.query_ids,
                              response_ids=[group.response_ids[j] for j in chosen], scores=scores,
                              response_positions=[group.response_positions[j] for j in chosen])

    def _pack(self, epoch: int, positions: Iterable[int], num_groups: int | None = None) -> PackedBatch:
        return pack_groups([self._candidates(epoch, int(p)) for p in positions], num_groups=num_groups,
                           share_prefix=self.share_prefix)

    def _filler(self, epoch: int, step: int) -> PackedBatch:
        """A micro-batch that keeps shapes non-empty but counts 0 groups: the step's smallest group."""
        plan = self._plan(epoch)
        slots = plan.micro_batches[step * self.slots_per_step:(step + 1) * self.slots_per_step]
        positions = np.concatenate(slots)
        smallest = positions[np.argmin(plan.group_tokens[positions])]
        return self._pack(epoch, [smallest], num_groups=0)
