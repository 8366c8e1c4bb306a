"""Bytes of live tensor storage in this process, and their peak: the CPU stand-in for
torch.cuda.max_memory_allocated, used to check fastalign.plan against the real trainer.

Every tensor an operator returns goes through the dispatcher, so a TorchDispatchMode sees each
new storage as it is created; a weak reference to it tells when it is freed. The live total is
summed over storages by their *current* size, because FSDP2 frees and re-allocates its gathered
parameters by resizing their storage in place (`storage.resize_(0)`), outside any operator. The
peak is taken after every operator. Unlike peak RSS this counts tensors only: not the Python
heap, the tokenizer, gloo's own buffers or allocator caching, the same scope as CUDA's
"allocated" figure the plan predicts.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorMemory(TorchDispatchMode):
    def __init__(self, existing=()):
        super().__init__()
        self._storages: dict[int, weakref.ref] = {}
        for tensor in existing:
            self._track(tensor)
        self.peak = self.live()

    def _track(self, tensor) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
            return
        if hasattr(tensor, "to_local"):  # DTensor: its local shard holds the memory
            tensor = tensor.to_local()
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in self._storages:
            self._storages[key] = weakref.ref(storage, lambda _, key=key: self._storages.pop(key, None))

    def live(self) -> int:
        total = 0
        for ref in list(self._storages.values()):
            storage = ref()
            if storage is not None:
                total += storage.nbytes()
        return total

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            self._track(tensor)
        self.peak = max(self.peak, self.live())
        return out
