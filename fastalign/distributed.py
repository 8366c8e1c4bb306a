"""Process groups, FSDP2 sharding, mixed precision, activation checkpointing, per-layer compile.

Details: docs/design.md section 7.12.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from fastalign.errors import ConfigError, ModelError
from fastalign.lora import is_adapter_name

# The activation-checkpoint wrapper and fastalign.attention are imported where used: only runs that
# ask for --gradient_checkpointing or --compile pay for them.

FSDP_STRATEGIES = ("full_shard", "shard_grad_op", "hybrid_shard", "hybrid_shard_zero2", "no_shard")
FSDP_FLAGS = FSDP_STRATEGIES + ("auto_wrap", "offload")

# Name segments that wrappers insert into parameter names (activation checkpointing, compile);
# checkpoints and HF weights use the names without them.
_WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module.", "_orig_mod.")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class FsdpPlan:
    """What `--fsdp` asks for, in FSDP2 terms."""

    strategy: str  # one of FSDP_STRATEGIES
    offload: bool

    @property
    def reshard_after_forward(self) -> bool:
        return self.strategy in ("full_shard", "hybrid_shard")


def parse_fsdp(value: str) -> FsdpPlan:
    """Parse HF's space-separated `--fsdp` option string ("full_shard auto_wrap", "", ...)."""
    words = value.replace(",", " ").split()
    unknown = [w for w in words if w not in FSDP_FLAGS]
    if unknown:
        raise ConfigError(
            f"--fsdp: unknown option {unknown[0]!r} (expected some of: {', '.join(FSDP_FLAGS)})"
        )
    strategies = [w for w in words if w in FSDP_STRATEGIES]
    if len(strategies) > 1:
        raise ConfigError(f"--fsdp: choose one sharding strategy, got {' and '.join(strategies)}")
    return FsdpPlan(strategy=strategies[0] if strategies else "no_shard", offload="offload" in words)


def process_group_backend(use_cuda: bool, cpu_collectives: bool) -> str:
    """NCCL on CUDA, gloo on CPU; both ("cuda:nccl,cpu:gloo") when collectives on CPU tensors
    are needed on a CUDA machine: with `--fsdp offload` the gradients live on the host, and their
    norm (clipping) is all-reduced there, which an NCCL-only group cannot do."""
    if not use_cuda:
        return "gloo"
    return "cuda:nccl,cpu:gloo" if cpu_collectives else "nccl"


def init_distributed(timeout_minutes: float = 30.0, *, cpu_collectives: bool = False) -> DistEnv:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU), or make a one-rank group.

    torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; multi-node rendezvous
    (`--nnodes --node_rank --rdzv_backend c10d --rdzv_endpoint host:port`) is torchrun's job.
    cpu_collectives: also give CPU tensors a backend on CUDA (`process_group_backend`).
    """
    use_cuda = torch.cuda.is_available()
    backend = process_group_backend(use_cuda, cpu_collectives)
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(
                backend, timeout=timeout, device_id=device if use_cuda else None
            )
    else:
        local_rank, local_world_size = 0, 1
        device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(
                backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
            )
    return DistEnv(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        local_world_size=local_world_size,
        device=device,
        backend=backend,
    )


def build_mesh(env: DistEnv, plan: FsdpPlan) -> DeviceMesh:
    """1-D mesh for full/grad-op sharding; 2-D (replicate, shard) for hybrid and no_shard.

    no_shard is HSDP with a shard dimension of size 1: parameters are replicated on every rank
    and gradients all-reduced, through the same `fully_shard` code path.
    """
    if plan.strategy in ("full_shard", "shard_grad_op"):
        return init_device_mesh(env.device.type, (env.world_size,), mesh_dim_names=("shard",))
    if plan.strategy == "no_shard":
        shape = (env.world_size, 1)
    else:  # hybrid: shard within a node, replicate across nodes
        if env.world_size % env.local_world_size:
            raise ConfigError(
                f"--fsdp {plan.strategy}: world size {env.world_size} is not a multiple of the "
                f"processes per node ({env.local_world_size})"
            )
        shape = (env.world_size // env.local_world_size, env.local_world_size)
    return init_device_mesh(env.device.type, shape, mesh_dim_names=("replicate", "shard"))


# Strategies whose mesh has a replicate dimension (gradients all-reduced across replicas).
REPLICATED_STRATEGIES = ("no_shard", "hybrid_shard", "hybrid_shard_zero2")


def set_gradient_all_reduce(model: nn.Module, plan: FsdpPlan, enabled: bool) -> None:
    """Turn the all-reduce over a replicate mesh dimension on or off for the next backward.

    Under gradient accumulation the trainer turns it off for every micro-batch but the last of
    a step: FSDP2 then keeps the un-all-reduced sum of the micro-batches' (reduce-scattered)
    gradients, one shard-sized fp32 buffer per layer, and all-reduces it once. The reduce-scatter
    of a sharded dimension still runs every micro-batch: skipping it would keep unsharded
    gradients, the memory that sharding exists to save. A no-op without a replicate dimension,
    and under CPU offload (FSDP2 keeps the running sum on the GPU: with no_shard, the whole fp32
    gradient, the memory that offload exists to free).
    """
    if isinstance(model, FSDPModule) and plan.strategy in REPLICATED_STRATEGIES and not plan.offload:
        model.set_requires_all_reduce(enabled)


def apply_ac(layers: nn.ModuleList) -> None:
    """Recompute each decoder layer's activations in backward (keeps only layer inputs)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for index, layer in enumerate(layers):
        layers[index] = checkpoint_wrapper(layer, preserve_rng_state=False)


def apply_compile(layers: nn.ModuleList) -> None:
    """torch.compile each decoder layer separately: one small graph reused by every layer."""
    from fastalign.attention import keep_sdpa_loop_out_of_compiled_graphs

    keep_sdpa_loop_out_of_compiled_graphs()
    for index, layer in enumerate(layers):
        layers[index] = torch.compile(layer, dynamic=True)


def mixed_precision_policy(param_dtype: torch.dtype | None, *, cast_inputs: bool = True) -> MixedPrecisionPolicy:
    """Compute in `param_dtype` (None: the stored dtype) and reduce gradients in fp32.

    The sharded parameters stay in their stored dtype (fp32 master weights): the optimizer
    updates fp32 values and only the gathered copies used for compute are cast.
    """
    return MixedPrecisionPolicy(
        param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=cast_inputs
    )


def apply_fsdp(
    root: nn.Module,
    layers: nn.ModuleList,
    mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype | None,
    reshard_after_forward: bool,
    offload: bool = False,
) -> None:
    """fully_shard each decoder layer, then the root (embedding, final norm, lm_head, loss).

    The root's floating inputs (ratings) are not cast: they feed the loss, not a matmul. The root
    keeps its parameters gathered after forward because backward needs them first.
    """
    offload_policy: OffloadPolicy = CPUOffloadPolicy() if offload else OffloadPolicy()
    layer_policy = mixed_precision_policy(param_dtype)
    for layer in layers:
        fully_shard(
            layer,
            mesh=mesh,
            mp_policy=layer_policy,
            reshard_after_forward=reshard_after_forward,
            offload_policy=offload_policy,
        )
    fully_shard(
        root,
        mesh=mesh,
        mp_policy=mixed_precision_policy(param_dtype, cast_inputs=False),
        reshard_after_forward=False,
        offload_policy=offload_policy,
    )


def canonical_name(name: str, prefix: str = "") -> str:
    """A parameter's checkpoint name: without wrapper segments and without `prefix`."""
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    if prefix and name.startswith(prefix):
        name = name[len(prefix):]
    return name


def local_rows(param: torch.Tensor) -> tuple[torch.Tensor, slice | None]:
    """(this rank's local tensor, the dim-0 row range of the full tensor it holds).

    FSDP2 shards dim 0 with torch.chunk semantics, so a rank may hold zero rows. For a plain
    tensor the rows are None (all of them).
    """
    if not isinstance(param, DTensor):
        return param.data, None
    local = param.to_local()
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    if tuple(shape[1:]) != tuple(param.shape[1:]):
        raise ModelError(f"only dim-0 sharding is supported, got placements {param.placements}")
    return local, slice(offset[0], offset[0] + shape[0])


@torch.no_grad()
def load_sharded_weights(model: nn.Module, reader, *, prefix: str = "") -> None:
    """Fill each rank's rows of every parameter from `reader` (a model.CheckpointReader).

    Only the local rows are read from disk (the safetensors library's `get_slice` rows), so no
    rank materialises a full copy of the model. `model` must already be sharded and materialised
    (`to_empty`); shapes and names are checked beforehand by `Llama.check_checkpoint`.
    LoRA adapters (fastalign.lora) are left for `init_adapters`.
    """
    for name, param in model.named_parameters():
        local, rows = local_rows(param)
        if local.numel() and not is_adapter_name(name):  # adapters are not in the base checkpoint
            reader.read_into(canonical_name(name, prefix), local, rows)


def move_buffers(model: nn.Module, device: torch.device) -> None:
    """Put every buffer (rotary frequencies) on the compute device."""
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.device != device:
                module._buffers[name] = buffer.to(device)


def local_shards_nonfinite(model: nn.Module) -> torch.Tensor:
    """bool scalar: does any of this rank's parameter shards hold a NaN/inf? One fused max-abs
    reduction (`_foreach_norm` with ord inf: NaN propagates, nothing overflows); the caller
    all-reduces the flag over ranks. Empty shards (a rank past a small tensor's end) are skipped."""
    shards = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]
    shards = [t.detach() for t in shards if t.numel()]
    if not shards:
        return torch.zeros((), dtype=torch.bool)
    return ~torch.isfinite(torch.stack(torch._foreach_norm(shards, float("inf")))).all()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s value of a picklable object on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
