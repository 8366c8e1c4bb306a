"""Tokenized groups -> one padding-free packed micro-batch (`PackedBatch`), in one of two layouts.

Details: docs/design.md section 7.7.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fastalign.data.tokenization import TokenizedGroup

IGNORE_INDEX = -100


@dataclass
class PackedBatch:
    input_ids: torch.Tensor       # int64 [T]: the segments' tokens concatenated
    position_ids: torch.Tensor    # int64 [T]: each token's position in its query + response sequence
    cu_seqlens: torch.Tensor      # int32 [N+1]: segment boundaries in the stream (queries of attention)
    max_seqlen: int               # longest segment
    targets: torch.Tensor         # int64 [T]: next response token of the same segment, else -100
    response_index: torch.Tensor  # int64 [T]: response of each position (query segment: its group's first)
    scores: torch.Tensor          # float32 [S]: rating of each response
    group_index: torch.Tensor     # int64 [S]: group of each response, 0..G-1 ascending
    record_indices: list[int]     # [G]: file index of each group's record
    num_groups: int               # groups counted in the loss; 0 for a filler batch
    target_token_count: int = -1  # cached count of targets != -100 (-1: count on demand)
    # Shared-prefix layout only (None: every segment attends to itself alone, the unshared layout):
    kv_index: torch.Tensor | None = None      # int64 [Tk]: stream positions of each segment's keys/values
    cu_seqlens_k: torch.Tensor | None = None  # int32 [N+1]: boundaries of those key segments in kv_index
    max_seqlen_k: int = 0                     # longest key segment (= max_seqlen when unshared)
    sequence_tokens: int = 0                  # sum over responses of len(query) + len(response)
    attention_work: int = 0                   # sum over segments of Lq * (2 Lk - Lq) (L^2 when Lq = Lk)

    @property
    def num_tokens(self) -> int:
        """Positions in the stream: the tokens every layer computes (`computed_tokens`)."""
        return self.input_ids.numel()

    computed_tokens = num_tokens

    @property
    def shares_prefix(self) -> bool:
        return self.kv_index is not None

    @property
    def num_sequences(self) -> int:
        return self.scores.numel()

    @property
    def num_target_tokens(self) -> int:
        if self.target_token_count < 0:
            self.target_token_count = int((self.targets != IGNORE_INDEX).sum())
        return self.target_token_count

    def attention_inputs(self) -> dict[str, Any]:
        """The keyword arguments of `Llama.forward` after input_ids and position_ids."""
        return dict(cu_seqlens=self.cu_seqlens, max_seqlen=self.max_seqlen, kv_index=self.kv_index,
                    cu_seqlens_k=self.cu_seqlens_k, max_seqlen_k=self.max_seqlen_k)

    def to(self, device: Any, non_blocking: bool = False) -> PackedBatch:
        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device, non_blocking=non_blocking)

        return PackedBatch(
            input_ids=move(self.input_ids), position_ids=move(self.position_ids),
            cu_seqlens=move(self.cu_seqlens), max_seqlen=self.max_seqlen, targets=move(self.targets),
            response_index=move(self.response_index), scores=move(self.scores),
            group_index=move(self.group_index), record_indices=list(self.record_indices),
            num_groups=self.num_groups, target_token_count=self.target_token_count,
            kv_index=move(self.kv_index), cu_seqlens_k=move(self.cu_seqlens_k), max_seqlen_k=self.max_seqlen_k,
            sequence_tokens=self.sequence_tokens, attention_work=self.attention_work,
        )


def packed_tokens(query_length: int, response_lengths: Sequence[int], share_prefix: bool) -> int:
    """Stream positions one group takes in a packed batch of the given layout."""
    if share_prefix:
        return query_length - 1 + sum(1 + n for n in response_lengths)
    return query_length * len(response_lengths) + sum(response_lengths)


def _check_group(group: TokenizedGroup) -> None:
    if len(group.query_ids) == 0 or len(group.response_ids) == 0 or len(group.response_ids) != len(group.scores):
        raise ValueError(f"group of record {group.record_index} needs a non-empty query and one score "
                         "per non-empty response (tokenize_records guarantees this)")
    if any(len(response) == 0 for response in group.response_ids):
        raise ValueError(f"group of record {group.record_index} has an empty response")


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(start, start + length) for each pair: int64 [sum(lengths)]."""
    offsets = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=offsets[1:])
    return np.arange(int(lengths.sum()), dtype=np.int64) + np.repeat(starts - offsets, lengths)


def pack_groups(groups: Sequence[TokenizedGroup], *, num_groups: int | None = None,
                share_prefix: bool = False) -> PackedBatch:
    """Pack every response of each group, in order, into one padding-free micro-batch.

    `share_prefix` picks the layout (docs/design.md section 7.7). `num_groups` defaults to len(groups);
    GroupBatcher passes 0 for filler batches.
    """
    if not groups:
        raise ValueError("pack_groups needs at least one group")
    for group in groups:
        _check_group(group)
    packed = (_pack_shared if share_prefix else _pack_unshared)(groups)
    scores = [score for group in groups for score in group.scores]
    responses_per_group = [len(group.response_ids) for group in groups]
    sequence_tokens = sum(len(g.query_ids) * len(g.response_ids) + sum(map(len, g.response_ids)) for g in groups)
    return PackedBatch(
        **packed,
        scores=torch.tensor(scores, dtype=torch.float32),
        group_index=torch.from_numpy(np.repeat(np.arange(len(groups), dtype=np.int64), responses_per_group)),
        record_indices=[group.record_index for group in groups],
        num_groups=len(groups) if num_groups is None else num_groups,
        sequence_tokens=sequence_tokens,
    )


def _pack_unshared(groups: Sequence[TokenizedGroup]) -> dict[str, Any]:
    """One segment `query + response` per response."""
    flat_ids: list[int] = []
    query_lengths: list[int] = []
    sequence_lengths: list[int] = []
    for group in groups:
        query = group.query_ids
        for response in group.response_ids:
            flat_ids.extend(query)
            flat_ids.extend(response)
            query_lengths.append(len(query))
            sequence_lengths.append(len(query) + len(response))

    input_ids = np.asarray(flat_ids, dtype=np.int64)                       # [T]
    lengths = np.asarray(sequence_lengths, dtype=np.int64)                 # [S]
    cu_seqlens = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=cu_seqlens[1:])
    response_index = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)    # [T]
    position_ids = np.arange(len(input_ids), dtype=np.int64) - cu_seqlens[:-1][response_index]
    # Position p predicts token p+1; it is a target when p+1 is a response token of the same
    # sequence: local positions from the last query token to the second-to-last token.
    first_target = (np.asarray(query_lengths, dtype=np.int64) - 1)[response_index]
    last_target = (lengths - 2)[response_index]
    predicting = np.flatnonzero((position_ids >= first_target) & (position_ids <= last_target))
    targets = np.full(len(input_ids), IGNORE_INDEX, dtype=np.int64)
    targets[predicting] = input_ids[predicting + 1]
    return dict(
        input_ids=torch.from_numpy(input_ids),
        position_ids=torch.from_numpy(position_ids),
        cu_seqlens=torch.from_numpy(cu_seqlens.astype(np.int32)),
        max_seqlen=int(lengths.max()),
        targets=torch.from_numpy(targets),
        response_index=torch.from_numpy(response_index),
        target_token_count=len(predicting),
        max_seqlen_k=int(lengths.max()),
        attention_work=int((lengths * lengths).sum()),
    )


def _pack_shared(groups: Sequence[TokenizedGroup]) -> dict[str, Any]:
    """Query segment once per group, then `[last query token] + response` per response."""
    flat_ids: list[int] = []
    positions: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    response_of: list[np.ndarray] = []
    seg_starts: list[int] = []   # [N] stream offset of each segment
    seg_lengths: list[int] = []  # [N]
    prefix_starts: list[int] = []   # [N] stream offset of the query segment a segment also attends to
    prefix_lengths: list[int] = []  # [N] its length (0 for query segments and one-token queries)
    response = 0
    for group in groups:
        query = group.query_ids
        shared = len(query) - 1                  # tokens in the query segment
        prefix_start = len(flat_ids)
        if shared:
            flat_ids.extend(query[:-1])
            positions.append(np.arange(shared, dtype=np.int64))
            targets.append(np.full(shared, IGNORE_INDEX, dtype=np.int64))
            response_of.append(np.full(shared, response, dtype=np.int64))
            seg_starts.append(prefix_start)
            seg_lengths.append(shared)
            prefix_starts.append(prefix_start)
            prefix_lengths.append(0)
        for tokens in group.response_ids:
            seg_starts.append(len(flat_ids))
            seg_lengths.append(1 + len(tokens))
            prefix_starts.append(prefix_start)
            prefix_lengths.append(shared)
            flat_ids.append(query[-1])
            flat_ids.extend(tokens)
            positions.append(np.arange(shared, shared + 1 + len(tokens), dtype=np.int64))
            targets.append(np.asarray([*tokens, IGNORE_INDEX], dtype=np.int64))  # token i predicts i+1
            response_of.append(np.full(1 + len(tokens), response, dtype=np.int64))
            response += 1

    starts = np.asarray(seg_starts, dtype=np.int64)
    lengths = np.asarray(seg_lengths, dtype=np.int64)                        # [N] Lq of each segment
    p_starts = np.asarray(prefix_starts, dtype=np.int64)
    p_lengths = np.asarray(prefix_lengths, dtype=np.int64)
    key_lengths = p_lengths + lengths                                        # [N] Lk of each segment
    # Keys of segment n: its query segment's positions, then its own (interleaved per segment).
    both_starts = np.stack([p_starts, starts], axis=1).reshape(-1)
    both_lengths = np.stack([p_lengths, lengths], axis=1).reshape(-1)
    kv_index = _ranges(both_starts, both_lengths)                           # [Tk]
    cu_seqlens = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=cu_seqlens[1:])
    cu_seqlens_k = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(key_lengths, out=cu_seqlens_k[1:])
    target_array = np.concatenate(targets)
    return dict(
        input_ids=torch.tensor(flat_ids, dtype=torch.int64),
        position_ids=torch.from_numpy(np.concatenate(positions)),
        cu_seqlens=torch.from_numpy(cu_seqlens.astype(np.int32)),
        max_seqlen=int(lengths.max()),
        targets=torch.from_numpy(target_array),
        response_index=torch.from_numpy(np.concatenate(response_of)),
        target_token_count=int((target_array != IGNORE_INDEX).sum()),
        kv_index=torch.from_numpy(kv_index),
        cu_seqlens_k=torch.from_numpy(cu_seqlens_k.astype(np.int32)),
        max_seqlen_k=int(key_lengths.max()),
        attention_work=int((lengths * (2 * key_lengths - lengths)).sum()),
    )
