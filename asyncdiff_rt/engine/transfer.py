"""TransferEngine: one API for moving tensors between devices on streams.

Backends (chosen once, up front, by `asyncdiff_rt.backend`):
  `_C`    the extension: a whole batch in one call (cudaMemcpyPeerAsync /
          cudaMemcpyAsync), raw CUDA events;
  `cupy`  CuPy's runtime copies (when CuPy is installed and `_C` is not usable);
  `torch` `copy_(non_blocking=True)` under the given stream;
  `cpu`   plain copies, events that are always complete.
`cupy` and `torch` both use `torch.cuda.Event`. Every backend checks the same
arguments and computes the same bytes; only speed differs.

Memory stays with the caller. With `record_streams=True` (the default) each
CUDA tensor is marked as used by the copy stream, so torch's caching allocator
does not hand its memory out again before the copy is done; executors with
static buffers can turn this off.
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Iterable, Sequence

import torch

from ..backend import choose_backend

log = logging.getLogger(__name__)

Pair = tuple[torch.Tensor, torch.Tensor]  # (dst, src)


def _check_pairs(pairs: Iterable[Pair]) -> list[Pair]:
    out = []
    for i, pair in enumerate(pairs):
        if len(pair) != 2:
            raise TypeError(f"pair {i}: expected (dst, src) tensors, got {type(pair).__name__}")
        dst, src = pair
        if not (isinstance(dst, torch.Tensor) and isinstance(src, torch.Tensor)):
            raise TypeError(f"pair {i}: expected (dst, src) tensors, got {type(pair).__name__}")
        if dst.dtype != src.dtype or dst.shape != src.shape:
            raise ValueError(f"pair {i}: dst {tuple(dst.shape)} {dst.dtype} does not match "
                             f"src {tuple(src.shape)} {src.dtype}")
        if not (dst.is_contiguous() and src.is_contiguous()):
            raise ValueError(f"pair {i}: tensors must be contiguous (call .contiguous() on the source, "
                             "copy into a contiguous buffer)")
        if dst.numel():
            out.append((dst, src))
    return out


def _stream_for(pairs: Sequence[Pair], stream):
    """The given stream, else the current stream of the first CUDA destination."""
    if stream is not None or not pairs or pairs[0][0].device.type != "cuda":
        return stream
    return torch.cuda.current_stream(pairs[0][0].device)


def _legacy_guard(stream):
    """Handle 0 is the legacy default stream of whichever device is current, so
    make the stream's device current for it; real streams carry their device."""
    return torch.cuda.device(stream.device) if stream.cuda_stream == 0 else contextlib.nullcontext()


class _HostEvent:
    """Event for host-ordered work: complete once recorded; times by the host clock."""

    def __init__(self):
        self.t = None

    def record(self, stream=None):
        self.t = time.perf_counter()

    def wait(self, stream=None):
        pass

    def query(self):
        return True

    def synchronize(self):
        pass

    def elapsed_ms(self, end: "_HostEvent") -> float:
        if self.t is None or end.t is None:
            raise RuntimeError("both events must be recorded before elapsed_ms")
        return (end.t - self.t) * 1e3


class _TorchEvent:
    def __init__(self, device: torch.device, timing: bool):
        self.device = device
        self.ev = torch.cuda.Event(enable_timing=timing)

    def _stream(self, stream):
        return stream if stream is not None else torch.cuda.current_stream(self.device)

    def record(self, stream=None):
        self.ev.record(self._stream(stream))

    def wait(self, stream=None):
        self.ev.wait(self._stream(stream))

    def query(self):
        return self.ev.query()

    def synchronize(self):
        self.ev.synchronize()

    def elapsed_ms(self, end: "_TorchEvent") -> float:
        return self.ev.elapsed_time(end.ev)


class _CEvent(_TorchEvent):
    """A raw CUDA event owned by the extension; destroyed with this object."""

    def __init__(self, C, device: torch.device, timing: bool):
        self.C, self.device = C, device
        self.handle = C.event_create(device.index, timing=timing)

    def record(self, stream=None):
        s = self._stream(stream)
        with _legacy_guard(s):
            self.C.event_record(self.handle, s.cuda_stream)

    def wait(self, stream=None):
        s = self._stream(stream)
        with _legacy_guard(s):
            self.C.stream_wait_event(s.cuda_stream, self.handle)

    def query(self):
        return self.C.event_query(self.handle)

    def synchronize(self):
        self.C.event_synchronize(self.handle)

    def elapsed_ms(self, end: "_CEvent") -> float:
        return self.C.event_elapsed_ms(self.handle, end.handle)

    def __del__(self):
        handle, self.handle = getattr(self, "handle", 0), 0
        if handle:
            try:
                self.C.event_destroy(handle)
            except Exception:  # interpreter shutdown or a dead context: nothing left to free
                pass


class TransferEngine:
    """Copies batches of (dst, src) tensor pairs on a stream and orders them with events.

    backend: None picks the best available (see `asyncdiff_rt.backend_info()`);
    a name forces it and raises RuntimeError, with the reason, if unavailable.
    devices: CUDA devices that will exchange tensors; peer access is enabled
    between every pair that supports it.
    """

    def __init__(self, backend: str | None = None, devices: Sequence = (), record_streams: bool = True):
        self.backend, self.reason = choose_backend(backend)
        self.record_streams = record_streams
        log.info("transfer backend %s: %s", self.backend, self.reason)
        self._C = self._cupy = None
        if self.backend == "_C":
            from .. import _C

            self._C = _C
        elif self.backend == "cupy":
            import cupy

            self._cupy = cupy
        self.enable_peer_access(devices)

    def __repr__(self):
        return f"TransferEngine(backend={self.backend!r})"

    def enable_peer_access(self, devices: Sequence) -> None:
        idx = [torch.device(d).index if not isinstance(d, int) else d for d in devices]
        if self.backend not in ("_C", "cupy") or len(idx) < 2:
            return  # torch enables peer access itself on the first cross-device copy
        for a in idx:
            for b in idx:
                if a == b:
                    continue
                if self._C is not None:
                    if self._C.can_access_peer(a, b):
                        self._C.enable_peer_access(a, b)
                else:
                    rt = self._cupy.cuda.runtime
                    if rt.deviceCanAccessPeer(a, b):
                        with self._cupy.cuda.Device(a):
                            try:
                                rt.deviceEnablePeerAccess(b)
                            except self._cupy.cuda.runtime.CUDARuntimeError as e:
                                if "AlreadyEnabled" not in str(e):
                                    raise

    def copy(self, pairs: Iterable[Pair], stream: torch.cuda.Stream | None = None) -> None:
        """Issue dst <- src for every pair, in order, on `stream` (default: the
        current stream of the first destination's device). Returns at once on
        GPUs; record an event after it to know when the data has landed."""
        pairs = _check_pairs(pairs)
        if not pairs:
            return
        stream = _stream_for(pairs, stream)
        if self.backend == "cpu" or stream is None:
            for dst, src in pairs:
                dst.copy_(src)
            return
        if self.record_streams:
            for dst, src in pairs:
                for t in (dst, src):
                    if t.is_cuda:
                        t.record_stream(stream)
        if self.backend == "torch":
            with torch.cuda.stream(stream):
                for dst, src in pairs:
                    dst.copy_(src, non_blocking=True)
            return
        entries = []
        for dst, src in pairs:
            if not (dst.is_cuda and src.is_cuda):
                raise ValueError(f"the {self.backend} backend copies between CUDA tensors; got "
                                 f"{dst.device} <- {src.device} (use backend='torch' for host copies)")
            entries.append((dst.data_ptr(), dst.device.index, src.data_ptr(), src.device.index,
                            dst.numel() * dst.element_size()))
        if self._C is not None:
            with _legacy_guard(stream):
                self._C.copy_batch(entries, stream.cuda_stream)
        else:
            self._cupy_copy(entries, stream)

    def _cupy_copy(self, entries, stream) -> None:
        rt = self._cupy.cuda.runtime
        with self._cupy.cuda.Device(stream.device.index):
            for dst, dst_dev, src, src_dev, n in entries:
                if dst_dev == src_dev:
                    rt.memcpyAsync(dst, src, n, rt.memcpyDeviceToDevice, stream.cuda_stream)
                else:
                    rt.memcpyPeerAsync(dst, dst_dev, src, src_dev, n, stream.cuda_stream)

    def event(self, device, timing: bool = False):
        """A new event on `device` with record(stream), wait(stream), query(),
        synchronize() and elapsed_ms(end); stream=None means the current stream."""
        device = torch.device(device)
        if device.type != "cuda" or self.backend == "cpu":
            return _HostEvent()
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if self._C is not None:
            return _CEvent(self._C, device, timing)
        return _TorchEvent(device, timing)
