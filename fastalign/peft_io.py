"""LoRA adapters in PEFT's directory layout (docs/lora.md):

    adapter_config.json         peft_type LORA, r, lora_alpha, target_modules, base_model_name_or_path, ...
    adapter_model.safetensors   base_model.model.<HF name without .weight>.lora_A.weight [r, in],
                                ...lora_B.weight [out, r];
                                a module to save as base_model.model.<HF name> (PEFT's own keys)

`peft.PeftModel.from_pretrained(base, adapter_dir)` loads what `export_adapter` writes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from fastalign.distributed import broadcast_object, canonical_name
from fastalign.errors import FastalignError
from fastalign.hf_weights import hf_name
from fastalign.lora import ALL_LINEAR, LoraSettings

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def peft_key(name: str) -> str:
    """fastalign's name (HF's without `model.`) -> PEFT's saved key: base_model.model.<HF name>.

    layers.0.self_attn.q_proj.lora_A.weight -> base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight;
    a module to save keeps its HF name (lm_head.weight -> base_model.model.lm_head.weight).
    """
    return PEFT_PREFIX + hf_name(name)


def adapter_config(settings: LoraSettings, base_model: str, target_names: list[str]) -> dict:
    """adapter_config.json as PEFT's LoraConfig writes it (the fields it reads back)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": settings.r, "lora_alpha": settings.alpha, "lora_dropout": settings.dropout,
        "target_modules": target_names, "modules_to_save": list(settings.modules_to_save) or None,
        "use_rslora": settings.use_rslora, "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "inference_mode": True, "use_dora": False,
    }


def _target_names(settings: LoraSettings, state_names: list[str]) -> list[str]:
    """The leaf names that carry adapters (all-linear expanded, as PEFT stores it)."""
    if settings.target_modules != (ALL_LINEAR,):
        return sorted(settings.target_modules)
    return sorted({name.split(".lora_A.")[0].rsplit(".", 1)[-1] for name in state_names if ".lora_A." in name})


def _write_atomically(path: Path, write) -> None:
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(staging)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def export_adapter(model: nn.Module, settings: LoraSettings, output_dir: str | os.PathLike, base_model: str, *,
                   prefix: str = "") -> None:
    """Collective: gather the trainable parameters on rank 0 and write the PEFT adapter there.

    Weights first, config last (each written under a temporary name and renamed), so a directory
    with an adapter_config.json holds its weights. A write error is the same FastalignError on
    every rank, naming the directory.
    """
    from safetensors.torch import save_file

    from fastalign.checkpoint import _portable, write_failure

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                  ignore_frozen_params=True))
    problem = None
    if dist.get_rank() == 0:
        names = [canonical_name(name, prefix) for name in state]
        tensors = {peft_key(name): tensor.contiguous()
                   for name, tensor in zip(names, state.values())}
        config = adapter_config(settings, str(base_model), _target_names(settings, names))
        out = Path(output_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
            _write_atomically(out / ADAPTER_WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
            _write_atomically(out / ADAPTER_CONFIG, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
        except OSError as err:
            problem = _portable(err)
    problem = broadcast_object(problem)
    if problem is not None:
        needed = sum(t.numel() * t.element_size() for t in state.values()) if state else None
        raise FastalignError(write_failure("the adapter to", Path(output_dir), problem, needed, output_dir))


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, the adapter's tensors by PEFT key); ModelError naming a bad file."""
    from safetensors.torch import load_file

    from fastalign.errors import ModelError

    directory = Path(path)
    try:
        config = json.loads((directory / ADAPTER_CONFIG).read_text())
        tensors = load_file(str(directory / ADAPTER_WEIGHTS))
    except (OSError, ValueError) as err:
        raise ModelError(f"{directory}: not a readable PEFT adapter ({err})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise ModelError(f"{directory / ADAPTER_CONFIG}: peft_type must be LORA, got "
                         f"{config.get('peft_type') if isinstance(config, dict) else config!r}")
    if not isinstance(config.get("base_model_name_or_path"), str):
        raise ModelError(f"{directory / ADAPTER_CONFIG}: base_model_name_or_path is missing")
    return config, tensors


def settings_of(config: dict) -> LoraSettings:
    """The LoraSettings an adapter_config.json describes."""
    targets = config.get("target_modules")
    targets = (targets,) if isinstance(targets, str) else tuple(targets or ())
    return LoraSettings(r=int(config["r"]), alpha=float(config["lora_alpha"]), dropout=0.0,
                        target_modules=targets, modules_to_save=tuple(config.get("modules_to_save") or ()),
                        use_rslora=bool(config.get("use_rslora", False)))


@torch.no_grad()
def load_adapted(adapter_dir: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device="cpu",
                 attn_implementation: str = "auto"):
    """The base model of adapter_config.json with the adapter in it (a fastalign Llama, for
    evaluation and generation); ModelError naming a key the adapter misses or has in excess."""
    from fastalign.errors import ModelError
    from fastalign.lora import inject_adapters
    from fastalign.model import Llama

    config, tensors = read_adapter(adapter_dir)
    settings = settings_of(config)
    llama = Llama.from_pretrained(config["base_model_name_or_path"], dtype=dtype, device=device,
                                  attn_implementation=attn_implementation)
    inject_adapters(llama, settings)
    params = {peft_key(name): param for name, param in llama.named_parameters() if param.requires_grad}
    wanted = set(params)  # the adapters and the modules to save
    if wanted != set(tensors):
        raise ModelError(f"{adapter_dir}: the adapter does not fit its base model: missing "
                         f"{sorted(wanted - set(tensors))[:4]}, unexpected {sorted(set(tensors) - wanted)[:4]}")
    for key in wanted:
        params[key].copy_(tensors[key])
    llama.requires_grad_(False)
    return llama


@torch.no_grad()
def merged_state(llama: nn.Module) -> dict[str, torch.Tensor]:
    """The HF-named state dict of a `load_adapted` model with W + B A * scaling in each adapted layer."""
    from fastalign.lora import LoraLinear, is_adapter_name

    state = {name: param for name, param in llama.named_parameters() if not is_adapter_name(name)}
    for name, module in llama.named_modules():
        if isinstance(module, LoraLinear):
            weight = state[f"{name}.weight"]
            state[f"{name}.weight"] = (weight.float() + module.delta_weight()).to(weight.dtype)
    return state


def load_model(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device="cpu"):
    """An HF model directory, or a PEFT adapter directory over its base (adapter_config.json's
    base_model_name_or_path); the tokenizer is then the base's (`model.source_dir`)."""
    from fastalign.model import Llama

    if is_adapter_dir(path):
        return load_adapted(path, dtype=dtype, device=device)
    return Llama.from_pretrained(path, dtype=dtype, device=device)
