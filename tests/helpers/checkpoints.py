"""Checkpoints for the in-process checkpoint tests: stand-in directories with real manifests, and a
sharded FSDP2 toy (model, AdamW, LambdaLR) saved for real. They need the `process_group` fixture."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from fastalign import checkpoint as ckpt
from fastalign import manifest


def make_checkpoint(root, step: int, complete: bool = True, suffix: str = ""):
    """A stand-in checkpoint directory (its files are placeholders; their manifest is real)."""
    path = root / f"checkpoint-{step}{suffix}"
    path.mkdir(parents=True)
    (path / ".metadata").write_bytes(b"x")
    if complete:
        (path / ckpt.STATE_FILE).write_text(json.dumps({"step": step, "epoch": 0, "step_in_epoch": step}))
        (path / ckpt.SCHEDULER_FILE).write_text(json.dumps({"base_lrs": [1e-3], "last_epoch": step}))
        names = [ckpt.STATE_FILE, ckpt.SCHEDULER_FILE, ".metadata"]
        manifest.write_manifest(path, manifest.describe(path, names))
    return path


def sharded_toy(seed: int, hidden: int = 8, extra_layer: bool = False):
    """A two-layer FSDP2 toy with AdamW and a LambdaLR; `hidden` and `extra_layer` make another
    model's shapes and parameter names."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 3),
                          *([nn.Linear(3, 3)] if extra_layer else []))
    mesh = init_device_mesh("cpu", (1,))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return model, optimizer, scheduler


def train_steps(model, optimizer, scheduler, steps: int) -> None:
    for _ in range(steps):
        model(torch.randn(5, 4)).square().mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def saved_checkpoints(root: Path, steps=(1, 2)):
    model, optimizer, scheduler = sharded_toy(0)
    for step in steps:
        train_steps(model, optimizer, scheduler, 1)
        ckpt.save_checkpoint(root, step, model, optimizer, scheduler,
                             {"step": step, "epoch": 0, "step_in_epoch": step})
    return [ckpt.checkpoint_dir(root, step) for step in steps]


def reseal(path: Path) -> None:
    """Rewrite the manifest for the files as they are now: an attacker ships a consistent one."""
    files = [p.relative_to(path).as_posix() for p in path.rglob("*")
             if p.is_file() and p.name != manifest.MANIFEST_FILE]
    manifest.write_manifest(path, manifest.describe(path, files))


def edit_json(path: Path, name: str, change) -> None:
    """Apply `change` to the JSON of `path / name` and reseal the manifest (the file then passes
    the checksums: only the field checks stand in the way)."""
    value = json.loads((path / name).read_text())
    (path / name).write_text(json.dumps(change(value)))
    reseal(path)


def setting(key, value):
    def change(state):
        state[key] = value
        return state
    return change


def link_shard(path: Path, elsewhere: Path) -> str:
    """The shard replaced by a link to a non-checkpoint file (its bytes sealed in the manifest)."""
    elsewhere.write_bytes(b"not a checkpoint shard")
    (path / "__0_0.distcp").unlink()
    (path / "__0_0.distcp").symlink_to(elsewhere)
    return "__0_0.distcp"
