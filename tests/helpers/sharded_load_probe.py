"""The sharded load on each rank, for tests/e2e/test_distributed_e2e.py: a toy model built on meta,
wrapped like the trainer wraps Llama (activation checkpointing, per-layer FSDP, root), materialised
and filled from a reader that records which rows each rank asked for, under every sharding strategy.

`main([OUT_PREFIX])` writes OUT_PREFIX.rank<R>.json per rank (the ranks' stdout can interleave):
{"results": {strategy: {"same", "asked", "loss"}}, "asked": {strategy: {name: [start, stop] | None}}}.
Run through helpers/ranks.py's `run_ranks` (forked ranks, or torchrun with CUDA).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from fastalign import distributed as fd


class Reader:
    def __init__(self, tensors):
        self.tensors, self.asked = tensors, {}

    def read_into(self, name, out, rows=None):
        self.asked[name] = None if rows is None else (rows.start, rows.stop)
        out.copy_(self.tensors[name] if rows is None else self.tensors[name][rows])


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(5, 4)  # 5 rows over 2 ranks: 3 + 2
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
        self.head = nn.Linear(4, 1, bias=False)  # 1 row: rank 1 holds nothing

    def forward(self, x):
        h = self.embed(x)
        for layer in self.layers:
            h = torch.tanh(layer(h))
        return self.head(h).sum()


def main(argv: Sequence[str]) -> int:
    env = fd.init_distributed()
    torch.manual_seed(0)
    source = {k: v.clone() for k, v in Toy().state_dict().items()}
    results = {}
    for strategy in ("full_shard", "shard_grad_op", "hybrid_shard", "no_shard"):
        plan = fd.parse_fsdp(strategy)
        with torch.device("meta"):
            model = Toy()
        fd.apply_ac(model.layers)
        fd.apply_fsdp(model, model.layers, fd.build_mesh(env, plan), param_dtype=None,
                      reshard_after_forward=plan.reshard_after_forward)
        model.to_empty(device="cpu")
        reader = Reader(source)
        fd.load_sharded_weights(model, reader)
        same = all(torch.equal(p.full_tensor(), source[fd.canonical_name(n)])
                   for n, p in model.named_parameters())
        loss = model(torch.arange(5))
        loss.backward()
        results[strategy] = {"same": same, "asked": reader.asked, "loss": loss.item()}
    with open(f"{argv[0]}.rank{env.rank}.json", "w") as out:
        json.dump({"results": results, "asked": {s: r["asked"] for s, r in results.items()}}, out)
    dist.destroy_process_group()
    return 0
