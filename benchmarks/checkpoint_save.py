"""What a checkpoint's manifest costs: save time with and without the checksums, and the resume check.

Target (reliability issue): the manifest's CRC-32 must not dominate the save of a large shard.
One process (a one-rank gloo group) holds a model of `--size_mib` MiB of fp32 parameters and its
AdamW state (after one step: 3x that on disk). Each trial times `save_checkpoint` (DCP write,
small JSON state, manifest, rename), then `manifest.describe` over the same files (the checksum
part of the save, re-read from the page cache as the save reads them), then `verify_checkpoint`
(what a resume checks before loading). The checkpoint is deleted between trials.

    python benchmarks/checkpoint_save.py                       # 1024 MiB of parameters, 2 trials
    python benchmarks/checkpoint_save.py --preset smoke --out_dir /tmp/x   # 4 MiB: the script runs
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.lib.machine import machine_summary
from benchmarks.lib.results import result_header, results_path, write_json
from benchmarks.lib.tables import format_table

PRESETS = {"default": 1024, "smoke": 4}  # MiB of fp32 parameters


def measure(size_mib: int, trials: int, scratch: Path) -> list[dict]:
    import torch
    import torch.distributed as dist
    from torch import nn

    from fastalign import checkpoint as ckpt
    from fastalign import manifest

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    side = int((size_mib * 2**20 / 4) ** 0.5)  # one square fp32 weight of ~size_mib MiB
    model = nn.Linear(side, side, bias=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model.weight.grad = torch.ones_like(model.weight)
    optimizer.step()  # exp_avg, exp_avg_sq: the checkpoint holds 3x the parameters
    scheduler.step()  # at step 1 like the trainer state below (a resume checks that they agree)
    rows = []
    for trial in range(trials):
        out = scratch / f"trial{trial}"
        started = time.perf_counter()
        path = ckpt.save_checkpoint(out, 1, model, optimizer, scheduler, {"step": 1, "epoch": 0, "step_in_epoch": 1})
        save_s = time.perf_counter() - started
        names = [p.relative_to(path).as_posix() for p in path.rglob("*")
                 if p.is_file() and p.name != manifest.MANIFEST_FILE]
        started = time.perf_counter()
        files = manifest.describe(path, names)
        checksum_s = time.perf_counter() - started
        started = time.perf_counter()
        problem = ckpt.verify_checkpoint(path)
        verify_s = time.perf_counter() - started
        assert problem is None, problem
        size = sum(e["size"] for e in files.values())
        rows.append({"trial": trial, "bytes": size, "save_s": save_s, "checksum_s": checksum_s,
                     "checksum_share": checksum_s / save_s, "checksum_mib_s": size / 2**20 / checksum_s,
                     "verify_s": verify_s})
        shutil.rmtree(out)
    dist.destroy_process_group()
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--size_mib", type=int, default=None, help="MiB of fp32 parameters (default: the preset's)")
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--scratch", type=Path, default=None,
                        help="where checkpoints are written (default: a temp dir)")
    parser.add_argument("--out_dir", type=Path, default=None, help="JSON result directory (default benchmarks/results)")
    args = parser.parse_args(argv)
    size = args.size_mib or PRESETS[args.preset]
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        rows = measure(size, args.trials, Path(scratch))
    preset = f"{args.preset}-{size}mib"
    payload = result_header("checkpoint_save", preset, "cpu")
    payload["results"] = rows
    print(machine_summary(payload["machine"]))
    print(format_table(["trial", "checkpoint MiB", "save s", "of which checksum s", "share", "CRC MiB/s", "verify s"],
                       [[r["trial"], r["bytes"] / 2**20, r["save_s"], r["checksum_s"],
                         f"{100 * r['checksum_share']:.0f}%", r["checksum_mib_s"], r["verify_s"]] for r in rows]))
    print("wrote", write_json(results_path("checkpoint_save", preset, "cpu", args.out_dir), payload))
    return 0


if __name__ == "__main__":
    from fastalign.cli import exit_process

    exit_process(main())
