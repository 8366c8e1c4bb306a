"""Token counts of a planned run: the micro-batches the trainer would cut from the data, or from the
flags' worst case, as fastalign.data.packing packs them (docs/design.md, fastalign/plan/__init__.py)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from fastalign.plan import memory as pm

# torch, numpy and the trainer's modules are imported where used: the planner's --help and a usage
# error do not pay for them.


@dataclass(frozen=True)
class Workload:
    """What the data (or the flags) imply per rank and per epoch."""

    largest: pm.MicroBatch  # the largest micro-batch (by tokens, then gathered key rows) any rank runs
    largest_group_tokens: int  # the largest group: no --max_tokens_per_batch can split it
    largest_step_tokens: int  # the most tokens one rank's groups of one step take: no budget packs more
    micro_batches_per_step: float  # per rank (the same on every rank); a mean over the epoch with data
    tokens_per_step: float  # computed tokens of one optimizer step, all ranks
    attention_work_per_step: float  # sum of PackedBatch.attention_work (attention FLOPs), all ranks
    steps_per_epoch: int | None  # None without data
    source: str  # "data FILE" or "flags"


COUNT_FIELDS = ("tokens", "target_tokens", "key_tokens", "mask_elements", "attention_work")


def group_counts(query: int, responses: Sequence[int], share_prefix: bool) -> tuple[int, int, int, int, int]:
    """One group as fastalign.data.packing packs it: (computed tokens, target tokens, gathered key/value
    rows, sdpa mask elements, attention work), the fields of `pm.MicroBatch` plus the attention
    FLOP term (PackedBatch.attention_work: sum over segments of Lq (2 Lk - Lq)).

    Unshared: per response r one segment of q + r tokens (r targets), attention (q + r)^2, no
    gather. Shared prefix: a query segment of q - 1 tokens (attention (q - 1)^2), then per
    response a segment of 1 + r queries over q + r keys (the query segment's and its own): they
    gather (q - 1) + sum (q + r) key rows, and with q > 1 each response segment's keys include the
    query segment, which the sdpa fallback masks with a [1 + r, q + r] tensor.
    """
    from fastalign.data.packing import packed_tokens

    tokens, targets = packed_tokens(query, responses, share_prefix), sum(responses)
    if not share_prefix:
        return tokens, targets, 0, 0, sum((query + r) ** 2 for r in responses)
    keys = query - 1 + sum(query + r for r in responses)
    mask = sum((1 + r) * (query + r) for r in responses) if query > 1 else 0
    work = (query - 1) ** 2 + sum((1 + r) * (2 * (query + r) - (1 + r)) for r in responses)
    return tokens, targets, keys, mask, work


def _micro_batch(counts: Sequence[float]) -> pm.MicroBatch:
    return pm.MicroBatch(*(int(round(c)) for c in counts[:4]))


def step_budget(args) -> int | None:
    """The trainer's step-level packing budget for these flags (fastalign.config.step_token_budget):
    the device default when --max_tokens_per_batch is not given, None for 0."""
    import torch

    from fastalign.config import step_token_budget

    return step_token_budget(args.max_tokens_per_batch, torch.device(args.device),
                             batch_size=args.per_device_train_batch_size, num_comp=args.num_comp,
                             model_max_length=args.model_max_length)


def workload_from_flags(args) -> Workload:
    """Memory: the flags' worst case, every group with num_comp responses filling model_max_length.
    A one-token query maximises a group's computed tokens (k L in either layout) and, with two or
    more responses, its bytes; with one response the tokens are L whatever the query, and the
    longest query (L - 1) gathers the most key rows. The step's bs x GA groups are cut as the
    trainer cuts them; a budget larger than whole groups fill may be filled by shorter groups, up
    to the step's worst-case tokens (the same shares of targets and key rows). Time: the same worst
    case, or with --num_records groups of num_comp responses of the assumed mean lengths."""
    length, k = args.model_max_length, args.num_comp
    query = length - 1 if (k == 1 and args.share_prefix) else 1
    group = group_counts(query, [length - query] * k, args.share_prefix)
    step_groups = args.per_device_train_batch_size * args.gradient_accumulation_steps
    budget = step_budget(args)

    def cut(tokens: float) -> tuple[int, int]:  # (groups per micro-batch, micro-batches per step)
        if budget is None:
            per_micro = args.per_device_train_batch_size
        else:
            per_micro = max(1, min(step_groups, int(budget // tokens)))
        return per_micro, math.ceil(step_groups / per_micro)

    per_micro, micro_batches = cut(group[0])
    counts = [c * per_micro for c in group]
    if budget is not None and group[0] <= budget and counts[0] < min(budget, step_groups * group[0]):
        fill = min(budget, step_groups * group[0]) / counts[0]  # shorter groups fill the budget
        counts = [c * fill for c in counts]
    largest = _micro_batch(counts)
    worst = Workload(largest=largest, largest_group_tokens=group[0], largest_step_tokens=step_groups * group[0],
                     micro_batches_per_step=micro_batches,
                     tokens_per_step=float(args.world_size * step_groups * group[0]),
                     attention_work_per_step=float(args.world_size * step_groups * group[4]),
                     steps_per_epoch=None, source="flags (worst case: full-length sequences)")
    if args.num_records is None:
        return worst
    sequence = args.mean_sequence_tokens or float(length)
    query = args.mean_query_tokens or sequence / 2
    mean = group_counts(query, [sequence - query] * k, args.share_prefix)
    steps = math.ceil(args.num_records / (args.world_size * step_groups))
    return Workload(largest=largest, largest_group_tokens=worst.largest_group_tokens,
                    largest_step_tokens=worst.largest_step_tokens, micro_batches_per_step=cut(mean[0])[1],
                    tokens_per_step=args.num_records * mean[0] / steps,
                    attention_work_per_step=args.num_records * mean[4] / steps, steps_per_epoch=steps,
                    source=f"flags (memory: full-length sequences; time: {args.num_records} records of "
                           f"{k} x {sequence:g} tokens, queries {query:g}, assumed)")


def workload_from_data(args, tokenizer_dir: str) -> Workload:
    """Epoch 0 of the trainer's own batcher (candidates, shuffle, step-level packing, dealing to
    ranks), every step of every rank: the micro-batches' group positions from
    `GroupBatcher.step_assignment`, each group counted as `group_counts` packs its candidates."""
    import numpy as np

    from fastalign.data import GroupBatcher, candidate_mask
    from fastalign.data.loading import tokenize_file
    from fastalign.model_dir import load_tokenizer

    tokenized, _ = tokenize_file(args.data_path, load_tokenizer(tokenizer_dir), args)
    groups = tokenized.groups
    batcher = GroupBatcher(tokenized, num_comp=args.num_comp, seed=args.seed,
                           batch_size=args.per_device_train_batch_size, step_token_budget=step_budget(args),
                           gradient_accumulation_steps=args.gradient_accumulation_steps,
                           world_size=args.world_size, rank=0, shuffle=True, share_prefix=args.share_prefix)
    selected = candidate_mask(np.array([len(g.response_ids) for g in groups]),
                              np.array([g.record_index for g in groups]),
                              num_comp=args.num_comp, seed=args.seed, epoch=0)
    counts, start = [], 0
    for g in groups:
        chosen = [len(r) for r, keep in zip(g.response_ids, selected[start:start + len(g.response_ids)]) if keep]
        start += len(g.response_ids)
        counts.append(group_counts(len(g.query_ids), chosen, args.share_prefix))
    counts = np.array(counts, dtype=np.int64)  # [G, 5]: COUNT_FIELDS
    largest, step_tokens, micro_batches = np.zeros(5, dtype=np.int64), 0, 0
    totals = np.zeros(5, dtype=np.int64)
    steps = batcher.steps_per_epoch(0)
    for step in range(steps):
        for rank in range(args.world_size):
            assignment, _ = batcher.step_assignment(0, step, rank)
            real = [counts[positions].sum(axis=0) for positions in assignment if positions is not None]
            for batch in real:  # fillers (None) repeat a group whose work is thrown away: not counted
                if (batch[0], batch[2]) > (largest[0], largest[2]):
                    largest = batch
                totals += batch
            step_tokens = max(step_tokens, int(sum(batch[0] for batch in real)))
        micro_batches += len(assignment)
    return Workload(largest=_micro_batch(largest), largest_group_tokens=int(counts[:, 0].max()),
                    largest_step_tokens=step_tokens, micro_batches_per_step=micro_batches / steps,
                    tokens_per_step=float(totals[0] / steps), attention_work_per_step=float(totals[4] / steps),
                    steps_per_epoch=steps, source=f"data {args.data_path} (epoch 0: {len(groups)} groups)")
