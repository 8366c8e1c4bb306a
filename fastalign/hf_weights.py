"""Weight files in Hugging Face layout: read tensor by tensor (or row range), write safetensors.

Reading (`CheckpointReader`) understands the four layouts transformers writes or has written:

    model.safetensors                                  one file
    model.safetensors.index.json + model-0000i-of-n    sharded
    pytorch_model.bin                                  legacy pickle (torch.save)
    pytorch_model.bin.index.json + pytorch_model-...   legacy, sharded

Safetensors files are read with plain positioned reads straight into the destination tensor: no
mmap (whose resident file pages would count as process memory), no whole-file buffer, each byte
read once, and only the asked rows when a caller wants a slice (an FSDP rank reading its shard).
Legacy .bin files are opened with `torch.load(mmap=True, weights_only=True)`, one file at a time,
so at most one file's pages are mapped while its weights are copied out.

Names: a reader speaks fastalign's parameter names, which are the HF names without the leading
"model." ("model.layers.0.mlp.up_proj.weight" -> "layers.0.mlp.up_proj.weight"; "lm_head.weight"
stays), for every family alike (Qwen2's "...self_attn.q_proj.bias", Qwen3's "...self_attn.q_norm.weight").
1-D weights (biases, norms) are read by row ranges like the others when FSDP shards them. Rotary `inv_freq` buffers that old conversions stored alongside the weights are skipped.
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

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
# Linux returns at most this many bytes from one read(); larger tensors take several.
_MAX_READ = 1 << 30
# Rows staged at a time when a weight changes dtype or device, or comes from a mapped .bin.
_CHUNK_BYTES = 16 << 20
_MADV_PAGEOUT = 21  # Linux >= 5.4; older kernels refuse it (EINVAL), harmlessly
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
    dtype: torch.dtype
    shape: torch.Size
    offset: int  # absolute byte offset of the tensor's data in `file`


class CheckpointReader:
    """Read the weights of an HF model directory one tensor (or one row range) at a time.

    names() -> our parameter names in file order; shape(name); dtype(name) (as stored);
    read(name, dtype=None, rows=None) -> a new CPU tensor; read_into(name, out, rows=None) fills
    `out` (any device/dtype) with at most one temporary CPU tensor in the stored dtype.
    """

    def __init__(self, path):
        self.path = Path(path)
        self._safetensors: dict[str, _SafetensorsEntry] = {}
        self._bin_files: dict[str, Path] = {}  # our name -> .bin file holding it
        self._bin_cache: tuple[Path, dict[str, torch.Tensor]] | None = None  # the one open .bin
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
        # Weights that change dtype or device, and .bin weights, go through in chunks of rows, so
        # host memory holds one chunk more than the model rather than one more copy of a weight.
        step, n_rows = max(1, _CHUNK_BYTES // max(1, row_bytes)), rows_view.shape[0]
        chunks = [(a, min(a + step, n_rows)) for a in range(0, n_rows, step)]
        with torch.no_grad():
            if not self._safetensors:
                source = self._bin_tensor(name)
                source = source if source.dim() else source.unsqueeze(0)
                for a, b in chunks:
                    rows_view[a:b].copy_(source[start + a:start + b])
                    _release_mapped_pages(source[start + a:start + b])
                return
            entry = self._entry(name)
            first_byte = entry.offset + start * row_bytes
            if out.device.type == "cpu" and out.dtype == entry.dtype and out.is_contiguous():
                _pread_into(entry.file, first_byte, out)  # straight into the parameter
                return
            for a, b in chunks:
                block = torch.empty((b - a, *rows_view.shape[1:]), dtype=entry.dtype)
                _pread_into(entry.file, first_byte + a * row_bytes, block)
                rows_view[a:b].copy_(block)

    # -- safetensors -------------------------------------------------------------------------

    def _entry(self, name: str) -> _SafetensorsEntry:
        try:
            return self._safetensors[name]
        except KeyError:
            raise ModelError(f"{self.path}: no weight named {hf_name(name)}") from None

    def _scan_safetensors(self, file: Path) -> None:
        """Record dtype, shape and data offset of every tensor from the file's JSON header."""
        try:
            with open(file, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_len))
        except (OSError, struct.error, ValueError) as err:
            raise ModelError(f"{file}: not a readable safetensors file ({err})") from None
        data_start = 8 + header_len
        for hf, info in header.items():
            if hf == "__metadata__" or _is_skipped(hf):
                continue
            if info["dtype"] not in _SAFETENSORS_DTYPES:
                raise ModelError(f"{file}: weight {hf} has dtype {info['dtype']}, which fastalign cannot load")
            self._safetensors[our_name(hf)] = _SafetensorsEntry(
                file, _SAFETENSORS_DTYPES[info["dtype"]], torch.Size(info["shape"]),
                data_start + info["data_offsets"][0])

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


def _pread_into(file: Path, offset: int, out: torch.Tensor) -> None:
    """Fill contiguous CPU `out` with bytes of `file` from `offset`, without intermediate buffers."""
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    fd = os.open(file, os.O_RDONLY)
    try:
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:done + _MAX_READ]], offset + done)
            if n == 0:
                raise ModelError(f"{file}: ends before the data of a weight (truncated download?)")
            done += n
    finally:
        os.close(fd)


def _release_mapped_pages(t: torch.Tensor) -> None:
    """Drop the resident pages of a tensor that lives in a read-only file mapping (torch.load
    mmap=True, MAP_PRIVATE, never written): once copied into the model they only inflate RSS, and
    an access after this re-reads them from the file. Only pages wholly inside the tensor."""
    if _libc is None:
        return
    begin = t.data_ptr()
    end = begin + t.numel() * t.element_size()
    first, last = -(-begin // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        _libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_PAGEOUT)


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
