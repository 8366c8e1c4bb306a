"""Token cache entries edited on disk, to check what the reader refuses."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fastalign.data.token_cache import entry_digest


def rewrite(path: Path, *, keep_digest: bool = False, **changes) -> None:
    """Rewrite the entry at `path` with `changes[name](array)` in place of each named array and
    its digest recomputed (so the content checks, not the digest, must catch the change), or the
    stored digest kept with `keep_digest`."""
    with np.load(path, allow_pickle=False) as entry:
        arrays = {name: entry[name] for name in entry.files}
    for name, change in changes.items():
        arrays[name] = change(arrays[name].copy())
    if not keep_digest:
        arrays["digest"] = np.array(entry_digest(path.stem, arrays))
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def setitem(index, value):
    def change(array):
        array[index] = value
        return array
    return change
