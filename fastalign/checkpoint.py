"""Resumable training checkpoints (torch.distributed.checkpoint) and the final HF export.

Details: docs/design.md section 7.2.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor

from fastalign import checkpoint_state, manifest, safe_dcp
from fastalign.distributed import barrier, broadcast_object
from fastalign.errors import ConfigError, FastalignError

if TYPE_CHECKING:
    from fastalign.run_inputs import RunInputs

# fastalign.model is imported where used: only the HF export builds a Llama.

log = logging.getLogger("fastalign.checkpoint")

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# What a save may leave behind under output_dir: complete, unfinished (.tmp) or replaced (.old).
CHECKPOINT_ANY_RE = re.compile(r"^checkpoint-(\d+)(\.tmp|\.old)?$")
ABANDONED_PREFIX = "abandoned-"
EXPORT_TMP_GLOB = ".tmp-save-*"  # Llama.save_pretrained's staging directory inside output_dir
# ... and beside a --save_only_model checkpoint-N.tmp that does not exist yet: .checkpoint-N.tmp.tmp-<pid>
MODEL_ONLY_TMP_GLOB = ".checkpoint-*.tmp-*"
STATE_FILE = checkpoint_state.STATE_FILE
SCHEDULER_FILE = checkpoint_state.SCHEDULER_FILE
METADATA_FILE = safe_dcp.METADATA_FILE
TMP_SUFFIX = ".tmp"
MODEL_ONLY_KEY = "save_only_model"  # trainer_state.json key of a --save_only_model checkpoint


def checkpoint_dir(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}"


def step_of(path: Path) -> int:
    return int(CHECKPOINT_RE.match(path.name).group(1))


def is_complete(path: Path) -> bool:
    """A finished save: final name (not .tmp), its state file and DCP metadata present. Whether
    it can be resumed (manifest present, every byte intact) is `verify_checkpoint`'s question."""
    return (
        CHECKPOINT_RE.match(path.name) is not None
        and (path / STATE_FILE).is_file()
        and (path / METADATA_FILE).is_file()
    )


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest (lowest step) first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=step_of)


def is_model_only(path: Path) -> bool:
    """A finished --save_only_model checkpoint (HF model + marked state file, no DCP shards)."""
    if CHECKPOINT_RE.match(path.name) is None or not (path / STATE_FILE).is_file():
        return False
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get(MODEL_ONLY_KEY) is True  # else checkpoint_state says why


def list_model_only_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """--save_only_model checkpoints in `output_dir`, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and is_model_only(p)), key=step_of)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def verify_checkpoint(path: Path) -> str | None:
    """Collective: None if `path` is complete, every file is a regular file matching its manifest
    and the small state files are valid field by field; else why not."""
    problem = manifest.verify(path, required=(STATE_FILE, METADATA_FILE, SCHEDULER_FILE))
    if problem is None:  # the same answer on every rank: all of them are here
        problem = broadcast_object(checkpoint_state.problem(path) if dist.get_rank() == 0 else None)
    return problem


def resolve_resume(value: str | None, output_dir: str | os.PathLike) -> Path | None:
    """`--resume_from_checkpoint`: None, `auto` (the newest checkpoint that verifies; a fresh
    start when there is no checkpoint at all; an error when there are only --save_only_model
    ones) or a path (which must verify). Collective: every rank gets rank 0's choice, and the
    same ConfigError."""
    if value is None:
        return None
    if value.lower() in ("auto", "true", "latest"):
        candidates = broadcast_object([str(p) for p in list_checkpoints(output_dir)] if dist.get_rank() == 0 else None)
        skipped = []
        for candidate in map(Path, reversed(candidates)):
            problem = verify_checkpoint(candidate)
            if problem is None:
                return candidate
            if dist.get_rank() == 0:
                log.warning("--resume_from_checkpoint auto: skipping %s, it does not verify: %s", candidate, problem)
            skipped.append(f"{candidate.name}: {problem}")
        if skipped:
            raise ConfigError(f"--resume_from_checkpoint auto: no checkpoint in {output_dir} verifies ("
                              + "; ".join(skipped) + "). Start over with --overwrite_output_dir True")
        # Starting fresh over a --save_only_model run would replace its metrics and checkpoints.
        model_only = broadcast_object([p.name for p in list_model_only_checkpoints(output_dir)]
                                      if dist.get_rank() == 0 else None)
        if model_only:
            raise ConfigError(
                f"--resume_from_checkpoint auto: {output_dir} holds only --save_only_model checkpoints "
                f"({', '.join(model_only)}): they hold the model weights only, so training cannot resume "
                f"from them. Start a new run from one with --model_name_or_path {Path(output_dir) / model_only[-1]} "
                "and another --output_dir, or start over here with --overwrite_output_dir True (deletes them)")
        return None
    path = Path(value)
    problem = None
    if dist.get_rank() == 0:  # one view of the file system (NFS caches differ per node)
        if not path.is_dir():
            problem = f"--resume_from_checkpoint: {value} is not a directory"
        elif is_model_only(path):
            problem = (f"--resume_from_checkpoint: {value} was written with --save_only_model: it holds the "
                       "model weights only (no optimizer, scheduler or data position), so training cannot "
                       "resume from it. Load it with from_pretrained, or start a new run from it with "
                       f"--model_name_or_path {value}")
        elif not is_complete(path):
            problem = (f"--resume_from_checkpoint: {value} is not a complete checkpoint-<step> directory "
                       f"(missing {STATE_FILE} or {METADATA_FILE}, or an unfinished .tmp save)")
    problem = broadcast_object(problem)
    if problem is not None:
        raise ConfigError(problem)
    problem = verify_checkpoint(path)
    if problem is not None:
        raise ConfigError(f"--resume_from_checkpoint: {value} does not verify: {problem}")
    return path


def prepare_output_dir(output_dir: str | os.PathLike, *, fresh_start: bool, overwrite: bool,
                       run_files: tuple[str, ...] = ()) -> None:
    """Create `output_dir`, remove what interrupted saves left, and make sure a fresh run cannot
    mix with another run's checkpoints.

    Collective (every rank calls it; rank 0 looks at the directory and every rank raises the same
    error). A fresh start into a directory holding complete checkpoints stops: rotation keeps the
    highest steps, so it would delete the new run's checkpoints and keep the old ones, and `auto`
    would later resume the foreign run. With `overwrite` (HF's --overwrite_output_dir) rank 0
    deletes every checkpoint-* directory (.tmp / .old included), abandoned branches and
    `run_files` first.
    """
    problem = None
    if dist.get_rank() == 0:
        root = Path(output_dir)
        try:
            root.mkdir(parents=True, exist_ok=True)
            remove_partial_saves(root)
            if overwrite:
                for path in overwritten(root, run_files):
                    if path.is_dir():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
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


def overwritten(root: Path, run_files: tuple[str, ...]) -> list[Path]:
    """What --overwrite_output_dir deletes in `root`: every checkpoint-* directory (.tmp / .old
    included), abandoned branches, and those of `run_files` that exist."""
    runs = [path for path in sorted(root.iterdir()) if path.is_dir() and (
        CHECKPOINT_ANY_RE.match(path.name) or path.name.startswith(ABANDONED_PREFIX))]
    return runs + [root / name for name in run_files if (root / name).exists()]


def partial_saves(root: Path) -> list[Path]:
    """What killed saves and exports left in `root`: unfinished checkpoint-N.tmp, replaced
    checkpoint-N.old, and the export's staging directories (.tmp-save-<pid>, and
    .checkpoint-N.tmp.tmp-<pid> of a --save_only_model checkpoint)."""
    return [path for path in sorted(root.iterdir()) if path.is_dir() and (
        path.match(EXPORT_TMP_GLOB) or path.match(MODEL_ONLY_TMP_GLOB)
        or ((match := CHECKPOINT_ANY_RE.match(path.name)) and match.group(2) is not None))]


def remove_partial_saves(root: Path) -> None:
    """Rank 0, at start: delete the `partial_saves`, except that a checkpoint-N.old whose
    replacement never arrived (a kill between the two renames of a re-save) is put back."""
    for path in partial_saves(root):
        if path.name.endswith(".old"):
            final = path.with_name(path.name[: -len(".old")])
            if final.exists():
                shutil.rmtree(path)
            else:
                path.rename(final)
        else:
            log.info("removing %s, left by an interrupted save", path)
            shutil.rmtree(path)


def start_branch(output_dir: str | os.PathLike, resume_step: int, resumed: Path,
                 inputs: RunInputs | None = None) -> Path | None:
    """Collective: resuming at `resume_step` (from `resumed`, which is never moved) abandons the
    checkpoints of later steps in `output_dir`; rank 0 moves them into abandoned-<UTC time>/
    (returned; None if there were none), so that rotation and `auto` see only the branch being
    trained. Runs after every rank has finished reading `resumed` (barrier first). When one of
    them holds one of the run's `inputs` (its model, a data file), nothing moves: ConfigError."""
    barrier()
    moved, problem = None, None
    if dist.get_rank() == 0:
        root = Path(output_dir)
        try:
            later = [p for p in root.iterdir() if p.is_dir() and (m := CHECKPOINT_ANY_RE.match(p.name))
                     and int(m.group(1)) > resume_step and p.resolve() != resumed.resolve()] \
                if root.is_dir() else []
            if inputs is not None:
                problem = inputs.refusal(later, f"resuming at step {resume_step} would move into "
                                                f"{ABANDONED_PREFIX}<UTC time>/ the later checkpoint")
            if later and problem is None:
                stamp = time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())
                moved = root / f"{ABANDONED_PREFIX}{stamp}"
                suffix = 1
                while moved.exists():  # two branches started within one second
                    moved, suffix = root / f"{ABANDONED_PREFIX}{stamp}-{suffix}", suffix + 1
                moved.mkdir()
                for path in sorted(later):
                    path.rename(moved / path.name)
                log.warning("resuming at step %d starts a new branch: moved the later checkpoints of the "
                            "abandoned branch (%s) to %s; delete it when it is not needed",
                            resume_step, ", ".join(p.name for p in sorted(later)), moved)
        except OSError as err:
            problem = (f"resuming at step {resume_step}: could not move the abandoned branch's later "
                       f"checkpoints aside in {root} ({err.strerror or err}); nothing was trained")
    chosen, problem = broadcast_object((str(moved) if moved else None, problem))
    if problem is not None:
        raise ConfigError(problem)
    return Path(chosen) if chosen else None


def rotate_checkpoints(output_dir: str | os.PathLike, keep: int | None,
                       protect: Path | None = None, *, model_only: bool = False,
                       best: Path | None = None) -> list[Path]:
    """Delete the oldest complete (with `model_only`: --save_only_model) checkpoints so at most
    `keep` remain (never `protect`, the one just written); returns the deleted ones.

    `best` (--load_best_model_at_end, fastalign.best_model) is never deleted either; it counts
    towards `keep`, so with keep=1 and an older best, two checkpoints remain (as HF)."""
    if keep is None or keep <= 0:
        return []
    listed = list_model_only_checkpoints(output_dir) if model_only else list_checkpoints(output_dir)
    found = [p for p in listed if protect is None or p != protect]
    if best is not None and best in found:
        found.remove(best)
        keep -= 1
    doomed = found[: max(0, len(found) + (protect is not None) - keep)]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


# ---------------------------------------------------------------------------- small state as JSON


def _rng_state() -> dict[str, Any]:
    """This process's RNG states as JSON values (lists of ints)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state().tolist(),
        "python": [version, list(mt), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=1, sort_keys=True))


# ---------------------------------------------------------------------------- save / load


def _tensor_bytes(state: dict[str, Any]) -> int:
    """Bytes of this rank's tensors in a (nested) state dict: what its shard file will hold."""
    total = 0
    for value in state.values():
        if isinstance(value, dict):
            total += _tensor_bytes(value)
        elif isinstance(value, torch.Tensor):
            local = value.to_local() if isinstance(value, DTensor) else value
            total += local.numel() * local.element_size()
    return total


def _root_cause(err: BaseException) -> BaseException:
    """The first rank's original exception inside DCP's CheckpointException."""
    if isinstance(err, CheckpointException) and err.failures:
        return _root_cause(next(iter(err.failures.values()))[0])
    return err


def _portable(err: BaseException) -> OSError:
    """An OSError carrying what write_failure reports, safe to send to the other ranks."""
    if isinstance(err, OSError):
        return OSError(err.errno, err.strerror, err.filename) if err.strerror else OSError(str(err))
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "unexpected pos" in text:  # torch.save into a stream turns the OSError into this
        return OSError(f"a write stopped short inside torch.save (disk full, quota or file size limit?): {text}")
    return OSError(f"{type(err).__name__}: {text}")


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def write_failure(what: str, target: Path, err: OSError, needed: int | None,
                  output_dir: str | os.PathLike) -> str:
    """The message for an OSError while writing a checkpoint or the model: the path, the reason,
    the space needed (when known) and free, and the last complete checkpoint."""
    path = err.filename or target
    reason = f"{err.strerror} ({errno.errorcode.get(err.errno, err.errno)})" if err.strerror else str(err)
    space = ""
    try:
        free = shutil.disk_usage(output_dir).free
        space = (f"; it needs about {_size(needed)}, {_size(free)} are free there"
                 if needed else f"; {_size(free)} are free there")
        if not err.strerror and needed and free < needed:
            space += " (less than it needs: most likely the disk is full)"
    except OSError:
        pass
    last = latest_checkpoint(output_dir)
    return (f"writing {what} {target} failed at {path}: {reason}{space}. "
            + (f"The last complete checkpoint is {last}; free some space (or fix the path), then "
               "restart with --resume_from_checkpoint auto" if last else
               "No complete checkpoint exists; free some space (or fix the path) and run again"))


def state_options(model: nn.Module) -> StateDictOptions:
    """What a checkpoint holds of the model: its trainable parameters (all of them, or LoRA's
    adapters and modules to save; the frozen base is read from --model_name_or_path again). The
    frozen ones are then absent on load: the shape check against the checkpoint (safe_dcp) names
    any trainable one that is missing."""
    frozen = any(not p.requires_grad for p in model.parameters())
    return StateDictOptions(ignore_frozen_params=True, strict=not frozen)


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    trainer_state: dict[str, Any],
    *,
    save_total_limit: int | None = None,
    best: Path | None = None,
) -> Path:
    """Write checkpoint-<step> collectively (every rank calls this); returns its final path.

    An OSError on any rank (a full disk, a lost mount) removes the .tmp directory and raises the
    same FastalignError on every rank, naming the path and the space needed. `best`: a checkpoint
    the rotation to `save_total_limit` keeps (--load_best_model_at_end).
    """
    rank = dist.get_rank()
    final = checkpoint_dir(output_dir, step)
    tmp = final.with_name(final.name + TMP_SUFFIX)
    problem = None
    if rank == 0:
        try:
            for stale in Path(output_dir).glob(f"checkpoint-*{TMP_SUFFIX}"):
                shutil.rmtree(stale, ignore_errors=True)  # left by a crashed save
            (tmp / "rng").mkdir(parents=True)
        except OSError as err:
            problem = _portable(err)
    problem = broadcast_object(problem)  # also the barrier: the directory exists for every rank

    model_state, optim_state = get_state_dict(model, optimizer, options=state_options(model))
    needed = _tensor_bytes(model_state) + _tensor_bytes(optim_state)
    entries: dict[str, dict[str, int]] = {}
    if problem is None:
        try:
            dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp))
            mine = [f"rng/rank{rank}.json"]
            _write_json(tmp / mine[0], _rng_state())
            if rank == 0:
                _write_json(tmp / SCHEDULER_FILE, scheduler.state_dict())
                _write_json(tmp / STATE_FILE, trainer_state)
                mine += [SCHEDULER_FILE, STATE_FILE, METADATA_FILE]
            mine += [p.name for p in tmp.glob(f"__{rank}_*.distcp")]
            entries = manifest.describe(tmp, mine)
        except (OSError, CheckpointException) as err:
            problem = _portable(_root_cause(err))
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (entries, needed, problem))
    problem = next((p for _, _, p in gathered if p is not None), None)
    if problem is None and rank == 0:
        try:
            manifest.write_manifest(tmp, {name: e for files, _, _ in gathered for name, e in files.items()})
            if final.exists():  # re-saving a step after resuming from an earlier checkpoint
                old = final.with_name(final.name + ".old")
                final.rename(old)
                tmp.rename(final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(final)  # the checkpoint exists from here on, complete
        except OSError as err:
            problem = _portable(err)
    problem = broadcast_object(problem)
    if problem is not None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # gives the space back
        total = sum(n for _, n, _ in gathered)
        raise FastalignError(write_failure("checkpoint", final, problem, total, output_dir))
    if rank == 0:
        rotate_checkpoints(output_dir, save_total_limit, protect=final, best=best)
    barrier()
    return final


def save_model_only_checkpoint(output_dir: str | os.PathLike, step: int, model: nn.Module, config,
                               tokenizer_dir: str, trainer_state: dict[str, Any], *, prefix: str = "",
                               save_total_limit: int | None = None, best: Path | None = None) -> Path:
    """--save_only_model: write checkpoint-<step> as the HF model + a trainer_state.json marked
    `save_only_model` (collective, like save_checkpoint; staged as .tmp and renamed); at most
    `save_total_limit` such checkpoints are kept."""
    final = checkpoint_dir(output_dir, step)
    tmp = final.with_name(final.name + TMP_SUFFIX)
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed save
    barrier()
    export_hf(model, config, tmp, tokenizer_dir, prefix=prefix)  # the same error on every rank
    problem = None
    if dist.get_rank() == 0:
        try:
            _write_json(tmp / STATE_FILE, {**trainer_state, MODEL_ONLY_KEY: True})
            if final.exists():  # re-saving a step after resuming from an earlier checkpoint
                shutil.rmtree(final)
            tmp.rename(final)
        except OSError as err:
            problem = _portable(err)
    problem = broadcast_object(problem)
    if problem is not None:
        raise FastalignError(write_failure("checkpoint", final, problem, None, output_dir))
    if dist.get_rank() == 0:
        rotate_checkpoints(output_dir, save_total_limit, protect=final, model_only=True, best=best)
    barrier()
    return final


def read_trainer_state(path: Path) -> dict[str, Any]:
    """checkpoint-<N>/trainer_state.json, checked field by field (ConfigError naming the field)."""
    return checkpoint_state.read_trainer_state(path)


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler
) -> dict[str, Any]:
    """Restore model and optimizer shards, scheduler and this rank's RNG; returns trainer state.

    Nothing read here can run code (safe_dcp for the shards, JSON for the rest); a refused,
    unreadable or invalid file, or shards of another model (vocabulary, hidden size, family), is a
    ConfigError naming it, raised before anything is restored. Verify the checkpoint first
    (`resolve_resume`).
    """
    trainer_state = read_trainer_state(path)
    scheduler_state = checkpoint_state.read_scheduler_state(path, trainer_state["step"])
    rng_file = path / checkpoint_state.RNG_DIR / f"rank{dist.get_rank()}.json"
    rng_state = checkpoint_state.read_rng_state(rng_file) if rng_file.is_file() else None
    model_state, optim_state = get_state_dict(model, optimizer, options=state_options(model))
    state = {"model": model_state, "optimizer": optim_state}
    try:
        safe_dcp.load(state, path)
    except (CheckpointException, safe_dcp.UnsafeCheckpointError, safe_dcp.StateMismatchError) as err:
        cause = _root_cause(err)
        if not isinstance(cause, FastalignError):  # a verified file DCP still cannot read
            cause = f"its shards cannot be read ({type(cause).__name__}: {str(cause).strip()[:300]})"
        raise ConfigError(f"--resume_from_checkpoint {path}: {cause}") from None
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
        options=state_options(model),
    )
    scheduler.load_state_dict(scheduler_state)
    if rng_state is not None:
        _set_rng_state(rng_state)
    return trainer_state


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
    An OSError (a full disk) is the same FastalignError on every rank, naming the path and size;
    save_pretrained has removed its staging directory by then.
    """
    from fastalign.model import Llama

    state = full_model_state_dict(model, prefix)
    problem = None
    if dist.get_rank() == 0:
        with torch.device("meta"):
            writer = Llama(config)
        try:
            writer.save_pretrained(output_dir, state_dict=state, tokenizer_dir=tokenizer_dir)
        except OSError as err:
            problem = _portable(err)
    problem = broadcast_object(problem)  # also the barrier: the model is complete for every rank
    if problem is not None:
        needed = sum(t.numel() * t.element_size() for t in state.values()) if state else None
        raise FastalignError(write_failure("the model to", Path(output_dir), problem, needed, output_dir))

