"""`fastalign.train.main` with one thing changed for a test, each a `main(argv) -> int` for
helpers/ranks.py's `run_ranks` (forked ranks on CPU, real processes with CUDA): a counted
tokenizer, a limit on file size or address space set first, the trainer set up and asked one thing.

Each changes only its own process (a forked rank or a subprocess), never the test's.
"""

from __future__ import annotations

import os
import resource
import signal
from collections.abc import Sequence


def counting_tokenizations(argv: Sequence[str]) -> int:
    """The trainer, printing `TOKENIZE rank=<RANK>` on stdout at each tokenize_records call."""
    import fastalign.data as data
    from fastalign import train

    original = data.tokenize_records

    def counted(*args, **kwargs):
        print(f"TOKENIZE rank={os.environ.get('RANK')}", flush=True)
        return original(*args, **kwargs)

    data.tokenize_records = counted
    try:
        return train.main(argv)
    finally:
        data.tokenize_records = original


def with_file_size_limit(argv: Sequence[str]) -> int:
    """`LIMIT TRAIN_FLAGS...`: writes past LIMIT bytes fail with EFBIG (an OSError, as a full
    disk's ENOSPC), then the trainer."""
    from fastalign import train

    limit = int(argv[0])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return train.main(argv[1:])


def mapped_bytes() -> int:
    """This process's address space now (VmSize)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def with_address_space_headroom(argv: Sequence[str]) -> int:
    """`HEADROOM TRAIN_FLAGS...`: the address space may grow by HEADROOM bytes over what the
    process maps when it starts training (a forked rank inherits the test process's mappings,
    a fresh one its imports'); prints `ADDRESS_SPACE_LIMIT <bytes>`, then the trainer."""
    from fastalign import train

    limit = mapped_bytes() + int(argv[0])
    print(f"ADDRESS_SPACE_LIMIT {limit}", flush=True)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return train.main(argv[1:])


def print_seed_compat(argv: Sequence[str]) -> int:
    """The trainer set up from the flags, printing `seed_compat <its batcher's seed_compat>`."""
    import torch.distributed as dist

    from fastalign import distributed as fdist
    from fastalign.config import parse_args
    from fastalign.trainer import Trainer

    trainer = Trainer(parse_args(argv), fdist.init_distributed())
    trainer.setup()
    print("seed_compat", trainer.batcher.seed_compat)
    dist.destroy_process_group()
    return 0
