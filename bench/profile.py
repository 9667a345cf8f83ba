"""Profilers that a runner wraps around a method's step. The method never knows it is measured."""

from __future__ import annotations

import threading
from typing import Iterable

import torch

MIB = float(2**20)


class _Saved:
    """What the pack hook leaves in the graph: the tensor plus a note to the meter when it is freed."""

    __slots__ = ("tensor", "meter", "key", "__weakref__")

    def __init__(self, tensor: torch.Tensor, meter: "SavedTensorsMeter", key: int) -> None:
        self.tensor, self.meter, self.key = tensor, meter, key

    def __del__(self) -> None:
        self.meter._release(self.key)


class SavedTensorsMeter:
    """Bytes autograd saves for backward, measured with ``torch.autograd.graph.saved_tensors_hooks``.

    Counts each storage once however often it is saved, and excludes the storages of the tensors
    given as ``exclude`` (the model's parameters: they are alive anyway). A saved tensor counts from
    the moment it is packed until its graph node is freed, so ``peak_bytes`` is the largest amount
    held at once: for BPTT the whole graph, for an online method one step's graph.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._live: dict[int, list[int]] = {}
        self._lock = threading.Lock()
        self.current_bytes = 0
        self.peak_bytes = 0
        self.packed = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def reset_peak(self) -> None:
        with self._lock:
            self.peak_bytes = self.current_bytes

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / MIB

    def __enter__(self) -> "SavedTensorsMeter":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    def _pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self._exclude or key == 0:
            return t
        with self._lock:
            self.packed += 1
            entry = self._live.get(key)
            if entry is None:
                self._live[key] = [1, storage.nbytes()]
                self.current_bytes += storage.nbytes()
                if self.current_bytes > self.peak_bytes:
                    self.peak_bytes = self.current_bytes
            else:
                entry[0] += 1
        return _Saved(t, self, key)

    @staticmethod
    def _unpack(packed):
        return packed.tensor if isinstance(packed, _Saved) else packed

    def _release(self, key: int) -> None:
        with self._lock:
            entry = self._live.get(key)
            if entry is None:
                return
            entry[0] -= 1
            if entry[0] == 0:
                del self._live[key]
                self.current_bytes -= entry[1]
