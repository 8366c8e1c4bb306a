"""Checkpoint manifests: every file's size and CRC-32, written last, checked before a resume.

Details: docs/design.md section 7.20.
"""

from __future__ import annotations

import json
import os
import stat
import zlib
from pathlib import Path

import torch.distributed as dist

from fastalign.distributed import broadcast_object

MANIFEST_FILE = "manifest.json"
FORMAT = 1
_CHUNK = 16 << 20  # bytes per read while checksumming


def file_entry(path: Path) -> dict[str, int]:
    """{"size", "crc32"} of one file, read in 16 MiB chunks."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return {"size": size, "crc32": crc}


def describe(root: Path, names: list[str]) -> dict[str, dict[str, int]]:
    return {name: file_entry(root / name) for name in names}


def write_manifest(root: Path, files: dict[str, dict[str, int]]) -> None:
    """Write manifest.json (via a temporary name, so a half-written manifest never exists)."""
    tmp = root / (MANIFEST_FILE + ".part")
    with open(tmp, "w") as f:
        json.dump({"format": FORMAT, "files": dict(sorted(files.items()))}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(root / MANIFEST_FILE)


def read_manifest(root: Path) -> tuple[dict[str, dict[str, int]] | None, str | None]:
    """(files, None), or (None, why the manifest is missing or unusable)."""
    path = root / MANIFEST_FILE
    if not path.is_file():
        return None, f"{path} is missing (an unfinished save, or written by a fastalign without manifests)"
    try:
        data = json.loads(path.read_text())
        files = data["files"]
        if data.get("format") != FORMAT or not all(
                isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("crc32"), int)
                for e in files.values()):
            raise ValueError("unexpected layout")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return None, f"{path} is not a readable manifest ({err})"
    return files, None


def check_files(root: Path, files: dict[str, dict[str, int]]) -> str | None:
    """The first listed file that is missing or differs from its entry, as a sentence; else None.
    A read error (EIO on a failing disk, EACCES) is a problem like any other, never an exception:
    the other ranks wait for this one's answer."""
    for name, expected in files.items():
        path = root / name
        try:
            if not path.is_file():
                return f"{path} is missing"
            size = path.stat().st_size
            if size != expected["size"]:
                return f"{path} has {size} bytes, the manifest says {expected['size']} (truncated or overwritten)"
            if file_entry(path)["crc32"] != expected["crc32"]:
                return f"{path} does not match its checksum in {MANIFEST_FILE} (damaged bytes)"
        except OSError as err:
            return f"{path} cannot be read ({err.strerror or err})"
    return None


def _inside(name: str) -> bool:
    """A manifest entry names a file below the checkpoint directory (no absolute path, no ..)."""
    parts = Path(name).parts
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts


# Files that DCP or the resume would read if they appeared after the save (others, e.g. an NFS
# .nfsXXXX placeholder or an editor's backup, are ignored rather than refused).
_READ_SUFFIXES = (".distcp", ".metadata", ".json")


def irregular_entry(root: Path) -> str | None:
    """The first entry below `root` that is a symbolic link or neither a regular file nor a
    directory (a FIFO would block the reader), as a sentence; else None. Never follows a link."""
    try:
        for directory, dirs, files in os.walk(root, followlinks=False, onerror=_raise):
            for name in sorted(dirs + files):
                path = Path(directory) / name
                mode = path.lstat().st_mode
                if stat.S_ISLNK(mode):
                    return (f"{path} is a symbolic link (to {os.readlink(path)}); checkpoint files must be "
                            f"regular files inside {root}")
                if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                    return f"{path} is not a regular file"
    except OSError as err:
        return f"{err.filename or root} cannot be listed ({err.strerror or err})"
    return None


def _raise(err: OSError) -> None:
    raise err


def verify(root: Path, required: tuple[str, ...] = ()) -> str | None:
    """Collective check of a checkpoint directory; every rank gets the same answer.

    Rank 0 refuses symbolic links and special files (`irregular_entry`), reads the manifest and
    checks that it lists `required` and every file present; the listed files are split over the
    ranks (file i on rank i % world size), so a sharded checkpoint is read once in total. Returns
    None when it verifies, else why not (naming the file).
    """
    problem, files = None, None
    if dist.get_rank() == 0:
        problem = irregular_entry(root)
        if problem is None:
            files, problem = read_manifest(root)
        outside = [name for name in files or () if not _inside(name)]
        if outside:
            files, problem = None, f"{root / MANIFEST_FILE} names files outside {root}: {', '.join(outside)}"
        if files is not None:
            missing = [name for name in required if name not in files]
            try:
                present = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                                 if p.is_file() and p.name != MANIFEST_FILE and p.suffix in _READ_SUFFIXES)
            except OSError as err:
                files, problem, present = None, f"{root} cannot be listed ({err.strerror or err})", []
            unlisted = [name for name in present if name not in (files or {})]  # added after the save
            if files is not None and (missing or unlisted):
                problem = f"{root / MANIFEST_FILE} does not list {', '.join(missing + unlisted)}"
    files, problem = broadcast_object((files, problem))
    if problem is not None:
        return problem
    rank, world = dist.get_rank(), dist.get_world_size()
    names = sorted(files)
    mine = {name: files[name] for name in names[rank::world]}
    found: list[str | None] = [None] * world
    dist.all_gather_object(found, check_files(root, mine))
    return next((p for p in found if p is not None), None)
