"""CUDA graphs keyed by an explicit tuple: (device role, phase, buffer slot, input layout).

The first run of a key is eager (the warm-up outside capture, and its result is used);
the graph is captured right after it on the device's own stream and replayed from then
on. The graphs of one (device, buffer slot) share a memory pool: a graph captured later
may put its outputs where an earlier one keeps temporaries, so a replay of the earlier
graph overwrites them; the executor never reads a forward's outputs once the next
forward of the same slot has started, and the two slots keep apart (a slot-0 replay must
not overwrite slot-1 outputs that are still being sent). Devices never share a pool,
since their streams run at the same time. Before every replay the addresses of the static inputs are compared with
the captured ones (a few integer comparisons): a moved input is an error, never a replay
on freed memory. Inputs are pytree leaves, which may be None (SD3's last joint block
returns `(None, hidden_states)`): only tensors have addresses. Off the GPU, or with
`enabled=False`, every run is eager.
"""
import contextlib
import logging

import torch

from ..profiling.nvtx import RANGES

log = logging.getLogger(__name__)


_EAGER = object()  # a key whose capture failed


def input_addresses(inputs):
    """The addresses of the tensors among `inputs`, in order (other leaves have none)."""
    return [t.data_ptr() for t in inputs if isinstance(t, torch.Tensor)]


class _Captured:
    def __init__(self, graph, outputs, inputs):
        self.graph, self.outputs, self.inputs = graph, outputs, inputs


class GraphCache:
    def __init__(self, enabled=True):
        self.enabled = enabled
        self._graphs = {}
        self._pools = {}
        self.captures = 0
        self.failures = 0  # captures that failed (their keys run eagerly)

    def __len__(self):
        return sum(1 for g in self._graphs.values() if g is not _EAGER)

    def captured(self, key):
        """Whether `key`'s next run replays a graph."""
        entry = self._graphs.get(key)
        return entry is not None and entry is not _EAGER

    def run(self, key, pool, stream, fn, inputs=()):
        """fn() -> outputs (a pytree of tensors), on `stream`. `key` names the graph,
        `pool` its memory pool (one per device and slot); `inputs`: the static tensors fn reads
        (other leaves, such as None, are skipped)."""
        entry = self._graphs.get(key)
        if entry is not None and entry is not _EAGER:
            addresses = input_addresses(inputs)
            if addresses != entry.inputs:
                raise RuntimeError(f"graph {key[:3]}: its static inputs moved since capture; replaying it would "
                                   "read freed memory (an asyncdiff_rt bug: please report it)")
            with torch.cuda.stream(stream):
                entry.graph.replay()
            return entry.outputs
        with (torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()):
            out = fn()
        if self.enabled and stream is not None and entry is None and not torch.is_grad_enabled():
            try:
                self._graphs[key] = self._capture(key, pool, stream, fn, inputs)
            except Exception as e:  # the eager run just worked: the capture alone failed
                log.warning("graph %s: capture failed (%s: %s); this key runs eagerly", key[:3],
                            type(e).__name__, e)
                self._graphs[key] = _EAGER
                self.failures += 1
        return out

    def _capture(self, key, pool, stream, fn, inputs):
        if pool not in self._pools:
            self._pools[pool] = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        log.debug("capturing graph %s", key)
        stream.synchronize()  # the eager run was the warm-up; capture starts on an idle stream
        with torch.cuda.stream(stream), RANGES.range(f"capture dev {key[0]} {key[1]} slot {key[2]}"):
            graph.capture_begin(pool=self._pools[pool])
            try:
                outputs = fn()
            except BaseException:
                with contextlib.suppress(Exception):  # the capture is void; keep the first error
                    graph.capture_end()
                raise
            graph.capture_end()
        self.captures += 1
        return _Captured(graph, outputs, input_addresses(inputs))

    def drop(self, match):
        """Forget the graphs whose key satisfies `match(key)` (e.g. an old input layout)."""
        for key in [k for k in self._graphs if match(k)]:
            del self._graphs[key]

    def clear(self):
        self._graphs.clear()
        self._pools.clear()

