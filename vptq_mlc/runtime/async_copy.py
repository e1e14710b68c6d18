"""Copies between the host and a GPU that do not wait for the GPU's queued work.

TVM's `copyfrom` and `numpy()` synchronise the device's stream after every copy, so an upload of the sampler's
per-row parameters, or the read of the sampled tokens, makes the host wait for every kernel queued before it.
Overlapped decoding (the engine queues step t+1 before it reads step t's tokens) needs both without that wait:

- uploads are staged in page-locked host buffers and copied by a stream-ordered copy;
- a read copies the device tensors into page-locked buffers and then a one-word flag after them; copies on one
  stream complete in order, so once the host sees the flag the data is there too.

A staging or read buffer is used again only after the read that followed its last use has arrived (`_Slot.fence`),
so a copy still queued never sees its buffer rewritten. Only CUDA has page-locked buffers here; on other devices
(the CPU, where kernels finish before their call returns) every copy is immediate and `asynchronous` is False.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tvm
import tvm_ffi
from tvm.runtime import _ffi_api

KDL_CUDA, KDL_CUDA_HOST = 2, 3
RING = 3  # buffers per shape: the engine keeps at most two reads outstanding
SPIN_BEFORE_SYNC_S = 200e-6  # a read not arrived by then: synchronise the stream instead of polling on
_ONE_WORD = tvm_ffi.Shape([1])


def host_view(tensor: Any, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """A numpy array over a host-resident TVM tensor's memory (no copy)."""
    count = int(np.prod(shape)) if shape else 1
    raw = (ctypes.c_byte * (count * np.dtype(dtype).itemsize)).from_address(tensor.data_ptr())
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def element_view(tensor: Any, index: int) -> Any:
    """A one-element device view of `tensor`'s flat element `index` (its dtype)."""
    itemsize = tvm.DataType(str(tensor.dtype)).bits // 8
    return _ffi_api.TVMTensorCreateView(tensor, _ONE_WORD, tensor.dtype, index * itemsize)


@dataclass
class _Slot:
    """A page-locked buffer (or set of them) and the read that must arrive before it is written again."""

    tensors: list[Any]
    views: list[np.ndarray]
    fence: PendingRead | None = None


@dataclass
class PendingRead:
    """Device tensors on their way into host arrays; `wait()` returns them (views valid until the slot's reuse)."""

    link: HostLink
    arrays: list[np.ndarray]
    flag: np.ndarray | None = None  # None: the copy was immediate
    arrived: bool = False
    guarded: list[_Slot] = field(default_factory=list)  # slots this read fences

    def wait(self) -> list[np.ndarray]:
        if not self.arrived:
            if self.flag is not None:
                self.link.spin_until(self.flag)
            self.arrived = True
            for slot in self.guarded:
                if slot.fence is self:
                    slot.fence = None
        return self.arrays


class HostLink:
    """Stream-ordered uploads and reads for one device (see the module docstring)."""

    def __init__(self, device: tvm.runtime.Device, staging: tvm.runtime.Device | None = None) -> None:
        """`staging`: where the host-side buffers live (default: CUDA's page-locked memory on a CUDA device, none
        elsewhere); the CPU device runs the same buffer bookkeeping with immediate copies (tests)."""
        self.device = device
        if staging is None and device.dlpack_device_type() == KDL_CUDA:
            staging = tvm.runtime.Device(KDL_CUDA_HOST, device.index)
        self.asynchronous = staging is not None
        self._pinned = staging
        self._staging: dict[tuple[Any, ...], list[_Slot]] = {}
        self._turn: dict[tuple[Any, ...], int] = {}
        self._unfenced: list[_Slot] = []  # staging slots written since the last read was queued
        self._one = None
        if self.asynchronous:
            self._one = tvm.runtime.tensor(np.ones(1, dtype=np.int32), device)

    def _slot(self, key: tuple[Any, ...], shapes: list[tuple[tuple[int, ...], str]]) -> _Slot:
        """The next ring buffer for `key`, waiting for its fence first."""
        ring = self._staging.get(key)
        if ring is None:
            ring = self._staging[key] = []
            for _ in range(RING):
                tensors = [tvm.runtime.empty(s, d, self._pinned) for s, d in shapes]
                ring.append(_Slot(tensors, [host_view(t, d, s) for t, (s, d) in zip(tensors, shapes)]))
        turn = self._turn.get(key, 0)
        self._turn[key] = (turn + 1) % RING
        slot = ring[turn]
        if slot.fence is not None:
            slot.fence.wait()
        return slot

    def upload(self, dst: Any, src: np.ndarray) -> None:
        """Copy `src` into the device tensor `dst` in stream order (the host does not wait)."""
        if not self.asynchronous:
            dst.copyfrom(src)
            return
        slot = self._slot(("up", src.shape, str(src.dtype)), [(tuple(src.shape), str(src.dtype))])
        slot.views[0][...] = src
        _ffi_api.TVMTensorCopyFromTo(slot.tensors[0], dst)
        self._unfenced.append(slot)

    def read(self, tensors: list[Any]) -> PendingRead:
        """Queue copies of device `tensors` to the host; the returned read's `wait()` gives them as arrays."""
        if not self.asynchronous:
            return PendingRead(self, [t.numpy() for t in tensors], arrived=True)
        shapes = [(tuple(int(d) for d in t.shape), str(t.dtype)) for t in tensors]
        slot = self._slot(("down", *shapes), [*shapes, ((1,), "int32")])
        flag = slot.views[-1]
        flag[0] = 0
        for src, dst in zip(tensors, slot.tensors):
            _ffi_api.TVMTensorCopyFromTo(src, dst)
        _ffi_api.TVMTensorCopyFromTo(self._one, slot.tensors[-1])
        pending = PendingRead(self, slot.views[:-1], flag, guarded=[slot, *self._unfenced])
        for s in pending.guarded:
            s.fence = pending
        self._unfenced = []
        return pending

    def synchronized(self) -> None:
        """The stream was synchronised (a blocking read): every queued copy has run, so no buffer needs a fence."""
        for ring in self._staging.values():
            for slot in ring:
                if slot.fence is not None:
                    slot.fence.arrived = True
                    slot.fence = None
        self._unfenced = []

    def spin_until(self, flag: np.ndarray) -> None:
        """Poll `flag` (set by a queued copy) for a short while, then synchronise the stream, which releases the
        interpreter to other threads while it waits (and raises a device error, if any)."""
        deadline = time.perf_counter() + SPIN_BEFORE_SYNC_S
        while flag[0] == 0:
            if time.perf_counter() > deadline:
                self.device.sync()
                if flag[0] == 0:
                    raise RuntimeError("a device-to-host copy did not arrive after the stream was synchronised")
                return
            time.sleep(0)
