"""Reading what a wandb offline run wrote, without wandb's service: its records from the run file."""

from __future__ import annotations

import struct
from pathlib import Path


def wandb_records(run_file: Path):
    """The protobuf records of a wandb offline run file (LevelDB log format: 7-byte file header,
    32 KiB blocks of records with a crc32/length/type header; type 1 whole, 2-4 first/middle/last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw, pos, block, part = run_file.read_bytes(), 7, 32768, b""
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            pos += (block - pos % block) % block
            continue
        part += raw[pos:pos + length]
        pos += length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(part)
            yield record
            part = b""
