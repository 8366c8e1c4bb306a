"""python -m fastalign.plan, in-process: the data workload and saved activations against the trainer's,
the published 7B run against hand arithmetic, 1 / 8 / 64 ranks, and an impossible plan (shard sizes and
peak against the real trainer on 1 and 2 ranks: tests/e2e/test_plan_e2e.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from helpers.planning import run_plan

from fastalign.cli import run_main
from fastalign.hf_config import LlamaConfig
from fastalign.plan import memory as pm
from fastalign.plan import planner as fplan
from fastalign.plan import workload

# Llama-2-7B (meta-llama/Llama-2-7b-hf config.json, the numbers that size the model)
LLAMA2_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
             "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False}
PUBLISHED = ["--nproc_per_node", "8", "--gpu", "A100-40GB", "--bf16", "True", "--fsdp", "full_shard auto_wrap",
             "--model_max_length", "480", "--per_device_train_batch_size", "1",
             "--gradient_accumulation_steps", "8", "--num_comp", "3"]


@pytest.fixture(scope="module")
def llama7b(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("llama2-7b") / "config.json"
    path.write_text(json.dumps(LLAMA2_7B))
    return path


# ----------------------------------------------------------------------------- token counts


@pytest.mark.parametrize("share_prefix", [False, True], ids=["unshared", "shared-prefix"])
def test_group_counts_are_the_packed_batchs(share_prefix):
    """Oracle: fastalign.data.packing's own batch of the same groups (a one-token query included)."""
    from fastalign.data import TokenizedGroup, pack_groups

    groups = [TokenizedGroup(record_index=0, query_ids=[1, 5, 6, 7], response_ids=[[8, 9], [10, 11, 12, 2]],
                             scores=[7.0, 3.0]),
              TokenizedGroup(record_index=1, query_ids=[4], response_ids=[[8, 9, 3]], scores=[1.0])]
    batch = pack_groups(groups, share_prefix=share_prefix)
    counts = [workload.group_counts(len(g.query_ids), [len(r) for r in g.response_ids], share_prefix) for g in groups]
    tokens, targets, keys, mask, work = (sum(column) for column in zip(*counts))
    assert (tokens, targets, work) == (batch.num_tokens, batch.num_target_tokens, batch.attention_work)
    from helpers.plan_trainer_probe import mask_elements

    assert keys == (0 if batch.kv_index is None else batch.kv_index.numel())
    assert mask == mask_elements(batch)
    # by hand: unshared, every response after its query; shared, the 4-token query once as 3
    # tokens, then segments of 1 + 2 and 1 + 4; the one-token query has no query segment
    assert tokens == ((4 + 2) + (4 + 4) + (1 + 3) if not share_prefix else 3 + (1 + 2) + (1 + 4) + (1 + 3))


# the names CUDA reports for each card of the table (torch.cuda.get_device_name)
CUDA_NAMES = {"A100-40GB": "NVIDIA A100-SXM4-40GB", "A100-80GB": "NVIDIA A100-SXM4-80GB",
              "H100": "NVIDIA H100 80GB HBM3", "H100-PCIe": "NVIDIA H100 PCIe", "H100-NVL": "NVIDIA H100 NVL",
              "H200": "NVIDIA H200", "L40S": "NVIDIA L40S", "L4": "NVIDIA L4", "A10G": "NVIDIA A10G",
              "RTX4090": "NVIDIA GeForce RTX 4090"}


def test_each_gpu_is_found_by_the_name_cuda_reports():
    """The trainer's MFU looks a card up by its CUDA name; the planner by the table's key: both must
    land on the same entry (a reported name containing another card's, e.g. H100 PCIe, comes first)."""
    from fastalign.hardware import GPUS, gpu_for_device_name

    for name, cuda_name in CUDA_NAMES.items():
        assert gpu_for_device_name(cuda_name).tflops == GPUS[name].tflops, name
    assert gpu_for_device_name("NVIDIA H100 PCIe") is GPUS["H100-PCIe"]
    assert gpu_for_device_name("NVIDIA L4") is GPUS["L4"] and gpu_for_device_name("NVIDIA L40S") is GPUS["L40S"]
    assert gpu_for_device_name("NVIDIA GeForce GTX 1080") is None


def test_utilisation_comes_from_a_gpu_benchmark_once_one_is_on_file(tmp_path):
    assumed = (fplan.DEFAULT_MFU, "assumed: no GPU training benchmark in benchmarks/results/ yet")
    assert fplan.default_mfu(tmp_path) == assumed
    cpu_row = {"sides": {"fastalign": {"mfu": None}}}  # CPU runs have no MFU: not a source
    (tmp_path / "train_throughput-2026-11-25-cpu-2c-cpu-tiny.json").write_text(json.dumps(cpu_row))
    assert fplan.default_mfu(tmp_path)[0] == fplan.DEFAULT_MFU
    (tmp_path / "tmp" / "gpu-check-y").mkdir(parents=True)  # gpu-check's staging folder: not kept yet
    staged = {"sides": {"fastalign": {"mfu": 0.05}}}
    (tmp_path / "tmp" / "gpu-check-y" / "train_throughput-2026-12-05-h100-gpu-1b.json").write_text(json.dumps(staged))
    assert fplan.default_mfu(tmp_path) == assumed
    (tmp_path / "gpu-check-x").mkdir()
    row = {"sides": {"fastalign": {"mfu": 0.41}}}
    (tmp_path / "gpu-check-x" / "train_throughput-2026-12-04-h100-gpu-1b.json").write_text(json.dumps(row))
    assert fplan.default_mfu(tmp_path) == (0.41, "measured: train_throughput-2026-12-04-h100-gpu-1b.json")


# ----------------------------------------------------------------------------- the real trainer


@pytest.mark.parametrize("family,kv_heads,dtype,share_prefix", [
    ("llama", 2, "float32", False), ("llama", 4, "bfloat16", False), ("qwen3", 2, "bfloat16", False),
    ("llama", 2, "float32", True), ("qwen3", 2, "bfloat16", True)])
def test_layer_saved_bytes_are_what_autograd_saves(family, kv_heads, dtype, share_prefix):
    """Oracle: the storages autograd's saved-tensor hook sees in a real DecoderLayer forward (CPU,
    sdpa) of a packed batch, without the layer's weights and the shared cos/sin; in the shared
    layout kv_index (int64 [Tk], saved by the gather; one tensor for all layers) is counted once
    by `step_phases` besides the layer's bytes."""
    import torch
    from helpers.plan_trainer_probe import mask_elements

    from fastalign.data import TokenizedGroup, pack_groups
    from fastalign.model import Llama

    dtype = getattr(torch, dtype)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=kv_heads, head_dim=16, vocab_size=100, model_type=family)
    llama = Llama(config).to(dtype)
    groups = [TokenizedGroup(record_index=0, query_ids=[1, 2, 3, 4, 5], response_ids=[[6, 7], [8, 9, 10, 11]],
                             scores=[1.0, 2.0]),
              TokenizedGroup(record_index=1, query_ids=[3], response_ids=[[6, 7, 8]], scores=[1.0])]
    batch = pack_groups(groups, share_prefix=share_prefix)
    cos, sin = llama.rotary(batch.position_ids, dtype)
    hidden = torch.randn(batch.num_tokens, 64, dtype=dtype, requires_grad=True)
    skip = {t.untyped_storage()._cdata for t in (*llama.layers[0].parameters(), cos, sin)}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in skip:
            saved[storage._cdata] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        llama.layers[0](hidden, cos, sin, **batch.attention_inputs())
    keys = 0 if batch.kv_index is None else batch.kv_index.numel()
    micro = pm.MicroBatch(batch.num_tokens, batch.num_target_tokens, keys, mask_elements(batch))
    assert sum(saved.values()) == pm.layer_saved_bytes(config, micro, dtype.itemsize, "cpu") + 8 * keys


@pytest.mark.parametrize("share_prefix", [True, False], ids=["shared-prefix", "unshared"])
def test_data_workload_is_the_trainers_micro_batches(plan_tiny, share_prefix):
    """Oracle: the trainer's own batcher (fastalign.train's settings: step budget of the device,
    batch size, accumulation) on both ranks, every micro-batch packed by fastalign.data.packing."""
    from helpers.plan_trainer_probe import mask_elements

    from fastalign.config import DEFAULT_CPU_STEP_TOKENS
    from fastalign.data import GroupBatcher
    from fastalign.data.loading import tokenize_file
    from fastalign.model_dir import load_tokenizer

    model, data = plan_tiny
    argv = ["--model_name_or_path", str(model), "--data_path", str(data), "--gpu", "L4", "--device", "cpu",
            "--nproc_per_node", "2", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "3",
            "--model_max_length", "256", "--share_prefix", str(share_prefix)]
    args = fplan.parse_args(argv)
    work = workload.workload_from_data(args, str(model))
    tokenized, _ = tokenize_file(str(data), load_tokenizer(model), args)
    largest, tokens, work_sum, micro_batches, step_tokens = None, 0, 0, 0, 0
    for rank in (0, 1):
        batcher = GroupBatcher(tokenized, num_comp=3, seed=42, batch_size=8, gradient_accumulation_steps=3,
                               step_token_budget=DEFAULT_CPU_STEP_TOKENS, world_size=2, rank=rank,
                               share_prefix=share_prefix)
        for step in batcher.iter_steps(0):
            real = [b for b in step.micro_batches if b.num_groups]
            for b in real:
                keys = 0 if b.kv_index is None else b.kv_index.numel()
                if largest is None or (b.num_tokens, keys) > (largest.tokens, largest.key_tokens):
                    largest = pm.MicroBatch(b.num_tokens, b.num_target_tokens, keys, mask_elements(b))
                tokens += b.num_tokens
                work_sum += b.attention_work
            step_tokens = max(step_tokens, sum(b.num_tokens for b in real))
            micro_batches += len(step.micro_batches) * (rank == 0)
        assert work.steps_per_epoch == batcher.steps_per_epoch(0)
    assert work.largest == largest
    assert work.largest_step_tokens == step_tokens
    assert work.micro_batches_per_step == micro_batches / work.steps_per_epoch > 1
    assert work.tokens_per_step == pytest.approx(tokens / work.steps_per_epoch)
    assert work.attention_work_per_step == pytest.approx(work_sum / work.steps_per_epoch)


def test_plan_with_data_prints_epoch_times(plan_tiny, tmp_path, capsys):
    model, data = plan_tiny
    status, plan, text = run_plan(["--model_name_or_path", str(model), "--data_path", str(data), "--gpu", "L4",
                                   "--nproc_per_node", "2", "--bf16", "True", "--fsdp", "full_shard",
                                   "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
                                   "--num_train_epochs", "2"], tmp_path, capsys)
    assert status == 0, text
    steps = plan["time"]["steps_per_epoch"]
    assert steps == -(-264 // (2 * 2 * 2))  # 264 records, 2 groups x 2 ranks x 2 micro-batches per step
    assert plan["time"]["run_hours"] == pytest.approx(2 * plan["time"]["epoch_hours"])
    assert plan["memory"]["fits"] and f"epoch ({steps} steps)" in text


# ----------------------------------------------------------------------------- the published run


H, INTER, V, LAYERS, RANKS = 4096, 11008, 32000, 32, 8  # INTER: the intermediate (MLP) size
LAYER = 4 * H * H + 3 * H * INTER + 2 * H  # q, k, v, o; gate, up, down; two norms
PARAMS = LAYERS * LAYER + 2 * V * H + H  # + embedding, lm_head, final norm = 6,738,415,616
ROOT = 2 * V * H + H
# saved per token and layer in bf16: two norms (fp32 input 4H, rsqrt 4, normalised 2H, output
# 2H), rotated q, the keys and values attended to (one-token queries: each response segment
# gathers its own rows only, Tk = T), the attention output (2 bytes x 4 x 4096), fp32 lse per head
# (4 x 32), MLP 4 x 2 x 11008
PER_TOKEN_LAYER = 2 * (4 * H + 4 + 2 * H + 2 * H) + 2 * 4 * H + 4 * 32 + 8 * INTER


def published_parts(t: int, accumulates: bool) -> dict:
    """Hand arithmetic of the published run's peak (last layer's backward) for a micro-batch of
    t tokens of full-length groups (Tk = t)."""
    reduce_out = 4 * LAYER // RANKS if accumulates else 0  # the reduce-scatter output next to the sum
    return {
        "parameter shards": 4 * PARAMS // RANKS, "gradients": 4 * PARAMS // RANKS,
        # m, v; one fp32 step per tensor
        "optimizer state": 8 * PARAMS // RANKS + 4 * (LAYERS * 9 + 3),
        # the root (embedding, lm_head, norm) and 2 layers in bf16
        "gathered layers": 2 * ROOT + 2 * 2 * LAYER,
        # + cos, sin [T, 1, 128] and kv_index int64 [Tk]
        "activations": LAYERS * PER_TOKEN_LAYER * t + 2 * 2 * t * 128 + 8 * t,
        "loss-head slice": 0, "loss-head buffers": 0,
        # the MLP's activation gradients (3 x [T, INTER] bf16 while its [T, INTER] product is freed: more
        # than attention's dq, dk, dv and the gathered rows' gradients, 2 x (3 + 2) x T x 4096), the
        # layer's bf16 gradients and fp32 reduce-scatter input, the unsharded lm_head gradient and
        # the [T, H] gradient flowing down
        "backward buffers": 2 * 2 * t * INTER + 6 * LAYER + reduce_out + 2 * V * H + 2 * t * H,
    }


def test_published_7b_run_agrees_with_hand_arithmetic(llama7b, tmp_path, capsys):
    """The card's flags with the trainer's CUDA default budget, the original's padded micro-batch
    (bs 1 x num_comp 3 x 480 = 1440 tokens): a full-length group fills it, so a rank's 8 groups of
    one step run as 8 micro-batches of one group, as the original ran them, and it fits; the mean
    250-token groups (502 tokens) share a pass two at a time. A budget of 16384 would pack the 8
    groups into ONE micro-batch of 8 x 1440 tokens, which does not fit."""
    assert LAYER == 202_383_360 and PARAMS == 6_738_415_616 and PER_TOKEN_LAYER == 186_504
    start = time.perf_counter()
    status, plan, text = run_plan(["--config", str(llama7b), *PUBLISHED], tmp_path, capsys)
    assert time.perf_counter() - start < 120
    assert plan["model"]["parameters"] == PARAMS
    # worst case of the flags: groups of 3 responses filling 480 tokens after a 1-token query; shared
    # prefix: no query segment, 3 x (1 + 479) = 1440 tokens, 3 x 479 targets: one per micro-batch
    t, n = 3 * 480, 3 * 479
    load = plan["workload"]
    assert (load["max_tokens_per_batch"], load["micro_batches_per_step"]) == (1 * 3 * 480, 8)
    assert (load["largest_micro_batch_tokens"], load["largest_micro_batch_target_tokens"],
            load["largest_micro_batch_key_tokens"]) == (t, n, t) == (1440, 1437, 1440)
    assert plan["memory"]["peak_phase"] == "last layer's backward"
    assert plan["memory"]["parts_bytes"] == published_parts(t, accumulates=True)  # 8 micro-batches
    assert 23 * 2**30 < plan["memory"]["peak_bytes"] < 24 * 2**30  # 8 GiB of activations
    assert status == 0 and plan["memory"]["fits"] and "verdict: FITS on 40 GiB" in text
    # the largest micro-batch that fits: 35 GiB usable minus the fixed parts, over the per-token parts
    fixed = sum(published_parts(0, accumulates=True).values())
    per_token = sum(published_parts(1, accumulates=True).values()) - fixed
    assert plan["memory"]["largest_max_tokens_per_batch_that_fits"] == int((35 * 2**30 - fixed) // per_token) == 3519
    # FLOPs as the trainer's MFU counts them: 6 x (params - embedding) per token + attention
    # 6 x 32 layers x 4096 x (sum of attention work: 480^2 per response segment), over 8 ranks x 8 groups
    flops = 64 * (6 * (PARAMS - V * H) * 1440 + 6 * LAYERS * H * 3 * 480 ** 2)
    assert plan["time"]["flops_per_step"] == pytest.approx(flops, rel=1e-12)
    mfu = plan["time"]["mfu"]  # 0.35 while no GPU benchmark is on file (fplan.default_mfu)
    assert plan["time"]["compute_s_per_step"] == pytest.approx(flops / 8 / (312e12 * mfu), rel=1e-12)
    # 8 micro-batches (no --num_records: the time's workload is the worst case too), each a bf16
    # all-gather twice (forward, backward) and an fp32 reduce-scatter, 7/8 of it per rank
    assert plan["time"]["communication_bytes_per_step_per_rank"] == pytest.approx(8 * (2 * 2 + 4) * PARAMS * 7 / 8)
    assert "time (estimates)" in text
    # with docs/planning.md's assumed mean groups (a 125-token query, 3 x 125-token responses) a group
    # packs to 124 + 3 x (1 + 125) = 502 tokens: 1440 // 502 = 2 per micro-batch, 8 / 2 = 4 per step
    status, plan, _ = run_plan(["--config", str(llama7b), *PUBLISHED, "--num_records", "93800",
                                "--mean_sequence_tokens", "250"], tmp_path, capsys)
    assert status == 0 and plan["workload"]["micro_batches_per_step"] == 4
    assert plan["time"]["communication_bytes_per_step_per_rank"] == pytest.approx(4 * (2 * 2 + 4) * PARAMS * 7 / 8)
    assert plan["time"]["steps_per_epoch"] == -(-93800 // 64)

    status, plan, text = run_plan(["--config", str(llama7b), *PUBLISHED, "--max_tokens_per_batch", "16384"],
                                  tmp_path, capsys)
    big = 8 * t  # the rank's whole step in one micro-batch: 11520 tokens, 11496 targets
    load = plan["workload"]
    assert (load["largest_micro_batch_tokens"], load["largest_micro_batch_target_tokens"],
            load["micro_batches_per_step"]) == (big, 8 * n, 1) == (11520, 11496, 1)
    assert plan["memory"]["parts_bytes"] == published_parts(big, accumulates=False)
    assert 79 * 2**30 < plan["memory"]["peak_bytes"] < 80 * 2**30  # 64 GiB of activations
    assert status == fplan.EXIT_DOES_NOT_FIT == 3
    assert not plan["memory"]["fits"] and "verdict: DOES NOT FIT on 40 GiB" in text
    hints = plan["what_would_fit"]
    assert any(h.startswith("fits with --gradient_checkpointing True") for h in hints), hints
    assert any(h.startswith("fits with a smaller batch: --max_tokens_per_batch 3519 ") for h in hints), hints
    assert plan["time"]["flops_per_step"] == pytest.approx(flops, rel=1e-12)  # the same groups
    assert plan["time"]["communication_bytes_per_step_per_rank"] == pytest.approx((2 * 2 + 4) * PARAMS * 7 / 8)

    # activation checkpointing: the time counts the decoder layers' recomputed forward, 2 x layer
    # parameters per token and a third of the attention term (MFU, model FLOPs, does not)
    status, plan, _ = run_plan(["--config", str(llama7b), *PUBLISHED, "--gradient_checkpointing", "True"],
                               tmp_path, capsys)
    recompute = 64 * (2 * LAYERS * LAYER * 1440 + 2 * LAYERS * H * 3 * 480 ** 2)
    assert status == 0 and plan["time"]["flops_per_step"] == pytest.approx(flops + recompute, rel=1e-12)

    status, plan, text = run_plan(["--config", str(llama7b), *PUBLISHED, "--max_tokens_per_batch", "0"],
                                  tmp_path, capsys)
    assert status == 0 and plan["memory"]["fits"] and "verdict: FITS on 40 GiB" in text
    assert (plan["workload"]["largest_micro_batch_tokens"], plan["workload"]["micro_batches_per_step"]) == (1440, 8)
    assert plan["memory"]["parts_bytes"] == published_parts(1440, accumulates=True)
    assert plan["time"]["flops_per_step"] == pytest.approx(flops, rel=1e-12)  # the same groups
    assert plan["time"]["communication_bytes_per_step_per_rank"] == pytest.approx(8 * (2 * 2 + 4) * PARAMS * 7 / 8)


def test_communication_follows_the_trainers_collectives(llama7b):
    params = 6_738_415_616

    def traffic(fsdp: str, nproc: int, nnodes: int) -> tuple[float, float]:
        args = fplan.parse_args(["--config", str(llama7b), "--gpu", "H100", "--bf16", "True", "--fsdp", fsdp,
                                 "--nproc_per_node", str(nproc), "--nnodes", str(nnodes),
                                 "--gradient_accumulation_steps", "4"])
        return fplan.communication_bytes(params, args, fplan.fdist.parse_fsdp(fsdp), 4)

    # full_shard: 4 micro-batches x (bf16 gather in forward and backward + fp32 reduce-scatter) x 7/8
    assert traffic("full_shard", 8, 1) == pytest.approx((4 * (2 * 2 + 4) * params * 7 / 8, 0))
    assert traffic("shard_grad_op", 8, 1) == pytest.approx((4 * (2 + 4) * params * 7 / 8, 0))
    # replicas all-reduce fp32 gradients once per step (distributed.set_gradient_all_reduce)
    assert traffic("no_shard", 8, 1) == pytest.approx((2 * 4 * params * 7 / 8, 0))
    # hybrid over 2 nodes of 8: sharded traffic inside the node, the 1/8 shard all-reduced across
    assert traffic("hybrid_shard", 8, 2) == pytest.approx((4 * 8 * params * 7 / 8, 2 * 4 * params / 8 / 2))
    assert traffic("full_shard", 1, 1) == (0.0, 0.0)


@pytest.mark.parametrize("nproc,nnodes", [(1, 1), (8, 1), (8, 8)], ids=["1-rank", "8-ranks", "64-ranks"])
def test_runs_for_1_8_and_64_ranks(llama7b, tmp_path, capsys, nproc, nnodes):
    status, plan, text = run_plan(["--config", str(llama7b), "--nproc_per_node", str(nproc), "--nnodes", str(nnodes),
                                   "--gpu", "H100", "--bf16", "True", "--fsdp", "full_shard",
                                   "--per_device_train_batch_size", "1", "--model_max_length", "480",
                                   "--num_records", "93800", "--mean_sequence_tokens", "250"], tmp_path, capsys)
    assert status == (0 if nproc * nnodes > 1 else fplan.EXIT_DOES_NOT_FIT), text
    ranks = nproc * nnodes
    params = 6_738_415_616
    assert plan["world"]["ranks"] == ranks
    assert plan["memory"]["parts_bytes"]["parameter shards"] == 4 * params // ranks  # even splits up to 64
    assert plan["memory"]["fits"] == (ranks > 1)  # one 80 GiB card cannot hold 16 bytes x 6.7 B
    assert plan["time"]["steps_per_epoch"] == -(-93800 // ranks)
    assert "epoch (" in text


def test_impossible_plan_says_what_would_make_it_fit(llama7b, tmp_path, capsys):
    status, plan, text = run_plan(["--config", str(llama7b), "--gpu_memory_gb", "24", "--bf16", "True",
                                   "--fsdp", "full_shard", "--per_device_train_batch_size", "1",
                                   "--model_max_length", "480"], tmp_path, capsys)
    assert status == fplan.EXIT_DOES_NOT_FIT, text
    assert not plan["memory"]["fits"] and "verdict: DOES NOT FIT on 24 GiB" in text
    assert plan["memory"]["largest_max_tokens_per_batch_that_fits"] == 0
    hints = plan["what_would_fit"]
    assert any(h.startswith("fits on 16 GPUs") for h in hints), hints  # 8 GPUs: 3.1 x 4 GiB state + activations
    assert any(h.startswith("fits with --fsdp 'full_shard offload'") for h in hints), hints
    assert any(h.startswith("--gradient_checkpointing True alone is not enough") for h in hints), hints
    assert any(h.startswith("a smaller batch alone is not enough") for h in hints), hints
    assert "what would make it fit:" in text


def test_smaller_batch_is_the_fix_when_only_activations_overflow(llama7b, tmp_path, capsys):
    status, plan, text = run_plan(["--config", str(llama7b), "--nproc_per_node", "8", "--gpu", "A100-40GB",
                                   "--bf16", "True", "--fsdp", "full_shard", "--max_tokens_per_batch", "16384",
                                   "--model_max_length", "480"], tmp_path, capsys)
    assert status == fplan.EXIT_DOES_NOT_FIT, text
    budget = plan["memory"]["largest_max_tokens_per_batch_that_fits"]
    assert not plan["memory"]["fits"] and 1440 < budget < 8 * 1440  # 8 groups (the default bs) per step
    assert f"fits with a smaller batch: --max_tokens_per_batch {budget} " in " ".join(plan["what_would_fit"])
    assert any(h.startswith("does not fit on any number of GPUs") for h in plan["what_would_fit"])  # activations
    # the budget is the boundary: it fits, 1.1 x it does not
    for tokens, fits in ((budget, True), (int(budget * 1.1), False)):
        status, at, _ = run_plan(["--config", str(llama7b), "--nproc_per_node", "8", "--gpu", "A100-40GB",
                                  "--bf16", "True", "--fsdp", "full_shard", "--max_tokens_per_batch", str(tokens),
                                  "--model_max_length", "480"], tmp_path, capsys)
        assert at["memory"]["fits"] == fits and status == (0 if fits else 3), tokens


def test_whole_step_in_one_micro_batch_fits_any_budget(llama7b, tmp_path, capsys):
    status, plan, text = run_plan(["--config", str(llama7b), "--nproc_per_node", "8", "--gpu", "H200",
                                   "--bf16", "True", "--fsdp", "full_shard", "--per_device_train_batch_size", "1",
                                   "--gradient_accumulation_steps", "2", "--model_max_length", "480",
                                   "--max_tokens_per_batch", "16384"], tmp_path, capsys)
    assert status == 0 and plan["memory"]["any_max_tokens_per_batch_fits"]
    assert (
        plan["memory"]["largest_max_tokens_per_batch_that_fits"] == 2 * 1440
        == plan["workload"]["largest_micro_batch_tokens"]
    )
    assert "largest --max_tokens_per_batch that fits: any (a rank's whole step, 2880 tokens" in text


@pytest.mark.parametrize("argv,message", [
    (["--nproc_per_node", "8"], "--gpu NAME or --gpu_memory_gb"),
    (["--gpu", "H100", "--fsdp", "sharded"], "--fsdp: unknown option 'sharded'"),
    (["--gpu", "H100", "--data_path", "x.jsonl"], "--data_path needs --model_name_or_path"),
    (["--gpu", "H100", "--num_records", "10", "--mean_sequence_tokens", "600"], "exceeds --model_max_length 512"),
    (["--gpu", "H100", "--num_records", "10", "--mean_query_tokens", "512"], "leaves no response tokens"),
])
def test_bad_flags_exit_2_naming_the_flag(llama7b, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        fplan.main(["--config", str(llama7b), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_unreadable_config_is_an_error_line(tmp_path, capsys):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    assert run_main(fplan.main, ["--config", str(bad), "--gpu", "H100"]) == 2
    assert "error: --config" in capsys.readouterr().err
