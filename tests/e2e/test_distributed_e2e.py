"""The sharded load on two ranks (forked, helpers/ranks.py): each reads only its rows."""

from __future__ import annotations

import pytest
from helpers.ranks import run_ranks
from helpers.sharded_load_probe import main

pytestmark = pytest.mark.slow


@pytest.mark.slow
def test_sharded_load_reads_only_local_rows_on_two_ranks(tmp_path):
    import json

    result = run_ranks(main, [tmp_path / "out"], nproc=2)
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
