"""Weight files in Hugging Face layout: read tensor by tensor (or row range), write safetensors.

Details: docs/design.md section 7.16.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import mmap
import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from fastalign.errors import ModelError

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILE_GLOBS = ("model*.safetensors", SAFETENSORS_INDEX, "pytorch_model*.bin", BIN_INDEX)

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_SAFETENSORS_CODES = {dtype: code for code, dtype in _SAFETENSORS_DTYPES.items()}
# Rows copied (and their mapped pages then dropped) at a time: the most host memory a load holds
# above the model itself.
_CHUNK_BYTES = 4 << 20
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def our_name(hf_name: str) -> str:
    return hf_name.removeprefix("model.")


def hf_name(name: str) -> str:
    return name if name == "lm_head.weight" else f"model.{name}"


def _is_skipped(name: str) -> bool:
    """Buffers some checkpoints carry that are not weights (recomputed from the config)."""
    return name.endswith("rotary_emb.inv_freq")


@dataclass(frozen=True)
class _SafetensorsEntry:
    file: Path
    hf_name: str  # the name in the file
    dtype: torch.dtype
    shape: torch.Size


class CheckpointReader:
    """Read the weights of an HF model directory one tensor (or one row range) at a time.

    names() -> our parameter names in file order; shape(name); dtype(name) (as stored);
    read(name, dtype=None, rows=None) -> a new CPU tensor; read_into(name, out, rows=None) fills
    `out` (any device/dtype) chunk by chunk from the file's mapping, with no temporary tensor.
    """

    def __init__(self, path):
        self.path = Path(path)
        self._safetensors: dict[str, _SafetensorsEntry] = {}
        self._bin_files: dict[str, Path] = {}  # our name -> .bin file holding it
        self._bin_cache: tuple[Path, dict[str, torch.Tensor]] | None = None  # the one open .bin
        self._open_safetensors: tuple[Path, safe_open] | None = None  # the one open safetensors file
        if (self.path / SAFETENSORS_INDEX).is_file():
            files = self._index_files(self.path / SAFETENSORS_INDEX)
            for file in dict.fromkeys(files.values()):
                self._scan_safetensors(file)
            self._check_index(files, self._safetensors)
        elif (self.path / SAFETENSORS_SINGLE).is_file():
            self._scan_safetensors(self.path / SAFETENSORS_SINGLE)
        elif (self.path / BIN_INDEX).is_file():
            self._bin_files = self._index_files(self.path / BIN_INDEX)
        elif (self.path / BIN_SINGLE).is_file():
            file = self.path / BIN_SINGLE
            self._bin_cache = (file, self._load_bin(file))
            self._bin_files = {name: file for name in self._bin_cache[1]}
        else:
            raise ModelError(f"{self.path}: no weights found (looked for {SAFETENSORS_SINGLE}, "
                             f"{SAFETENSORS_INDEX}, {BIN_SINGLE}, {BIN_INDEX})")

    @property
    def format(self) -> str:
        return "safetensors" if self._safetensors else "bin"

    def names(self) -> list[str]:
        return list(self._safetensors or self._bin_files)

    def shape(self, name: str) -> torch.Size:
        if self._safetensors:
            return self._entry(name).shape
        return self._bin_tensor(name).shape

    def dtype(self, name: str) -> torch.dtype:
        if self._safetensors:
            return self._entry(name).dtype
        return self._bin_tensor(name).dtype

    def read(self, name: str, dtype: torch.dtype | None = None, rows: slice | None = None) -> torch.Tensor:
        """The weight (or its rows `rows` along dim 0) as a CPU tensor in `dtype` (default: as stored)."""
        shape = list(self.shape(name))
        if rows is not None:
            start, stop = _row_range(rows, shape[0], name)
            shape[0] = stop - start
        out = torch.empty(shape, dtype=dtype or self.dtype(name))
        self.read_into(name, out, rows)
        return out

    def read_into(self, name: str, out: torch.Tensor, rows: slice | None = None) -> None:
        """Copy the weight (or rows `rows`) into `out`, converting dtype and device as needed."""
        shape = list(self.shape(name))
        start, stop = _row_range(rows, shape[0], name) if rows is not None else (0, shape[0] if shape else 0)
        if shape:
            shape[0] = stop - start
        if list(out.shape) != shape:
            raise ModelError(f"{self.path}: weight {hf_name(name)} has shape {shape} "
                             f"(rows {start}:{stop}) but the model expects {list(out.shape)}")
        rows_view = out if out.dim() else out.unsqueeze(0)  # dim 0 = rows, also for a scalar
        row_bytes = math.prod(rows_view.shape[1:]) * self.dtype(name).itemsize
        # Chunks of rows: host memory holds one mapped chunk more than the model, never a whole
        # weight's or file's pages (a Llama-3 8B embedding alone is 1 GB in bf16).
        step, n_rows = max(1, _CHUNK_BYTES // max(1, row_bytes)), rows_view.shape[0]
        with torch.no_grad():
            for a in range(0, n_rows, step):
                b = min(a + step, n_rows)
                source = self._mapped_rows(name, start + a, start + b)
                rows_view[a:b].copy_(source)  # converts dtype and device as needed
                _release_mapped_pages(source)

    def _mapped_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of a weight (a scalar as one row) in its stored dtype: a view of a
        read-only file mapping, whose pages are read when touched."""
        if not self._safetensors:
            source = self._bin_tensor(name)
            return (source if source.dim() else source.unsqueeze(0))[start:stop]
        entry = self._entry(name)
        handle = self._safetensors_handle(entry.file)
        with _refusing_damage(entry.file):
            if not entry.shape:
                return handle.get_tensor(entry.hf_name).unsqueeze(0)
            return handle.get_slice(entry.hf_name)[start:stop]

    # -- safetensors -------------------------------------------------------------------------

    def _entry(self, name: str) -> _SafetensorsEntry:
        try:
            return self._safetensors[name]
        except KeyError:
            raise ModelError(f"{self.path}: no weight named {hf_name(name)}") from None

    def _safetensors_handle(self, file: Path):
        """The library's handle of `file` (one file open at a time: sharded weights are read file by file)."""
        if self._open_safetensors is None or self._open_safetensors[0] != file:
            self._open_safetensors = None  # let the previous file's mapping go first
            with _refusing_damage(file):
                self._open_safetensors = (file, safe_open(file, framework="pt", device="cpu"))
        return self._open_safetensors[1]

    def _scan_safetensors(self, file: Path) -> None:
        """Record dtype and shape of every tensor, in the order of their data in the file."""
        handle = self._safetensors_handle(file)
        with _refusing_damage(file):
            # offset_keys: file order, so a full load reads the file front to back (older
            # safetensors releases lack it; their keys() are sorted by name)
            names = getattr(handle, "offset_keys", handle.keys)()
            slices = {hf: handle.get_slice(hf) for hf in names if not _is_skipped(hf)}
        for hf, info in slices.items():
            if info.get_dtype() not in _SAFETENSORS_DTYPES:
                raise ModelError(f"{file}: weight {hf} has dtype {info.get_dtype()}, which fastalign cannot load")
            self._safetensors[our_name(hf)] = _SafetensorsEntry(
                file, hf, _SAFETENSORS_DTYPES[info.get_dtype()], torch.Size(info.get_shape()))

    # -- legacy .bin -------------------------------------------------------------------------

    def _bin_tensor(self, name: str) -> torch.Tensor:
        try:
            file = self._bin_files[name]
        except KeyError:
            raise ModelError(f"{self.path}: no weight named {hf_name(name)}") from None
        if self._bin_cache is None or self._bin_cache[0] != file:
            self._bin_cache = None  # drop the previous file's mapping before opening the next
            self._bin_cache = (file, self._load_bin(file))
        try:
            return self._bin_cache[1][name]
        except KeyError:
            raise ModelError(f"{file}: the index lists {hf_name(name)} here but the file lacks it") from None

    def _load_bin(self, file: Path) -> dict[str, torch.Tensor]:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # pickle, zip and weights_only refusals all land here
            raise ModelError(f"{file}: cannot load this PyTorch weight file safely "
                             f"(torch.load weights_only=True, mmap=True): {err}") from None
        if not isinstance(state, dict):
            raise ModelError(f"{file}: expected a dict of tensors, found {type(state).__name__}")
        return {our_name(k): v for k, v in state.items() if not _is_skipped(k)}

    # -- shared ------------------------------------------------------------------------------

    def _index_files(self, index: Path) -> dict[str, Path]:
        """our name -> shard file, from an HF `*.index.json`."""
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as err:
            raise ModelError(f"{index}: not a valid weight index ({err})") from None
        files = {our_name(k): self.path / v for k, v in weight_map.items() if not _is_skipped(k)}
        for file in set(files.values()):
            if not file.is_file():
                raise ModelError(f"{index}: lists the shard {file.name}, which does not exist")
        return files

    def _check_index(self, files: dict[str, Path], found: dict[str, _SafetensorsEntry]) -> None:
        for name, file in files.items():
            if name not in found or found[name].file != file:
                raise ModelError(f"{self.path}: the index places {hf_name(name)} in {file.name}, "
                                 f"which does not contain it")


def _row_range(rows: slice, length: int, name: str) -> tuple[int, int]:
    start, stop, step = rows.indices(length)
    if step != 1:
        raise ValueError(f"rows must be a contiguous slice, got {rows} for {name}")
    return start, max(start, stop)


@contextlib.contextmanager
def _refusing_damage(file: Path):
    """Turn the safetensors library's refusal of a damaged or hostile file into a ModelError naming it."""
    try:
        yield
    except SafetensorError as err:
        raise ModelError(f"{file}: not a valid safetensors file ({err}); "
                         f"the file is damaged or was not written by safetensors (re-download it)") from None
    except OSError as err:
        raise ModelError(f"{file}: cannot read this safetensors file ({err})") from None


def _release_mapped_pages(t: torch.Tensor) -> None:
    """Drop the resident pages of a tensor that lives in a file mapping that is never written
    (safetensors' safe_open and torch.load mmap=True map the file MAP_PRIVATE): once copied into
    the model they only inflate RSS, and an access after this re-reads them from the file.
    MADV_DONTNEED unmaps them from this process at once and leaves the page cache alone
    (MADV_PAGEOUT would skip pages still dirty from a recent write of the file and leave them
    resident). Only pages wholly inside the tensor."""
    if _libc is None:
        return
    begin = t.data_ptr()
    end = begin + t.numel() * t.element_size()
    first, last = -(-begin // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        _libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), mmap.MADV_DONTNEED)


def plan_shards(sizes: Iterable[tuple[str, int]], max_shard_size: int) -> list[list[str]]:
    """Group names into shards of at most `max_shard_size` bytes, in order (a bigger tensor alone)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > max_shard_size:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def write_safetensors(file: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write `tensors` (any device) as one safetensors file, one tensor in host memory at a time."""
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _SAFETENSORS_CODES:
            raise ValueError(f"cannot write {name}: dtype {t.dtype} has no safetensors code")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_CODES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # tensor data starts 8-byte aligned, as safetensors does
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for t in tensors.values():
            if t.numel():
                f.write(memoryview(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()))
