"""FSDP2 helpers: --fsdp parsing, parameter names, and sharded weight loading on 2 gloo ranks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastalign.distributed import FsdpPlan, canonical_name, local_shards_nonfinite, parse_fsdp
from fastalign.errors import ConfigError


@pytest.mark.parametrize("value,plan", [
    ("full_shard auto_wrap", FsdpPlan("full_shard", offload=False)),
    ("shard_grad_op", FsdpPlan("shard_grad_op", offload=False)),
    ("", FsdpPlan("no_shard", offload=False)),
    ("auto_wrap", FsdpPlan("no_shard", offload=False)),
    ("hybrid_shard auto_wrap offload", FsdpPlan("hybrid_shard", offload=True)),
])
def test_parse_fsdp(value, plan):
    assert parse_fsdp(value) == plan


def test_reshard_after_forward_follows_the_strategy():
    assert parse_fsdp("full_shard").reshard_after_forward
    assert parse_fsdp("hybrid_shard").reshard_after_forward
    assert not parse_fsdp("shard_grad_op").reshard_after_forward
    assert not parse_fsdp("hybrid_shard_zero2").reshard_after_forward


@pytest.mark.parametrize("value", ["full_shard autowrap", "full_shard no_shard", "sharded"])
def test_parse_fsdp_rejects_nonsense_naming_the_flag(value):
    with pytest.raises(ConfigError, match="--fsdp"):
        parse_fsdp(value)


def test_canonical_name_drops_wrappers_and_prefix():
    name = "llama.layers.0._checkpoint_wrapped_module._orig_mod.mlp.up_proj.weight"
    assert canonical_name(name, "llama.") == "layers.0.mlp.up_proj.weight"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_local_shards_nonfinite_finds_one_bad_element(bad):
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    assert not local_shards_nonfinite(model)
    with torch.no_grad():
        model[0].weight.fill_(3e38)  # huge but finite: a 2-norm would overflow, max-abs does not
    assert not local_shards_nonfinite(model)
    with torch.no_grad():
        model[1].bias[2] = bad
    assert local_shards_nonfinite(model)
