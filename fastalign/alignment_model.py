"""The model-plus-loss glue: the Llama and the Stable Alignment loss head in one module, how a
micro-batch runs through it, and how the trainer builds and shards it (docs/design.md)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from fastalign import distributed as fdist
from fastalign.config import TrainConfig
from fastalign.errors import ConfigError
from fastalign.profiling import region

# fastalign.loss and fastalign.model are imported where used: `python -m fastalign.train --help` and a
# refused flag do not pay for them.

log = logging.getLogger("fastalign.train")


class AlignmentModel(nn.Module):
    """Llama and the Stable Alignment loss head in one forward.

    FSDP2 gathers the root's parameters (embedding, final norm, lm_head) only around the root's
    forward; computing the loss inside it lets the loss read the gathered `lm_head.weight`.
    Returns a dict of tensors (FSDP hooks traverse dicts): loss (scalar), nll [S], penalty [G],
    best [G].
    """

    def __init__(self, llama: nn.Module, *, rating_scale: float, margin: float, ratio: float,
                 max_flow: bool, margin_mode: str, loss_backend: str):
        super().__init__()
        self.llama = llama
        self.loss_kwargs = dict(rating_scale=rating_scale, margin=margin, ratio=ratio,
                                max_flow=max_flow, margin_mode=margin_mode, backend=loss_backend)

    def forward(self, input_ids, position_ids, cu_seqlens, max_seqlen: int, targets,
                response_index, scores, group_index, num_groups: int | None = None, loss_plan=None,
                kv_index=None, cu_seqlens_k=None, max_seqlen_k: int | None = None) -> dict[str, torch.Tensor]:
        from fastalign.loss import stable_alignment_loss

        hidden = self.llama(input_ids, position_ids, cu_seqlens, max_seqlen, kv_index, cu_seqlens_k,
                            max_seqlen_k)  # [T, H]
        with region("loss_head"):
            out = stable_alignment_loss(hidden, self.llama.lm_head.weight, targets, response_index,
                                        scores, group_index, num_groups=num_groups, plan=loss_plan,
                                        **self.loss_kwargs)
        return {"loss": out.loss, "nll": out.nll, "penalty": out.penalty, "best": out.best}


PREFIX = "llama."  # AlignmentModel's parameter names = "llama." + the HF names without "model."


def run_batch(model: nn.Module, batch, loss_plan=None) -> dict[str, torch.Tensor]:
    """One micro-batch through the model and the loss; loss_plan: `loss_plan_for(batch)`, made
    from the host copy, so that the loss does not wait for the device (else it plans itself)."""
    return model(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen,
                 batch.targets, batch.response_index, batch.scores, batch.group_index,
                 num_groups=len(batch.record_indices),  # groups it holds: 1 for a filler
                 loss_plan=loss_plan,
                 kv_index=batch.kv_index, cu_seqlens_k=batch.cu_seqlens_k, max_seqlen_k=batch.max_seqlen_k)


def loss_plan_for(batch, vocab: int):
    """The loss's validated token/group plan of a (host) micro-batch: no device sync."""
    from fastalign.loss import plan_loss

    return plan_loss(batch.targets, batch.response_index, batch.scores, batch.group_index,
                     vocab=vocab, num_groups=len(batch.record_indices))


def uses_fsdp(bf16: bool, env: fdist.DistEnv, plan: fdist.FsdpPlan) -> bool:
    """FSDP2 wraps the model when there is something to shard or reduce (several processes), to
    compute in bf16 over fp32 master weights (its MixedPrecisionPolicy), or to offload. One fp32
    process trains the plain module: the same numbers without gather/reduce copies."""
    return env.world_size > 1 or bf16 or plan.offload


def build_model(config: TrainConfig, env: fdist.DistEnv, plan: fdist.FsdpPlan):
    """Meta-device Llama -> AC -> compile -> FSDP2 -> materialise -> load local shards.

    Returns (model, llama, attention backend).
    """
    from fastalign.hf_config import LlamaConfig
    from fastalign.hf_weights import CheckpointReader
    from fastalign.model import Llama

    if plan.offload and env.device.type != "cuda":
        raise ConfigError("--fsdp offload: needs CUDA (it keeps parameter shards in host memory "
                          "while the GPUs compute); without a GPU everything is in host memory already")
    llama_config = LlamaConfig.from_pretrained(config.model_name_or_path)
    llama_config.check_length(config.model_max_length)  # a sliding window shorter than the sequences: refuse now
    if config.model_max_length > llama_config.max_position_embeddings and env.is_main:
        log.warning("--model_max_length %d is above the model's max_position_embeddings (%d): "
                    "positions past it were never trained (RoPE extrapolates poorly)",
                    config.model_max_length, llama_config.max_position_embeddings)
    reader = CheckpointReader(config.model_name_or_path)
    with torch.device("meta"):
        llama = Llama(llama_config)  # fp32 parameters: the master weights
    llama.check_checkpoint(reader)  # names every missing / unknown / misshapen weight up front
    if config.use_peft:
        from fastalign import lora

        lora.inject_adapters(llama, lora.LoraSettings.from_config(config),
                             base_dtype=torch.bfloat16 if config.bf16 else None)  # bf16 base: no fp32 copy
    backend = llama.set_attention_backend(
        config.attn_implementation, device=env.device,
        dtype=torch.bfloat16 if config.bf16 else torch.float32)
    model = AlignmentModel(llama, rating_scale=config.rating_scale, margin=config.margin,
                           ratio=config.ratio, max_flow=config.max_flow, margin_mode=config.margin_mode,
                           loss_backend=config.loss_backend)
    if config.gradient_checkpointing:
        fdist.apply_ac(llama.layers)
    if config.compile:
        fdist.apply_compile(llama.layers)
    if uses_fsdp(config.bf16, env, plan):
        mesh = fdist.build_mesh(env, plan)
        fdist.apply_fsdp(model, llama.layers, mesh,
                         param_dtype=torch.bfloat16 if config.bf16 else None,
                         reshard_after_forward=plan.reshard_after_forward, offload=plan.offload)
    model.to_empty(device="cpu" if plan.offload else env.device)
    fdist.load_sharded_weights(model, reader, prefix=PREFIX)
    if config.use_peft:
        lora.init_adapters(model, config.seed)
    llama.init_buffers()
    fdist.move_buffers(model, env.device)  # with CPU offload only the parameters stay on the host
    return model, llama, backend


def check_loss_backend(requested: str, device: torch.device) -> None:
    """Refuse --loss_backend triton at start-up where the Triton kernels cannot run (no CUDA and
    no interpreter, or no triton), rather than at the first step."""
    if requested != "triton":
        return
    from fastalign.loss import LossInputError, _resolve_backend

    try:
        _resolve_backend("triton", device)
    except LossInputError as err:
        raise ConfigError(f"--loss_backend triton: cannot run on this machine ({err}); "
                          "use --loss_backend auto or torch") from None


def loss_backend_name(requested: str, device: torch.device) -> str:
    """What `--loss_backend` runs as here (stable_alignment_loss's `auto`: Triton on CUDA only)."""
    return requested if requested != "auto" else ("triton" if device.type == "cuda" else "torch")



def group_sums(out: dict[str, torch.Tensor], num_groups: int) -> torch.Tensor:
    """float64 [4] on the device: sum of loss_g, of nll_best, of penalty, active penalties."""
    penalty = out["penalty"].detach().double()
    return torch.stack([out["loss"].detach().double() * num_groups,
                        out["nll"].detach().double()[out["best"]].sum(),
                        penalty.sum(), (penalty > 0).double().sum()])
