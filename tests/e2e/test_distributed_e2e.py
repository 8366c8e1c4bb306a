"""The sharded load under torchrun: each of two ranks reads only its rows."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


REPO = Path(__file__).resolve().parents[2]


# Runs on each of 2 ranks: a toy model built on meta, wrapped like the trainer wraps Llama
# (activation checkpointing, per-layer FSDP, root), materialised and filled from a reader that
# records which rows each rank asked for.
SHARDED_LOAD = textwrap.dedent("""
    import json, sys
    import torch
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
    # one file per rank: the ranks' stdout interleaves, lines can glue together
    with open(f"{sys.argv[1]}.rank{env.rank}.json", "w") as out:
        json.dump({"results": results, "asked": {s: r["asked"] for s, r in results.items()}}, out)
    import torch.distributed as dist
    dist.destroy_process_group()
    from fastalign.cli import exit_process
    exit_process(0)
""")


@pytest.mark.slow
def test_sharded_load_reads_only_local_rows_on_two_ranks(tmp_path):
    import json

    script = tmp_path / "sharded_load.py"
    script.write_text(SHARDED_LOAD)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
             str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"out.rank{rank}.json").read_text()) for rank in (0, 1)]
    results = ranks[0]["results"]
    asked = {rank: ranks[rank]["asked"] for rank in (0, 1)}
    for strategy, outcome in results.items():
        assert outcome["same"], strategy
    losses = {round(r["loss"], 6) for r in results.values()}
    assert len(losses) == 1  # every strategy computes the same model
    for strategy in ("full_shard", "shard_grad_op", "hybrid_shard"):
        assert asked[0][strategy]["embed.weight"] == [0, 3]
        assert asked[1][strategy]["embed.weight"] == [3, 5]
        assert asked[0][strategy]["head.weight"] == [0, 1]
        assert "head.weight" not in asked[1][strategy]  # an empty shard reads nothing
        assert asked[1][strategy]["layers.1.weight"] == [2, 4]
    for rank in (0, 1):  # replicated: every rank reads every row
        assert asked[rank]["no_shard"]["embed.weight"] == [0, 5]
