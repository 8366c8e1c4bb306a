"""Loading torch.distributed.checkpoint (DCP) directories without running code from them.

Details: docs/design.md section 7.29.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import pathlib
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import ReadItem

from fastalign.errors import FastalignError

METADATA_FILE = ".metadata"


class UnsafeCheckpointError(FastalignError):
    """A checkpoint file holds a pickled object outside the allow-list (it could run code)."""


class StateMismatchError(FastalignError):
    """The checkpoint's tensors are not those of the state to load (another model)."""


def _metadata_class(name: str):
    """A dataclass or enum defined in torch.distributed.checkpoint.metadata (Metadata,
    TensorStorageMetadata, ChunkStorageMetadata, MetadataIndex, ...), else None."""
    value = getattr(dcp_metadata, name, None)
    if isinstance(value, type) and value.__module__ == dcp_metadata.__name__ and (
            dataclasses.is_dataclass(value) or issubclass(value, enum.Enum)):
        return value
    return None


# (module, name) pairs `.metadata` of torch 2.13 refers to besides the metadata module's classes
# (found by recording find_class while unpickling FSDP2 and plain-module checkpoints).
_ALLOWED = {
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,  # name -> torch.layout
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,  # file, offset, length
    ("pathlib", "PosixPath"): pathlib.PosixPath,  # StorageMeta.checkpoint_id (a path, never opened)
    ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata; any other global (os.system, builtins.eval, ...) is refused."""

    def __init__(self, file, *, source: Path):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        if module == dcp_metadata.__name__ and _metadata_class(name) is not None:
            return _metadata_class(name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)  # torch.float32, torch.bfloat16, ...
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise UnsafeCheckpointError(
            f"{self.source}: refers to {module}.{name}, which is not part of a DCP checkpoint's "
            "metadata; refusing to load it (unpickling it could run code)")


def read_metadata_file(path: Path) -> Metadata:
    """`.metadata` through the restricted unpickler; UnsafeCheckpointError names the file."""
    with open(path, "rb") as f:
        try:
            metadata = RestrictedUnpickler(f, source=path).load()
        except UnsafeCheckpointError:
            raise
        except Exception as err:  # truncated / not a pickle
            raise UnsafeCheckpointError(f"{path}: not a readable DCP metadata file ({err})") from None
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"{path}: holds a {type(metadata).__name__}, not DCP Metadata")
    storage = metadata.storage_data if isinstance(metadata.storage_data, dict) else {}
    for info in storage.values():  # shard files: plain names inside the checkpoint directory
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise UnsafeCheckpointError(f"{path}: names a shard outside its directory ({name!r})")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose `.metadata` goes through RestrictedUnpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self._get_metadata_path(kwargs.get("rank")))
        metadata = read_metadata_file(path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner reading non-tensor entries with weights_only=True."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            shard = self.metadata.storage_data[read_item.storage_index].relative_path
            # torch's message opens with advice to retry with weights_only=False: keep only the why
            why = next((line for line in str(err).splitlines() if "GLOBAL" in line), "not plain data")
            raise UnsafeCheckpointError(
                f"{shard}: entry {read_item.dest_index.fqn} refused by torch.load(weights_only=True), "
                f"it could run code: {why}") from None
        if self.flatten_state_dict:  # as DefaultLoadPlanner.load_bytes
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def mismatches(state: dict[str, Any], metadata: Metadata) -> list[str]:
    """Each tensor of `state` (nested; DTensors by their global shape) that the checkpoint lacks,
    holds as a non-tensor or holds with another shape, as "name: checkpoint [a, b], this model
    [c, d]"; then each tensor of the checkpoint that `state` lacks, among the top-level parts that
    `state` asks for (a load of {"model": ...} alone does not miss the optimizer's tensors)."""
    flat, _ = flatten_state_dict(state)
    parts = tuple(f"{key}." for key in state)
    saved = metadata.state_dict_metadata
    found = []
    for name, value in flat.items():
        if not isinstance(value, torch.Tensor):
            continue
        entry = saved.get(name)
        if entry is None:
            found.append(f"{name}: not in the checkpoint, this model has {list(value.shape)}")
        elif not isinstance(entry, TensorStorageMetadata):
            found.append(f"{name}: not a tensor in the checkpoint, this model has {list(value.shape)}")
        elif tuple(entry.size) != tuple(value.shape):
            found.append(f"{name}: checkpoint {list(entry.size)}, this model {list(value.shape)}")
    found += [f"{name}: checkpoint {list(entry.size)}, not in this model" for name, entry in saved.items()
              if isinstance(entry, TensorStorageMetadata) and name.startswith(parts) and name not in flat]
    return found


def load(state: dict[str, Any], path: Path) -> None:
    """dcp.load(state, path) in place, through the safe reader and planner. `.metadata` is read
    once up front (DCP would log a refusal inside its own reader as a traceback and retry) and
    matched with `state` (StateMismatchError naming the first tensors that differ)."""
    metadata = read_metadata_file(Path(path) / METADATA_FILE)
    differing = mismatches(state, metadata)
    if differing:
        shown = "; ".join(differing[:4]) + (f"; and {len(differing) - 4} more" if len(differing) > 4 else "")
        raise StateMismatchError(
            f"{path} holds the tensors of another model (vocabulary, hidden size or family): {shown}. "
            "Resume with the --model_name_or_path the checkpoint was trained from")
    dcp.load(state, storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner())
