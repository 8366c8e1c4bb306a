"""Checkpoints that cannot hurt (in-process, one-rank gloo group): nothing a resume reads can run
code, damaged checkpoints are found before they are loaded, resuming at an older step starts a
new branch, and a full disk is a clean error that leaves nothing behind."""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import pickle
from pathlib import Path

import pytest
import torch
from helpers.checkpoints import make_checkpoint, reseal, saved_checkpoints, sharded_toy
from torch.distributed.checkpoint import filesystem as dcp_filesystem

from fastalign import checkpoint as ckpt
from fastalign import manifest, safe_dcp
from fastalign.errors import ConfigError, FastalignError


class Payload:
    """Unpickling this creates `marker`: what a malicious checkpoint file would do with os.system."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def plant_in_shard_entry(path: Path, payload: bytes) -> str:
    """Point the optimizer's first non-tensor entry (param_groups.0.lr) at `payload`, appended to
    the shard; returns the shard's name."""
    with open(path / ".metadata", "rb") as f:
        metadata = pickle.load(f)  # our own file, written just now
    index = next(i for i in metadata.storage_data if i.fqn == "optimizer.param_groups.0.lr")
    info = metadata.storage_data[index]
    shard = path / info.relative_path
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(payload)
    metadata.storage_data[index] = type(info)(info.relative_path, offset, len(payload))
    with open(path / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    return info.relative_path


# File a resume reads -> how to plant a payload in it (returns the name the error must give).
def _plant_metadata(path, payload):
    (path / ".metadata").write_bytes(pickle.dumps(payload))
    return ".metadata"


def _plant_shard(path, payload):
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return plant_in_shard_entry(path, buffer.getvalue())


def _plant_small_state(name):
    def plant(path, payload):
        target = next(path.glob(name))  # scheduler / this rank's RNG state, whatever its format
        buffer = io.BytesIO()
        torch.save(payload, buffer)  # what torch.load(weights_only=False) would have run
        target.write_bytes(buffer.getvalue())
        return target.name
    return plant


@pytest.mark.parametrize("plant", [_plant_metadata, _plant_shard, _plant_small_state("scheduler.*"),
                                   _plant_small_state("rng/rank0.*"), _plant_small_state("trainer_state.json")],
                         ids=["metadata", "shard-entry", "scheduler", "rng", "trainer-state"])
def test_payload_in_any_file_a_resume_reads_runs_nothing(tmp_path, process_group, plant):
    (path,) = saved_checkpoints(tmp_path / "out", steps=(1,))
    marker = tmp_path / "pwned"
    name = plant(path, Payload(marker))
    reseal(path)  # the manifest verifies: only the safe readers stand in the way
    fresh, fresh_opt, fresh_sched = sharded_toy(1)
    with pytest.raises(ConfigError) as err:
        ckpt.load_checkpoint(ckpt.resolve_resume(str(path), tmp_path / "out"), fresh, fresh_opt, fresh_sched)
    assert not marker.exists(), "a checkpoint file ran code"
    assert name in str(err.value)


def test_restricted_unpickler_refuses_globals_outside_the_allow_list(tmp_path):
    bad = tmp_path / ".metadata"
    bad.write_bytes(pickle.dumps(print))  # a harmless builtin, still not DCP metadata
    with pytest.raises(safe_dcp.UnsafeCheckpointError, match=r"builtins\.print"):
        safe_dcp.read_metadata_file(bad)


def test_metadata_naming_a_file_outside_the_checkpoint_is_refused(tmp_path, process_group):
    (path,) = saved_checkpoints(tmp_path / "out", steps=(1,))
    with open(path / ".metadata", "rb") as f:
        metadata = pickle.load(f)
    index, info = next(iter(metadata.storage_data.items()))
    metadata.storage_data[index] = type(info)("../../secret", info.offset, info.length)
    with open(path / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    with pytest.raises(safe_dcp.UnsafeCheckpointError, match="outside its directory"):
        safe_dcp.read_metadata_file(path / ".metadata")


def damage(path: Path, how: str) -> str:
    shard = path / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    if how == "truncated":
        shard.write_bytes(data[: len(data) // 2])
    elif how == "overwritten":  # a block of other bytes, same size (a torn or misdirected write)
        data[8192:16384] = os.urandom(8192)
        shard.write_bytes(data)
    elif how == "bit-flip":
        data[len(data) // 2] ^= 0x10
        shard.write_bytes(data)
    elif how == "no-manifest":  # an unfinished save, or a checkpoint from before manifests
        (path / manifest.MANIFEST_FILE).unlink()
        return manifest.MANIFEST_FILE
    elif how == "extra-shard":  # a file the save did not write (DCP would read it if named)
        (path / "__1_0.distcp").write_bytes(data)
        return "__1_0.distcp"
    return "__0_0.distcp"


@pytest.mark.parametrize("how", ["truncated", "overwritten", "bit-flip", "no-manifest", "extra-shard"])
def test_damaged_newest_checkpoint_auto_takes_the_previous_explicit_is_an_error(
        tmp_path, process_group, how, caplog):
    out = tmp_path / "out"
    first, second = saved_checkpoints(out)
    name = damage(second, how)
    with caplog.at_level(logging.WARNING, logger="fastalign.checkpoint"):
        assert ckpt.resolve_resume("auto", out) == first
    assert "skipping" in caplog.text and str(second) in caplog.text and name in caplog.text
    with pytest.raises(ConfigError) as err:
        ckpt.resolve_resume(str(second), out)
    assert str(second) in str(err.value) and name in str(err.value)
    # The one that verifies loads and is bit-exact to what was saved.
    fresh, fresh_opt, fresh_sched = sharded_toy(1)
    assert ckpt.load_checkpoint(first, fresh, fresh_opt, fresh_sched)["step"] == 1


def test_auto_with_no_checkpoint_that_verifies_is_an_error(tmp_path, process_group):
    out = tmp_path / "out"
    (only,) = saved_checkpoints(out, steps=(1,))
    damage(only, "bit-flip")
    with pytest.raises(ConfigError, match="no checkpoint .* verifies.*__0_0.distcp"):
        ckpt.resolve_resume("auto", out)


def test_resuming_an_older_step_moves_the_abandoned_branch_aside(tmp_path, process_group):
    for step in (5, 10, 15, 20):
        make_checkpoint(tmp_path, step)
    make_checkpoint(tmp_path, 25, suffix=".tmp")
    moved = ckpt.start_branch(tmp_path, 15, tmp_path / "checkpoint-15")
    assert moved.name.startswith(ckpt.ABANDONED_PREFIX)
    assert sorted(p.name for p in moved.iterdir()) == ["checkpoint-20", "checkpoint-25.tmp"]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-5", "checkpoint-10", "checkpoint-15"]
    assert ckpt.start_branch(tmp_path, 15, tmp_path / "checkpoint-15") is None  # nothing later: nothing moves
    # The new branch's next save is the newest; a limit of 1 keeps it, not an older step.
    new = make_checkpoint(tmp_path, 16)
    ckpt.rotate_checkpoints(tmp_path, 1, protect=new)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-16"]
    assert ckpt.resolve_resume("auto", tmp_path) == new


def test_rotation_never_deletes_the_checkpoint_just_written(tmp_path):
    make_checkpoint(tmp_path, 20)
    just_written = make_checkpoint(tmp_path, 16)  # lower step than a foreign leftover
    ckpt.rotate_checkpoints(tmp_path, 1, protect=just_written)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-16"]


class FillsUp(io.RawIOBase):
    """A file that takes `room` bytes, then fails as a full disk does."""

    def __init__(self, file, path, room: int):
        self.file, self.path, self.room = file, str(path), room

    def writable(self):
        return True

    def seekable(self):
        return self.file.seekable()

    def tell(self):
        return self.file.tell()

    def seek(self, *args):
        return self.file.seek(*args)

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)
        self.room -= len(data)
        return self.file.write(data)


def test_full_disk_during_a_checkpoint_is_a_clean_error_and_leaves_no_tmp(tmp_path, process_group, monkeypatch):
    out = tmp_path / "out"
    (good,) = saved_checkpoints(out, steps=(1,))
    model, optimizer, scheduler = sharded_toy(0)
    real = dcp_filesystem.FileSystem.create_stream

    @contextlib.contextmanager
    def full_disk(self, path, mode):
        with real(self, path, mode) as f:
            yield FillsUp(f, path, room=4000) if "w" in mode else f

    monkeypatch.setattr(dcp_filesystem.FileSystem, "create_stream", full_disk)
    with pytest.raises(FastalignError) as err:
        ckpt.save_checkpoint(out, 2, model, optimizer, scheduler, {"step": 2})
    message = str(err.value)
    assert "No space left on device" in message and "checkpoint-2.tmp/__0_0.distcp" in message
    assert "it needs about" in message and "are free there" in message
    assert f"The last complete checkpoint is {good}" in message
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1"]  # the .tmp is gone


def test_full_disk_during_the_export_is_a_clean_error(tmp_path, process_group, monkeypatch):
    from fastalign import hf_io
    from fastalign.model import Llama
    from fastalign.tiny import build_tiny_llama

    source = build_tiny_llama(tmp_path / "base", ["hello world"] * 4, vocab_size=300, hidden_size=16,
                              num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32,
                              max_position_embeddings=32)
    llama = Llama.from_pretrained(source)
    out = tmp_path / "out"
    out.mkdir()

    def full_disk(path, tensors):
        Path(path).write_bytes(b"\0" * 100)  # part of the file made it
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(hf_io, "write_safetensors", full_disk)
    with pytest.raises(FastalignError) as err:
        ckpt.export_hf(llama, llama.config, out, str(source))
    message = str(err.value)
    assert "writing the model to" in message and str(out) in message
    assert "No space left on device" in message and "model.safetensors" in message
    assert "it needs about" in message and "No complete checkpoint exists" in message
    assert list(out.iterdir()) == []  # no staging directory, no partial file


def test_next_start_removes_what_killed_saves_and_exports_left(tmp_path, process_group):
    make_checkpoint(tmp_path, 4)
    make_checkpoint(tmp_path, 6, suffix=".tmp")
    (tmp_path / ".tmp-save-4242").mkdir()  # export killed while writing
    (tmp_path / ".tmp-save-4242" / "model.safetensors").write_bytes(b"\0" * 10)
    (tmp_path / ".checkpoint-8.tmp.tmp-4243").mkdir()  # --save_only_model checkpoint killed while written
    make_checkpoint(tmp_path, 3, suffix=".old")  # killed between the two renames of a re-save
    ckpt.prepare_output_dir(tmp_path, fresh_start=False, overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-4"]
    assert ckpt.resolve_resume("auto", tmp_path).name == "checkpoint-4"


def test_convert_refuses_to_overwrite_its_input(tmp_path, capsys):
    from fastalign import convert

    source = tmp_path / "pairs.jsonl"
    text = '{"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."}\n'
    source.write_text(text)
    link, hard_link = tmp_path / "link.jsonl", tmp_path / "hard.jsonl"
    link.symlink_to(source)
    os.link(source, hard_link)
    for output in (source, tmp_path / "." / "pairs.jsonl", link, hard_link):
        with pytest.raises(ConfigError, match="is the --input file"):
            convert.main(["--format", "pairs", "--input", str(source), "--output", str(output)])
    assert source.read_text() == text
