"""Resumable training checkpoints (torch.distributed.checkpoint) and the final HF export.

A checkpoint is `output_dir/checkpoint-<step>/`:

    .metadata, __<rank>_0.distcp   model and optimizer shards (DCP; loadable at another world size)
    trainer_state.json             step, data position (epoch, step_in_epoch), batch layout, args
    scheduler.pt                   LR scheduler state
    rng/rank<r>.pt                 each rank's torch / CUDA / python / numpy RNG states

It is written to `checkpoint-<step>.tmp/` and renamed by rank 0 once every rank has finished, so
a directory named `checkpoint-<step>` is always complete; a crash leaves only a `.tmp` directory,
which resume ignores and the next save removes.

With `--save_only_model` a checkpoint is the HF model instead (config.json, model.safetensors,
tokenizer: `from_pretrained` loads it) plus a trainer_state.json marked `save_only_model`. It holds
no optimizer, scheduler or RNG state, so it cannot be resumed (`resolve_resume` says so).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from fastalign.distributed import barrier, broadcast_object
from fastalign.errors import ConfigError

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# What a save may leave behind under output_dir: complete, unfinished (.tmp) or replaced (.old).
CHECKPOINT_ANY_RE = re.compile(r"^checkpoint-\d+(\.tmp|\.old)?$")
STATE_FILE = "trainer_state.json"
SCHEDULER_FILE = "scheduler.pt"
TMP_SUFFIX = ".tmp"
MODEL_ONLY_KEY = "save_only_model"  # trainer_state.json key of a --save_only_model checkpoint


def checkpoint_dir(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}"


def is_complete(path: Path) -> bool:
    """A finished checkpoint: final name (not .tmp), its state file and DCP metadata present."""
    return (
        CHECKPOINT_RE.match(path.name) is not None
        and (path / STATE_FILE).is_file()
        and (path / ".metadata").is_file()
    )


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest (lowest step) first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))


def is_model_only(path: Path) -> bool:
    """A finished --save_only_model checkpoint (HF model + marked state file, no DCP shards)."""
    if CHECKPOINT_RE.match(path.name) is None or not (path / STATE_FILE).is_file():
        return False
    try:
        return json.loads((path / STATE_FILE).read_text()).get(MODEL_ONLY_KEY) is True
    except (OSError, ValueError):
        return False


def list_model_only_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """--save_only_model checkpoints in `output_dir`, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and is_model_only(p)]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def resolve_resume(value: str | None, output_dir: str | os.PathLike) -> Path | None:
    """`--resume_from_checkpoint`: None, `auto` (latest complete one, if any) or a path."""
    if value is None:
        return None
    if value.lower() in ("auto", "true", "latest"):
        return latest_checkpoint(output_dir)
    path = Path(value)
    if not path.is_dir():
        raise ConfigError(f"--resume_from_checkpoint: {value} is not a directory")
    if is_model_only(path):
        raise ConfigError(
            f"--resume_from_checkpoint: {value} was written with --save_only_model: it holds the "
            "model weights only (no optimizer, scheduler or data position), so training cannot "
            "resume from it. Load it with from_pretrained, or start a new run from it with "
            f"--model_name_or_path {value}")
    if not is_complete(path):
        raise ConfigError(
            f"--resume_from_checkpoint: {value} is not a complete checkpoint-<step> directory "
            f"(missing {STATE_FILE} or .metadata, or an unfinished .tmp save)"
        )
    return path


def prepare_output_dir(output_dir: str | os.PathLike, *, fresh_start: bool, overwrite: bool,
                       run_files: tuple[str, ...] = ()) -> None:
    """Create `output_dir` and make sure a fresh run cannot mix with another run's checkpoints.

    Collective (every rank calls it; rank 0 looks at the directory and every rank raises the same
    error). A fresh start into a directory holding complete checkpoints stops: rotation keeps the
    highest steps, so it would delete the new run's checkpoints and keep the old ones, and `auto`
    would later resume the foreign run. With `overwrite` (HF's --overwrite_output_dir) rank 0
    deletes every checkpoint-* directory (.tmp / .old included) and `run_files` first.
    """
    problem = None
    if dist.get_rank() == 0:
        root = Path(output_dir)
        try:
            root.mkdir(parents=True, exist_ok=True)
            if overwrite:
                for path in root.iterdir():
                    if path.is_dir() and CHECKPOINT_ANY_RE.match(path.name):
                        shutil.rmtree(path)
                for name in run_files:
                    (root / name).unlink(missing_ok=True)
        except OSError as err:  # e.g. the path is a file: every rank reports it, not a traceback
            problem = f"--output_dir {root}: {err.strerror or err}"
        if problem is None and fresh_start and not overwrite:
            found = [p.name for p in list_checkpoints(root) + list_model_only_checkpoints(root)]
            if found:
                problem = (
                    f"--output_dir {root} already holds checkpoints of another run ({', '.join(found)}); "
                    "a fresh start there would mix the two runs. Continue that run with "
                    "--resume_from_checkpoint auto, start over with --overwrite_output_dir True "
                    "(deletes them), or choose another --output_dir"
                )
    problem = broadcast_object(problem)  # also the barrier after rank 0's deletions
    if problem is not None:
        raise ConfigError(problem)


def rotate_checkpoints(output_dir: str | os.PathLike, keep: int | None, *, model_only: bool = False) -> list[Path]:
    """Delete the oldest complete (or, with `model_only`, --save_only_model) checkpoints so at most
    `keep` remain; returns the deleted ones."""
    if keep is None or keep <= 0:
        return []
    found = list_model_only_checkpoints(output_dir) if model_only else list_checkpoints(output_dir)
    doomed = found[: max(0, len(found) - keep)]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def _rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    trainer_state: dict[str, Any],
    *,
    save_total_limit: int | None = None,
) -> Path:
    """Write checkpoint-<step> collectively (every rank calls this); returns its final path."""
    rank = dist.get_rank()
    final = checkpoint_dir(output_dir, step)
    tmp = final.with_name(final.name + TMP_SUFFIX)
    if rank == 0:
        for stale in Path(output_dir).glob(f"checkpoint-*{TMP_SUFFIX}"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a crashed save
        (tmp / "rng").mkdir(parents=True)
    barrier()

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp))
    torch.save(_rng_state(), tmp / "rng" / f"rank{rank}.pt")
    if rank == 0:
        torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2, sort_keys=True))
    barrier()

    if rank == 0:
        _commit(tmp, final)
        rotate_checkpoints(output_dir, save_total_limit)
    barrier()
    return final


def _commit(tmp: Path, final: Path) -> None:
    """Rank 0: give a finished `.tmp` save its final name."""
    if final.exists():  # re-saving a step after resuming from an earlier checkpoint
        old = final.with_name(final.name + ".old")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


def save_model_only_checkpoint(output_dir: str | os.PathLike, step: int, model: nn.Module, config,
                               tokenizer_dir: str, trainer_state: dict[str, Any], *, prefix: str = "",
                               save_total_limit: int | None = None) -> Path:
    """--save_only_model: write checkpoint-<step> as the HF model + a marked trainer_state.json
    (collective, like save_checkpoint); at most `save_total_limit` such checkpoints are kept."""
    final = checkpoint_dir(output_dir, step)
    tmp = final.with_name(final.name + TMP_SUFFIX)
    if dist.get_rank() == 0:
        for stale in Path(output_dir).glob(f"checkpoint-*{TMP_SUFFIX}"):
            shutil.rmtree(stale, ignore_errors=True)
    barrier()
    export_hf(model, config, tmp, tokenizer_dir, prefix=prefix)  # ends with a barrier
    if dist.get_rank() == 0:
        state = {**trainer_state, MODEL_ONLY_KEY: True}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))
        _commit(tmp, final)
        rotate_checkpoints(output_dir, save_total_limit, model_only=True)
    barrier()
    return final


def read_trainer_state(path: Path) -> dict[str, Any]:
    return json.loads((path / STATE_FILE).read_text())


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler
) -> dict[str, Any]:
    """Restore model and optimizer shards, scheduler and this rank's RNG; returns trainer state."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )
    scheduler.load_state_dict(torch.load(path / SCHEDULER_FILE, weights_only=False))
    rng_file = path / "rng" / f"rank{dist.get_rank()}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return read_trainer_state(path)


def full_model_state_dict(model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor] | None:
    """Gather the unsharded state dict on rank 0 (CPU), names without `prefix`; None elsewhere."""
    state = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if dist.get_rank() != 0:
        return None
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def export_hf(model: nn.Module, config, output_dir: str | os.PathLike, tokenizer_dir: str, *, prefix: str = "") -> None:
    """Write the HF model (config, safetensors, tokenizer) into `output_dir` from rank 0.

    Every rank takes part in the gather; only rank 0 holds the full weights (on CPU) and writes.
    The writer is a fresh meta-device Llama of `config`: the trained module's own parameter names
    carry activation-checkpointing / compile wrapper segments that HF names do not have.
    """
    from fastalign.model import Llama

    state = full_model_state_dict(model, prefix)
    if dist.get_rank() == 0:
        with torch.device("meta"):
            writer = Llama(config)
        writer.save_pretrained(output_dir, state_dict=state, tokenizer_dir=tokenizer_dir)
    barrier()


def agree_on_resume(path: Path | None) -> Path | None:
    """Rank 0's choice of checkpoint, so that every rank resumes from the same step."""
    chosen = broadcast_object(str(path) if path is not None else None)
    return Path(chosen) if chosen is not None else None
