"""Per-rank memory of one training step, for `python -m fastalign.plan`.

Details: docs/design.md section 7.23.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from fastalign import distributed as fdist
from fastalign.alignment_model import AlignmentModel, uses_fsdp
from fastalign.hf_config import LlamaConfig
from fastalign.lora import LoraSettings, inject_adapters
from fastalign.model import Llama

# torch.distributed's fake backend, DTensor and the loss head's chunk rule are imported where used:
# the planner's --help and a usage error do not pay for them.


@dataclass(frozen=True)
class StateBytes:
    """What one rank keeps for the whole run (rank 0: the largest shard of each parameter)."""

    params: int  # sharded fp32 master weights (a LoRA base: bf16 under --bf16), as allocated (FSDP2 pads shards)
    grads: int  # sharded fp32 gradients of the trainable parameters (FSDP2: the same padded layout)
    optimizer: int  # AdamW exp_avg + exp_avg_sq (local shard shape) + one fp32 step per tensor
    layer_numel: int  # parameters of one decoder layer, unsharded
    root_numel: int  # embedding + final norm + lm_head, unsharded (a tied head counted once)
    lm_head_numel: int  # V x H
    fsdp: bool  # False: one fp32 process trains the plain module (no gathers, no reduce buffers)
    layer_shard_bytes: int = 0  # fp32 shard of one decoder layer (its reduce-scatter output)
    root_shard_bytes: int = 0  # fp32 shard of the root (embedding, final norm, lm_head)
    layer_grad_numel: int | None = None  # trainable parameters of one layer (None: all; LoRA: the adapters)
    root_grad_numel: int | None = None  # trainable root parameters (None: all; LoRA: its modules to save)
    lm_head_trains: bool = True  # False: a frozen LoRA head, no [V, H] weight gradient

    @property
    def layer_reduce_numel(self) -> int:
        return self.layer_numel if self.layer_grad_numel is None else self.layer_grad_numel

    @property
    def root_reduce_numel(self) -> int:
        return self.root_numel if self.root_grad_numel is None else self.root_grad_numel


@contextmanager
def fake_world(world_size: int):
    """A one-process stand-in for `world_size` ranks: torch.distributed's fake backend (collectives
    return at once and move nothing), this process being rank 0. The backend ships with torch
    (torch.testing._internal.distributed.fake_pg, present since torch 2.1), as torchtitan uses it."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("fastalign.plan needs its own (fake) process group; one is already initialised")
    dist.init_process_group(backend="fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def _local_storage_bytes(tensor: torch.Tensor) -> int:
    from torch.distributed.tensor import DTensor

    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.untyped_storage().nbytes()


def _local_numel(tensor: torch.Tensor) -> int:
    from torch.distributed.tensor import DTensor

    return (tensor.to_local() if isinstance(tensor, DTensor) else tensor).numel()


def measure_state(config: LlamaConfig, *, world_size: int, procs_per_node: int, strategy: str,
                  bf16: bool, gradient_checkpointing: bool, offload: bool,
                  lora: LoraSettings | None = None) -> StateBytes:
    """Shard the trainer's model as `fastalign.alignment_model.build_model` does and read rank 0's shards.

    With `lora` the adapters are injected as the trainer does (a frozen base stored in bf16 under
    `bf16`): gradients and AdamW state exist for the trainable parameters only."""
    plan = fdist.FsdpPlan(strategy=strategy, offload=offload)
    env = fdist.DistEnv(rank=0, world_size=world_size, local_rank=0, local_world_size=procs_per_node,
                        device=torch.device("cpu"), backend="fake")
    with torch.device("meta"):
        llama = Llama(config)
    if lora is not None:
        inject_adapters(llama, lora, base_dtype=torch.bfloat16 if bf16 else None)
    # the loss settings own no parameters or buffers: any valid values size the model alike
    model = AlignmentModel(llama, rating_scale=7.0, margin=1.0, ratio=0.2, max_flow=False,
                           margin_mode="paper", loss_backend="auto")
    layer_numel = sum(p.numel() for p in llama.layers[0].parameters()) if len(llama.layers) else 0
    root_numel = config.num_parameters() - config.num_hidden_layers * layer_numel
    layer_ids = {id(p) for layer in llama.layers for p in layer.parameters()}
    trained = dict(layer_grad_numel=sum(p.numel() for p in llama.layers[0].parameters() if p.requires_grad)
                   if len(llama.layers) else 0,
                   root_grad_numel=sum(p.numel() for p in llama.parameters()
                                       if p.requires_grad and id(p) not in layer_ids),
                   lm_head_trains=llama.lm_head.weight.requires_grad) if lora is not None else {}
    fsdp = uses_fsdp(bf16, env, plan)
    if gradient_checkpointing:
        fdist.apply_ac(llama.layers)
    if fsdp:
        with fake_world(world_size):
            mesh = fdist.build_mesh(env, plan)
            # Offload only moves the same shards to host memory; the policy pins host memory,
            # which meta tensors have none of, so the shards are measured without it.
            fdist.apply_fsdp(model, llama.layers, mesh, param_dtype=torch.bfloat16 if bf16 else None,
                             reshard_after_forward=plan.reshard_after_forward)
            params = list(model.parameters())
            param_bytes = sum(_local_storage_bytes(p) for p in params)
            trainable = [p for p in params if p.requires_grad]
            grad_bytes = sum(_local_storage_bytes(p) for p in trainable)  # fp32, as the trainable shards
            local_numel = sum(_local_numel(p) for p in trainable)
            # fp32 gradient shards the running sums of accumulation use: trainable parameters only
            layer_shard = sum(4 * _local_numel(p) for p in llama.layers[0].parameters()
                              if p.requires_grad) if len(llama.layers) else 0
            root_shard = sum(4 * _local_numel(p) for p in trainable if id(p) not in layer_ids)
    else:
        params = list(model.parameters())
        param_bytes = sum(p.numel() * p.element_size() for p in params)
        trainable = [p for p in params if p.requires_grad]
        grad_bytes = sum(p.numel() * p.element_size() for p in trainable)
        local_numel = sum(p.numel() for p in trainable)
        layer_shard = root_shard = 0
    optimizer = 2 * 4 * local_numel + 4 * len(trainable)  # fused AdamW: m, v like the shard; fp32 step
    return StateBytes(params=param_bytes, grads=grad_bytes, optimizer=optimizer, layer_numel=layer_numel,
                      root_numel=root_numel, lm_head_numel=config.vocab_size * config.hidden_size, fsdp=fsdp,
                      layer_shard_bytes=layer_shard, root_shard_bytes=root_shard, **trained)


@dataclass(frozen=True)
class MicroBatch:
    tokens: int  # T, computed tokens
    target_tokens: int  # N, positions with a target (responses' tokens)
    # Shared-prefix layout only (0 when unshared): Tk, the key/value rows every layer gathers
    # (`kv_index`: each segment's query segment plus itself), and the query x key pairs of the
    # segments whose keys include a query segment (Lq != Lk: the sdpa fallback's explicit mask).
    key_tokens: int = 0
    mask_elements: int = 0


@dataclass(frozen=True)
class Options:
    bf16: bool
    strategy: str  # fdist.FSDP_STRATEGIES
    offload: bool
    gradient_checkpointing: bool
    device_type: str = "cuda"  # "cpu": the sdpa attention fallback and the CPU slice budget
    loss_backend: str = "auto"  # auto: triton on CUDA, the torch twin on CPU
    micro_batches_per_step: int = 1  # > 1: gradients accumulate over the step's micro-batches

    @property
    def compute_bytes(self) -> int:
        return 2 if self.bf16 else 4

    @property
    def head_backend(self) -> str:
        if self.loss_backend != "auto":
            return self.loss_backend
        return "triton" if self.device_type == "cuda" else "torch"


def layer_saved_bytes(c: LlamaConfig, mb: MicroBatch, b: int, device_type: str) -> int:
    """What autograd keeps from one DecoderLayer's forward until its backward (no checkpointing).

    Each RMSNorm: its fp32 input (x.float(); for fp32 inputs the input itself) 4TH, rsqrt 4T, the
    normalised b*TH (for the weight's gradient) and its output b*TH (the next linear's input).
    Attention: rotated q, the keys and values it attends to, the attention output (q/k/v/o_proj
    save their inputs, the same tensors) and the fp32 log-sum-exp [Hq, T]; the rotary
    multiplications save only cos/sin (shared by all layers, counted once in `step_phases`). Keys
    and values are k, v [T, K] unshared; with a shared prefix the attention saves the gathered
    k[kv_index], v[kv_index] [Tk, K] instead (`attention.varlen_attention`; the gather itself saves
    only kv_index, shared by all layers, counted once in `step_phases`). The sdpa fallback
    concatenates its per-sequence outputs: one more [T, Q] copy; and for a segment that also sees
    its query segment it saves the bottom-right mask as a [Lq, Lk] tensor of the compute dtype.
    Qwen3's q/k norms: their own fp32 input, rsqrt and output. MLP: gate and up outputs,
    silu(gate) and the product, b*TI each.
    """
    h, q, k = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    t = mb.tokens
    key_rows = mb.key_tokens or t
    norms = 2 * (4 * t * h + 4 * t + 2 * b * t * h)
    attention = b * (2 * t * q + 2 * key_rows * k) + 4 * c.num_attention_heads * t
    if device_type == "cpu":
        attention += b * t * q + b * mb.mask_elements
    if c.qk_norm:
        attention += (4 + b) * t * (q + k) + 4 * t * (c.num_attention_heads + c.num_key_value_heads)
    mlp = 4 * b * t * c.intermediate_size
    return norms + attention + mlp


def layer_backward_bytes(c: LlamaConfig, mb: MicroBatch, b: int) -> int:
    """Activation gradients one layer's backward adds on top of the saved activations, at its
    largest: in the MLP's backward the gradients of the product, of silu(gate) and of up (3 b*TI)
    are alive while the product itself, used by down_proj's backward only, is already freed; in
    the attention's backward the gradients of q [T, Q] and of the keys and values it attended to,
    and with a shared prefix the gather's backward, which adds the [Tk, K] gradients into fresh
    [T, K] ones. Whichever is larger."""
    q, k = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    t = mb.tokens
    mlp = 2 * b * t * c.intermediate_size
    attention = b * t * (q + 2 * k) + (2 * b * mb.key_tokens * k if mb.key_tokens else 0)
    return max(mlp, attention)


def head_slice_columns(c: LlamaConfig, target_tokens: int, opts: Options) -> tuple[int, int]:
    """(C, bytes per logit) of the loss head's vocabulary slice: the head's own chunk rule
    (fastalign.kernels.alignment_head_torch.vocab_chunk_size; Triton keeps logits in the compute dtype, the
    twin in fp32)."""
    from fastalign.kernels.alignment_head_torch import vocab_chunk_size

    logit_bytes = opts.compute_bytes if opts.head_backend == "triton" else 4
    columns = vocab_chunk_size(target_tokens, c.vocab_size, c.hidden_size, logit_bytes,
                               device=opts.device_type)
    return min(columns, c.vocab_size), logit_bytes


def head_backward_bytes(c: LlamaConfig, mb: MicroBatch, opts: Options) -> tuple[int, int]:
    """(slice bytes, other head buffers) alive in the loss head's backward (loss.py, fastalign/kernels/).

    Both heads: grad_hidden zeros [T, H] (b), the gathered token rows [N, H] (b), the fp32
    token gradient [N, H], grad_weight [V, H] (b) and one logits slice [N, C]. Triton with bf16
    adds each slice's fp32 product [N, H] before it is summed in (fastalign/kernels/alignment_head.py,
    `_add_product_fp32`). The twin adds its fp32 weighted token rows [N, H] (and an fp32 copy of
    them for bf16 inputs) and the fp32 copy of the weight slice [C, H] with the product it assigns
    from (bf16 weights)."""
    b, h, n = opts.compute_bytes, c.hidden_size, mb.target_tokens
    columns, logit_bytes = head_slice_columns(c, n, opts)
    slice_bytes = n * columns * logit_bytes
    other = b * mb.tokens * h + b * n * h + 4 * n * h + b * c.vocab_size * h
    if opts.head_backend == "triton":
        other += 4 * n * h * (b != 4)
    else:
        other += 4 * n * h * (1 if b == 4 else 2) + 4 * columns * h * (1 if b == 4 else 2)
    return slice_bytes, other


@dataclass(frozen=True)
class Phase:
    """Bytes alive at one moment of the step, by part."""

    name: str
    parts: dict  # part name -> bytes

    @property
    def total(self) -> int:
        return sum(self.parts.values())


PART_NAMES = ("parameter shards", "gradients", "optimizer state", "gathered layers", "activations",
              "loss-head slice", "loss-head buffers", "backward buffers")


def step_phases(c: LlamaConfig, state: StateBytes, mb: MicroBatch, opts: Options) -> list[Phase]:
    """The moments of a training step where memory peaks, each with its parts (bytes, one rank).

    Persistent state (counted in every phase; with offload it lives in host memory instead):
    parameter shards, gradient shards (kept across accumulation steps) and AdamW state.
    Gathered parameters (FSDP2, compute dtype): the root (embedding, final norm, lm_head) stays
    gathered from forward to the end of backward; full_shard / hybrid_shard re-gather each layer in
    backward with the next one prefetched (2 layers), shard_grad_op / hybrid_shard_zero2 / no_shard
    keep every layer gathered after forward. Phases:
      loss-head backward: all saved activations + the head's backward buffers;
      last layer's backward: all saved activations (a checkpointed layer re-computed) + the
        layer's activation gradients, its unsharded gradients and fp32 reduce-scatter input, and
        the lm_head gradient, unsharded until the root's reduce-scatter at the end;
      end of backward: the root's unsharded gradients (lm_head, embedding) and their fp32
        reduce-scatter input.
    Accumulation (more than one micro-batch per step, no offload): each reduce-scatter's fp32
    output, one shard of the layer (of the root at the end of backward), is alive next to the
    running sum it is added into. Sharded meshes add it into the gradient shards. Replicated meshes
    (no_shard, hybrid) keep the sum in a per-layer partial-gradient buffer of shard size across the
    micro-batches (`distributed.set_gradient_all_reduce`; FSDP2's `_partial_reduce_output`) and
    all-reduce it in the last one. The gradient shards do not exist then: the optimizer step frees
    them (`zero_grad(set_to_none=True)`), and the last micro-batch turns each buffer into its
    layer's gradient. So the "gradients" part counts that buffer, and the transient output is the
    only extra.
    """
    b, h, t = opts.compute_bytes, c.hidden_size, mb.tokens
    layers = c.num_hidden_layers
    on_gpu = not opts.offload
    persistent = {"parameter shards": state.params * on_gpu, "gradients": state.grads * on_gpu,
                  "optimizer state": state.optimizer * on_gpu}
    keeps_layers = opts.strategy in ("shard_grad_op", "hybrid_shard_zero2", "no_shard")
    if state.fsdp:
        root_gathered = b * state.root_numel
        layer_gathered = b * state.layer_numel
        held_layers = layers if keeps_layers else 2
        # unsharded gradients in the compute dtype, then the fp32 flat reduce-scatter input
        layer_reduce = (b + 4) * state.layer_reduce_numel
        root_reduce = (b + 4) * state.root_reduce_numel
        lm_head_grad = b * state.lm_head_numel * state.lm_head_trains
        if opts.micro_batches_per_step > 1 and not opts.offload:
            layer_reduce += state.layer_shard_bytes
            root_reduce += state.root_shard_bytes
    else:  # the plain module: gradients are written straight into the persistent .grad tensors
        root_gathered = layer_gathered = held_layers = layer_reduce = root_reduce = lm_head_grad = 0
    per_layer = layer_saved_bytes(c, mb, b, opts.device_type)
    if opts.gradient_checkpointing:  # layer inputs; in a layer's backward also its re-computed activations
        saved, in_layer_backward = layers * b * t * h, layers * b * t * h + per_layer
    else:
        saved = in_layer_backward = layers * per_layer
    shared = 2 * b * t * c.head_dim + 8 * mb.key_tokens  # cos, sin [T, 1, D]; kv_index int64 [Tk]
    final = 4 * t * h + 4 * t + 2 * b * t * h + 4 * mb.target_tokens  # final norm, its output, lse
    slice_bytes, head_other = head_backward_bytes(c, mb, opts)
    gathered_forward_end = root_gathered + (layers * layer_gathered if keeps_layers else 0)
    return [
        Phase("loss-head backward", {**persistent, "gathered layers": gathered_forward_end,
                                     "activations": saved + shared + final, "loss-head slice": slice_bytes,
                                     "loss-head buffers": head_other, "backward buffers": 0}),
        Phase("last layer's backward", {**persistent, "gathered layers": root_gathered + held_layers * layer_gathered,
                                        "activations": in_layer_backward + shared, "loss-head slice": 0,
                                        "loss-head buffers": 0,
                                        "backward buffers": layer_backward_bytes(c, mb, b) + layer_reduce
                                        + lm_head_grad + b * t * h}),
        Phase("end of backward", {**persistent, "gathered layers": root_gathered + layer_gathered,
                                  "activations": 0, "loss-head slice": 0, "loss-head buffers": 0,
                                  "backward buffers": root_reduce}),
    ]


def peak_phase(c: LlamaConfig, state: StateBytes, mb: MicroBatch, opts: Options) -> Phase:
    return max(step_phases(c, state, mb, opts), key=lambda phase: phase.total)


def host_state_bytes(state: StateBytes, opts: Options) -> int:
    """Host memory one rank needs for its offloaded state (0 without offload)."""
    return (state.params + state.grads + state.optimizer) if opts.offload else 0
