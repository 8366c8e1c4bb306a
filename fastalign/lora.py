"""LoRA adapters inside fastalign's own Linear layers (docs/lora.md).

    settings = LoraSettings.from_config(config)        # the TRL ModelConfig flags
    inject_adapters(llama, settings, base_dtype=...)   # on the meta device, before AC / compile / FSDP
    ...materialise, load the base weights (skipping `is_adapter_name`)...
    init_adapters(model, seed)                         # PEFT's init: A kaiming-uniform, B zero

A targeted projection becomes a `LoraLinear`: the same `weight` / `bias` (so base checkpoints
load by their usual names) plus `lora_A.weight` [r, in] and `lora_B.weight` [out, r], PEFT's
names and layout. Everything else is frozen (and stored in `base_dtype`), except the modules of
`--lora_modules_to_save`, which train in full. The fused loss head reads `lm_head.weight`
directly: frozen, it gets no weight gradient, only the hidden states do.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastalign.errors import ConfigError

# PEFT's default targets for the supported families (peft.utils.constants, llama/mistral/qwen2/qwen3)
DEFAULT_TARGETS = ("q_proj", "v_proj")
ALL_LINEAR = "all-linear"
SAVABLE_MODULES = ("lm_head", "embed_tokens")  # top-level modules --lora_modules_to_save can train in full
ADAPTER_SEGMENTS = (".lora_A.", ".lora_B.")


@dataclass(frozen=True)
class LoraSettings:
    r: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]  # module names, or (ALL_LINEAR,)
    modules_to_save: tuple[str, ...]
    use_rslora: bool

    @property
    def scaling(self) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA (PEFT's `scaling`)."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @classmethod
    def from_config(cls, config) -> LoraSettings:
        """From a TrainConfig (or any object with the --lora_* attributes)."""
        return cls(r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                   target_modules=tuple(config.lora_target_modules or DEFAULT_TARGETS),
                   modules_to_save=tuple(config.lora_modules_to_save or ()), use_rslora=config.use_rslora)


class LoraLinear(nn.Linear):
    """y = x W^T + b + dropout(x) A^T B^T * scaling, with W [out, in] frozen, A [r, in], B [out, r].

    x [..., in] -> y [..., out]. B starts at zero, so the layer starts equal to the base layer.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, *, r: int, scaling: float,
                 dropout: float):
        super().__init__(in_features, out_features, bias=bias)
        self.lora_A = nn.Linear(in_features, r, bias=False)
        self.lora_B = nn.Linear(r, out_features, bias=False)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """B @ A * scaling [out, in]: what merging adds to `weight`."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling


def is_adapter_name(name: str) -> bool:
    """Whether a parameter name is an adapter's (not in the base checkpoint)."""
    return any(segment in name for segment in ADAPTER_SEGMENTS)


def linear_module_names(llama: nn.Module) -> list[str]:
    """The distinct leaf names of the decoder layers' Linear modules (q_proj, ..., down_proj)."""
    names = {name.rsplit(".", 1)[-1] for name, module in llama.layers.named_modules() if isinstance(module, nn.Linear)}
    return sorted(names)


def _targets(llama: nn.Module, settings: LoraSettings) -> list[str]:
    """Full names of the Linear modules to adapt; ConfigError for a name that matches nothing."""
    linears = [f"layers.{name}" for name, module in llama.layers.named_modules() if isinstance(module, nn.Linear)]
    if settings.target_modules == (ALL_LINEAR,):
        return linears  # PEFT's all-linear: every linear layer but the output head
    known = linear_module_names(llama)
    for target in settings.target_modules:
        if target == "lm_head":
            raise ConfigError("--lora_target_modules lm_head: the fused loss head reads lm_head's weight "
                              "directly and cannot carry an adapter; train it in full with "
                              "--lora_modules_to_save lm_head")
        if not any(_matches(name, target) for name in linears):
            raise ConfigError(f"--lora_target_modules {target!r} matches no module of the model; its linear "
                              f"modules are {', '.join(known)} (or all-linear)")
    return [name for name in linears if any(_matches(name, target) for target in settings.target_modules)]


def _matches(module_name: str, target: str) -> bool:
    """PEFT's rule for a target name: the module's full name, or its last dotted segments."""
    return module_name == target or module_name.endswith("." + target)


def _check_modules_to_save(llama: nn.Module, settings: LoraSettings) -> None:
    for name in settings.modules_to_save:
        if name not in SAVABLE_MODULES:
            raise ConfigError(f"--lora_modules_to_save {name!r}: fastalign trains in full only "
                              f"{' / '.join(SAVABLE_MODULES)}")
        if llama.config.tie_word_embeddings:
            raise ConfigError(f"--lora_modules_to_save {name}: the model ties lm_head to embed_tokens "
                              "(tie_word_embeddings); training one would change the other")


def inject_adapters(llama: nn.Module, settings: LoraSettings, *, base_dtype: torch.dtype | None = None) -> int:
    """Replace the targeted Linears of `llama` by LoraLinears, freeze everything else but the
    modules to save, and store the frozen parameters in `base_dtype` (None: as they are).

    The trainer calls it on the meta-device model, before activation checkpointing, compile and
    FSDP wrap the layers; on a loaded model the base's values are kept. Returns the number of
    adapted modules.
    """
    _check_modules_to_save(llama, settings)
    targets = _targets(llama, settings)
    for name in targets:
        parent_name, child = name.rsplit(".", 1)
        parent = llama.get_submodule(parent_name)
        base = getattr(parent, child)
        with torch.device(base.weight.device):
            adapted = LoraLinear(base.in_features, base.out_features, base.bias is not None, r=settings.r,
                                 scaling=settings.scaling, dropout=settings.dropout)
        adapted.to(base.weight.dtype)
        adapted.weight, adapted.bias = base.weight, base.bias  # the base's values (when already loaded)
        setattr(parent, child, adapted)
    saved = tuple(f"{name}." for name in settings.modules_to_save)
    for module_name, module in llama.named_modules():
        for param_name, param in list(module.named_parameters(recurse=False)):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if is_adapter_name(full) or full.startswith(saved):
                continue
            frozen = nn.Parameter(param.detach().to(base_dtype or param.dtype), requires_grad=False)
            setattr(module, param_name, frozen)
    llama._tie_weights()  # the replaced embedding is lm_head's weight again when they are tied
    return len(targets)


def _seed_of(name: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


@torch.no_grad()
def init_adapters(model: nn.Module, seed: int) -> None:
    """PEFT's init after materialising: lora_A kaiming-uniform (nn.Linear's, a = sqrt(5)), lora_B 0.

    Each full A is drawn on the CPU from a generator seeded by (seed, its canonical name), then
    each rank copies its own rows: the same adapters at every world size.
    """
    from fastalign.distributed import canonical_name, local_rows

    for name, param in model.named_parameters():
        if not is_adapter_name(name):
            continue
        local, rows = local_rows(param)
        if ".lora_B." in name:
            local.zero_()
            continue
        full = torch.empty(param.shape, dtype=torch.float32)
        generator = torch.Generator().manual_seed(_seed_of(canonical_name(name), seed))
        bound = 1.0 / math.sqrt(param.shape[1])  # kaiming_uniform_(a=sqrt(5)) on [r, in]
        full.uniform_(-bound, bound, generator=generator)
        local.copy_(full if rows is None else full[rows])


def trainable_summary(model: nn.Module) -> str:
    """'N trainable of M parameters (p%)' (local shards on each rank, so count on one process)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / max(total, 1):.3f}%)"


def check_resume_mode(saved_args: dict, use_peft: bool, checkpoint) -> None:
    """A LoRA checkpoint holds adapters only, a full one every weight: refuse to resume one as the other."""
    saved = bool(saved_args.get("use_peft", False))
    if saved != use_peft:
        kind = "LoRA adapters (--use_peft True)" if saved else "a full fine-tuning run (--use_peft False)"
        raise ConfigError(f"--resume_from_checkpoint {checkpoint}: the checkpoint is from {kind}; resume it with "
                          f"--use_peft {saved}")

