"""A `Llama` loaded from and saved as a Hugging Face model directory (config.json, safetensors weights,
tokenizer files); `Llama.from_pretrained` and `Llama.save_pretrained` call these.

Loading keeps host memory near one copy of the model in its target dtype: the model is built on
the meta device (no memory), cast to the target dtype there, materialised with `to_empty` (memory
is allocated, not written), and every weight is then read from disk straight into its parameter
(`fastalign.hf_weights.CheckpointReader`). No full fp32 copy, no state dict, each weight read once.

Distributed training: each rank reads what it needs. The trainer builds the model on meta,
shards it with FSDP2, materialises the local shards, calls `check_checkpoint(reader)` and fills
each shard with `reader.read(name, dtype, rows=slice(a, b))` (only those rows are read from
disk), then `init_buffers()`. No rank ever holds the full model. See docs/design.md section 4.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fastalign.errors import brief_list
from fastalign.hf_config import LlamaConfig
from fastalign.hf_weights import (
    SAFETENSORS_INDEX,
    SAFETENSORS_SINGLE,
    WEIGHT_FILE_GLOBS,
    CheckpointReader,
    hf_name,
    plan_shards,
    write_safetensors,
)

if TYPE_CHECKING:
    from fastalign.model import Llama

# Files that travel with a model directory besides config and weights.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
                   "chat_template.json")


def load_pretrained(model_cls: type[Llama], path, dtype: torch.dtype = torch.float32, device="cpu",
                    attn_implementation: str = "auto") -> Llama:
    """Load an HF directory of a supported family (`fastalign.hf_config.FAMILIES`) into a new
    `model_cls` in `dtype` on `device`; peak host memory ~ one model copy."""
    path = Path(path)
    config = LlamaConfig.from_pretrained(path)
    reader = CheckpointReader(path)
    with torch.device("meta"):
        model = model_cls(config)
    model.to(dtype=dtype)  # on meta: records the dtype, allocates nothing
    model.to_empty(device=device)
    model.load_weights(reader)
    model.source_dir = path
    model.set_attention_backend(attn_implementation)
    return model


def save_pretrained(model: Llama, path, *, state_dict: dict[str, torch.Tensor] | None = None,
                    tokenizer_dir=None, max_shard_size: int = 5 * 10**9) -> None:
    """Write an HF model directory that transformers loads as the family's class (LlamaForCausalLM,
    MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM).

    state_dict: full tensors under our names (default: the model's); a trainer passes the
    dict gathered from FSDP shards on rank 0. Weights keep their dtype; above
    `max_shard_size` bytes they are split into shards with an index. Tokenizer files and
    generation_config.json come from `tokenizer_dir` (default: the directory loaded from).
    Files appear only when complete: they are written into a temporary directory that is
    renamed to `path`, or, when `path` already holds other files (a training output dir),
    moved into it one by one with config.json last, replacing any older weight files.
    """
    path = Path(path)
    tensors = _hf_tensors(model, model.state_dict() if state_dict is None else state_dict)
    tmp = path / f".tmp-save-{os.getpid()}" if path.is_dir() else path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        _write_weights(tmp, tensors, max_shard_size)
        source = Path(tokenizer_dir) if tokenizer_dir is not None else model.source_dir
        _write_side_files(tmp, source, model.config)
        floating = next((t.dtype for t in tensors.values() if t.is_floating_point()), None)
        (tmp / "config.json").write_text(json.dumps(model.config.to_hf_dict(floating), indent=2) + "\n")
        _commit_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _hf_tensors(model: Llama, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state_dict` under HF names, checked against the model's parameters (a tied lm_head once)."""
    expected = [name for name, _ in model.named_parameters()]  # tied lm_head appears once
    missing = [n for n in expected if n not in state_dict]
    extra = [n for n in state_dict if n not in expected
             and not (n == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or extra:
        raise ValueError(f"save_pretrained: state_dict does not match the model: "
                         f"missing {brief_list(missing)}; unexpected {brief_list(extra)}")
    return {hf_name(n): state_dict[n].detach() for n in expected}


def _write_weights(directory: Path, tensors: dict[str, torch.Tensor], max_shard_size: int) -> None:
    sizes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
    shards = plan_shards(sizes.items(), max_shard_size)
    if len(shards) == 1:
        write_safetensors(directory / SAFETENSORS_SINGLE, tensors)
        return
    weight_map = {}
    for i, names in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(directory / file, {n: tensors[n] for n in names})
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    (directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _write_side_files(directory: Path, source: Path | None, config: LlamaConfig) -> None:
    """Tokenizer files and generation_config.json from `source`; a minimal generation config without."""
    for name in TOKENIZER_FILES + ("generation_config.json",):
        if source is not None and (source / name).is_file():
            shutil.copy2(source / name, directory / name)
    if not (directory / "generation_config.json").exists():
        generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
        (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def _commit_dir(tmp: Path, path: Path) -> None:
    """Make the complete `tmp` appear as `path` (see save_pretrained)."""
    if not path.exists():
        tmp.rename(path)
        return
    new_files = {f.name for f in tmp.iterdir()}
    for pattern in WEIGHT_FILE_GLOBS:  # weights of an earlier save that this one does not overwrite
        for old in path.glob(pattern):
            if old.name not in new_files:
                old.unlink()
    for f in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):
        os.replace(f, path / f.name)
    tmp.rmdir()

