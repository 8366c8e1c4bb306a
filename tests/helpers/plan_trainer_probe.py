"""One rank of the real trainer, measured for tests/e2e/test_plan_e2e.py (gloo): `main([OUT_JSON,
<fastalign.train flags>])` on each rank, through helpers/ranks.py's `run_ranks` (forked ranks, or
torchrun with CUDA), or as a script:

    torchrun --nproc_per_node=N tests/helpers/plan_trainer_probe.py OUT_JSON <fastalign.train flags>

Sets the trainer up from the flags, runs one optimizer step (which creates the AdamW state), then
reports rank by rank: the bytes of its parameter shards, its gradient shards (after one more
micro-batch's backward) and its optimizer state, each summed over distinct storages; and the
peak of live tensor memory (tests/helpers/live_memory.py) during the second optimizer step, with the
tokens, target tokens and gathered key/value rows (shared prefix: kv_index) of that step's
largest micro-batch and the step's micro-batch count.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from live_memory import LiveTensorMemory  # noqa: E402

from fastalign import distributed as fdist  # noqa: E402
from fastalign.alignment_model import run_batch  # noqa: E402
from fastalign.config import parse_args  # noqa: E402
from fastalign.metrics import Window  # noqa: E402
from fastalign.trainer import Trainer  # noqa: E402


def storage_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for tensor in tensors:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        storage = local.untyped_storage()
        seen[storage._cdata] = storage.nbytes()
    return sum(seen.values())


def mask_elements(batch) -> int:
    """Query x key pairs of the segments whose keys are more than their own (shared prefix)."""
    if batch.cu_seqlens_k is None:
        return 0
    queries, keys = batch.cu_seqlens.diff().long(), batch.cu_seqlens_k.diff().long()
    return int((queries * keys)[queries != keys].sum())


def main(argv: Sequence[str] | None = None) -> int:
    out_path, *flags = sys.argv[1:] if argv is None else argv
    torch.set_num_threads(1)
    args = parse_args(flags)
    env = fdist.init_distributed()
    trainer = Trainer(args, env)
    trainer.setup()
    steps = trainer.batcher.iter_steps(0)
    trainer._train_step(next(steps), Window.new(env.device))  # creates the AdamW state
    params = list(trainer.model.parameters())
    states = [v for s in trainer.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    step = next(steps)
    with LiveTensorMemory(params + states) as memory:
        trainer._train_step(step, Window.new(env.device))
    largest = max(step.micro_batches, key=lambda b: b.num_tokens)
    batch = step.micro_batches[0]
    run_batch(trainer.model, batch)["loss"].backward()
    result = {"rank": env.rank, "param_bytes": storage_bytes(params),
              "grad_bytes": storage_bytes(p.grad for p in params if p.grad is not None),
              "optimizer_bytes": storage_bytes(states), "peak_bytes": memory.peak,
              "tokens": largest.num_tokens, "target_tokens": largest.num_target_tokens,
              "key_tokens": 0 if largest.kv_index is None else largest.kv_index.numel(),
              "mask_elements": mask_elements(largest),
              "micro_batches": len(step.micro_batches),
              "fsdp": isinstance(trainer.model, torch.distributed.fsdp.FSDPModule)}
    gathered = [None] * env.world_size
    dist.all_gather_object(gathered, result)
    if env.rank == 0:
        Path(out_path).write_text(json.dumps(gathered))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from fastalign.cli import exit_process

    exit_process(main())
