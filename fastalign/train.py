"""Stable Alignment training: the entry point.

    python -m fastalign.train --model_name_or_path DIR --data_path FILE --output_dir OUT ...
    torchrun --nproc_per_node=8 -m fastalign.train ...        (same flags as train_alignment.py)

A plain `python -m` run is a one-rank process group, so checkpointing (torch.distributed.
checkpoint) and the metrics reduction are the same at any world size. The flags are in
fastalign/config.py, the loop in fastalign/trainer.py (docs/design.md).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch.distributed as dist

from fastalign import checkpoint as ckpt
from fastalign import distributed as fdist
from fastalign.cli import exit_process, run_main
from fastalign.config import parse_args
from fastalign.console import setup_logging
from fastalign.errors import FastalignError
from fastalign.run_lock import hold_output_dir
from fastalign.trainer import Trainer

_PEER_FAILURE_HINTS = ("connection reset", "connection closed", "broken pipe", "socket timeout",
                       "timed out", "nccl", "gloo")


def is_peer_failure(err: BaseException) -> bool:
    """A collective failed because another process died or hung (not a bug in this one)."""
    if isinstance(err, dist.DistError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(hint in text for hint in _PEER_FAILURE_HINTS)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    if config.local_rank >= 0:  # torch.distributed.launch without --use-env passes only the flag
        os.environ.setdefault("LOCAL_RANK", str(config.local_rank))
    env = fdist.init_distributed(timeout_minutes=config.ddp_timeout / 60,
                                 cpu_collectives=fdist.parse_fsdp(config.fsdp).offload)
    setup_logging(env.is_main)
    trainer = Trainer(config, env)
    lock = hold_output_dir(config.output_dir)  # one run per directory, before anything in it changes
    try:
        trainer.setup()
        with trainer.stop:
            trainer.train()
    except (RuntimeError, dist.DistError) as err:
        if env.world_size == 1 or not is_peer_failure(err):
            raise
        last = ckpt.latest_checkpoint(config.output_dir)
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FastalignError(
            f"rank {env.rank}: a collective with the other processes failed, most likely because "
            f"another rank died (see its own error above/below; torchrun names it): {first_line}. "
            + (f"The last complete checkpoint is {last}; " if last else "No checkpoint was completed; ")
            + "restart with --resume_from_checkpoint auto.") from err
    finally:
        # On every exit, stopped and failed runs too: the process may end through os._exit
        # (cli.exit_process), which runs no atexit handler, so wandb/TensorBoard finish here.
        if trainer.metrics is not None:
            trainer.metrics.close()
        lock.release()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    exit_process(run_main(main))
