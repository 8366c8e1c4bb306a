"""What a checkpoint records about the inputs that decide its batches, and the check a resume
makes with them.

Details: docs/design.md section 7.27.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastalign.data.token_cache import TOKENIZER_FILES, file_digest
from fastalign.errors import ConfigError

if TYPE_CHECKING:
    from fastalign.config import TrainConfig

INPUTS_KEY = "inputs"  # trainer_state.json key
# The tokenizer's own files: config.json (in the token cache's key too) changes with the model,
# which the checkpoint's tensor shapes check (fastalign.safe_dcp), not this.
TOKENIZER_ONLY_FILES = tuple(name for name in TOKENIZER_FILES if name != "config.json")
SHOWN_HEX = 12  # digest characters in messages

# batch_layout key -> how a message names it
LAYOUT_NAMES = {"world_size": "number of processes", "per_device_train_batch_size": "--per_device_train_batch_size",
                "gradient_accumulation_steps": "--gradient_accumulation_steps", "num_comp": "--num_comp",
                "seed": "--seed"}
DATA_DERIVED = {"steps_in_epoch_0": "optimizer steps in epoch 0"}  # follows from the data and layout


def _file_record(path: str) -> dict[str, str]:
    return {"path": os.path.abspath(path), "sha256": file_digest(Path(path))}


def tokenizer_digest(model_dir: str | os.PathLike) -> str:
    """SHA-256 over the names and digests of the tokenizer files present in `model_dir`."""
    files = {name: file_digest(Path(model_dir) / name) for name in TOKENIZER_ONLY_FILES
             if (Path(model_dir) / name).is_file()}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def describe(config: TrainConfig, step_token_budget: int | None) -> dict[str, Any]:
    """This run's "inputs" record (reads the data and tokenizer files once)."""
    evaluates = config.evaluation_strategy != "no"
    return {"data": _file_record(config.data_path),
            "eval_data": _file_record(config.eval_data_path) if evaluates else None,
            "tokenizer": {"path": os.path.abspath(config.model_name_or_path),
                          "sha256": tokenizer_digest(config.model_name_or_path)},
            "model_max_length": config.model_max_length,
            "step_token_budget": step_token_budget, "share_prefix": config.share_prefix}


def recorded_inputs(config: TrainConfig, step_token_budget: int | None, *, rank: int,
                    broadcast: Callable) -> dict[str, Any] | None:
    """Collective: rank 0's `describe` on every rank, or None when neither a checkpoint will be
    written nor one resumed (the files are then not read again)."""
    if config.save_strategy == "no" and config.resume_from_checkpoint is None:
        return None
    return broadcast(describe(config, step_token_budget) if rank == 0 else None)


def _file_change(flag: str, saved: Any, now: dict) -> str | None:
    saved = saved if isinstance(saved, dict) else {}
    if saved.get("sha256") == now["sha256"]:
        return None
    old_digest = str(saved.get("sha256"))[:SHOWN_HEX]
    return (f"{flag}: other contents (checkpoint: {saved.get('path')}, sha256 {old_digest}...; "
            f"now: {now['path']}, sha256 {now['sha256'][:SHOWN_HEX]}...)")


def _value_change(name: str, saved: Any, now: Any) -> str | None:
    return None if saved == now else f"{name} (checkpoint {saved!r}, now {now!r})"


def _found(changes: list) -> list[str]:
    return [change for change in changes if change]


def data_changes(saved: dict, now: dict) -> list[str]:
    """What differs in the data as the model sees it: files, tokenizer, --model_max_length."""
    both_evaluate = saved.get("eval_data") is not None and now["eval_data"] is not None
    return _found([
        _file_change("--data_path", saved.get("data"), now["data"]),
        both_evaluate and _file_change("--eval_data_path", saved["eval_data"], now["eval_data"]),
        _file_change("the tokenizer files of --model_name_or_path", saved.get("tokenizer"), now["tokenizer"]),
        _value_change("--model_max_length", saved.get("model_max_length"), now["model_max_length"])])


def packing_changes(saved: dict, now: dict) -> list[str]:
    """What differs only in how a step's groups are packed into micro-batches."""
    return _found([
        _value_change("the step's token budget (--max_tokens_per_batch)", saved.get("step_token_budget"),
                      now["step_token_budget"]),
        _value_change("--share_prefix", saved.get("share_prefix"), now["share_prefix"])])


def check(state: dict[str, Any], source: Path, *, layout: dict[str, Any], inputs: dict[str, Any],
          allow_data_change: bool) -> list[str]:
    """Compare checkpoint `source`'s trainer state with the resuming run's batch `layout` and
    `inputs`; a ConfigError names every refused change, else the warnings to log are returned."""
    saved_layout = state.get("batch_layout", {})
    layout_changed = _found([_value_change(LAYOUT_NAMES.get(name, name), saved_layout.get(name), value)
                             for name, value in layout.items() if name not in DATA_DERIVED])
    data_changed = _found([_value_change(DATA_DERIVED[name], saved_layout.get(name), layout[name])
                           for name in DATA_DERIVED if name in layout])
    warnings = []
    saved_inputs = state.get(INPUTS_KEY)
    if saved_inputs is None:
        warnings.append(f"{source} records no digests of its data and tokenizer (written by an older "
                        "fastalign): resuming without checking that they are unchanged")
    else:
        data_changed = data_changes(saved_inputs, inputs) + data_changed
        packing = packing_changes(saved_inputs, inputs)
        if packing:
            warnings.append(f"resuming {source} with other packing: {'; '.join(packing)}; each step holds "
                            "the same groups and loss, packed into other micro-batches")
    position = f"step {state['step']} (epoch {state['epoch']}, step {state['step_in_epoch']} of the epoch)"
    if layout_changed:
        raise ConfigError(
            f"--resume_from_checkpoint {source}: the checkpoint was written with a different batch layout, "
            f"so the run cannot continue with the same batches: {'; '.join(layout_changed + data_changed)}. "
            "Resume with the checkpoint's number of processes and batch flags")
    if data_changed and not allow_data_change:
        raise ConfigError(
            f"--resume_from_checkpoint {source}: the data differs from the checkpoint's, so its data "
            f"position, {position}, would continue on other batches: {'; '.join(data_changed)}. Resume "
            "with the checkpoint's data, or pass --allow_data_change True if the change is deliberate "
            "(training then continues from that position on the new data)")
    if data_changed:
        warnings.append(f"--allow_data_change: resuming {source} at {position} on changed data: "
                        + "; ".join(data_changed))
    return warnings
