"""`fastalign.train` with FSDP2's gradient all-reduces counted, for the test that gradient
accumulation all-reduces once per optimizer step, not once per micro-batch.

`main([PREFIX, *train args])` trains and writes the number of all-reduces this rank's FSDP2 issued
to PREFIX.rank<RANK>; `helpers.ranks.run_ranks` runs it on the ranks.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch.distributed as dist

from fastalign import train  # imported here: forked ranks inherit it instead of each importing it


def main(argv: Sequence[str] | None = None) -> int:
    prefix, *train_args = sys.argv[1:] if argv is None else argv
    calls = []
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(*args, **kwargs):  # FSDP2's gradient all-reduce calls dist.all_reduce
        if "_fsdp" in sys._getframe(1).f_code.co_filename:
            calls.append(1)
        return real_all_reduce(*args, **kwargs)

    dist.all_reduce = counting_all_reduce
    try:
        status = train.main(train_args)
    finally:
        dist.all_reduce = real_all_reduce
    Path(f"{prefix}.rank{os.environ['RANK']}").write_text(str(len(calls)))
    return status
