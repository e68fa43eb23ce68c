"""Static caches of the local executor: allocated once per input layout, then reused.

A device's cache holds, for each unit it does not compute, either two slots (the units
the program sends it: a send before the device's forward number r writes slot r % 2, so
it never overwrites what forward r - 1 reads) or one buffer of zeros that is never
written (units it is never sent: only glue whose result no computed unit reads sees
them, as in the reference executor). Its latent is two slots when it receives the
latent, else zeros.
"""
from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree

SLOTS = 2


@dataclass(frozen=True)
class BufferPlan:
    """What each device buffers: units sent to it, units it reads as zeros, latent slots."""

    received: tuple  # per device: units the program sends it
    zeros: tuple  # per device: foreign units it is never sent
    latent: tuple  # per device: receives the latent (host included)


def buffer_plan(plan, program):
    """The buffers `program` needs on each device (the host also receives `emit_reads`)."""
    n, host = program.n_devices, program.host
    comps = plan.partition.components
    received, zeros, latent = [], [], []
    for d in range(n):
        own = set(comps[program.component_of(d)])
        got = set(plan.transfers.receives[d]) - own
        if d == host:  # reuse steps fetch these, own units included (the host never commits)
            got |= set(plan.transfers.emit_reads)
        received.append(tuple(p for p in plan.graph.paths if p in got))
        zeros.append(tuple(p for p in plan.graph.paths if p not in own and p not in got))
        latent.append(d == host or plan.transfers.reads_latent[d])
    return BufferPlan(tuple(received), tuple(zeros), tuple(latent))


def _alloc(example, device):
    """Zeros shaped, typed and strided like `example` (a unit output pytree), on `device`."""
    return pytree.tree_map(
        lambda t: torch.zeros_like(t, device=device) if isinstance(t, torch.Tensor) else t, example)


class DeviceBuffers:
    """One device's static cache and latent for one input layout."""

    def __init__(self, device, received, zeros, reads_latent, examples, latent_example):
        self.device = device
        self.received = {u: [_alloc(examples[u], device) for _ in range(SLOTS)] for u in received}
        fixed = {u: _alloc(examples[u], device) for u in zeros}
        self._caches = [{**fixed, **{u: s[i] for u, s in self.received.items()}} for i in range(SLOTS)]
        self._shapes = {u: _alloc(examples[u], "meta") for u in examples}
        self._full = [None] * SLOTS
        if reads_latent:
            self.latents = [torch.zeros_like(latent_example, device=device) for _ in range(SLOTS)]
        else:
            self.latents = [torch.zeros_like(latent_example, device=device)] * SLOTS

    def cache(self, slot):
        """unit -> the tensor(s) its substitute returns in a forward that reads `slot`."""
        return self._caches[slot]

    def full_cache(self, slot):
        """`cache(slot)` plus zeros for the device's own units: for a forward that computes
        no unit (a reuse step of a denoiser whose output is not a unit's output)."""
        if self._full[slot] is None:
            missing = {u: _alloc(t, self.device) for u, t in self._shapes.items() if u not in self._caches[slot]}
            self._full[slot] = {**missing, **self._caches[slot]}
        return self._full[slot]

    def latent(self, slot):
        return self.latents[slot]

    @property
    def nbytes(self):
        seen, total = set(), 0
        for cache in self._caches:
            for t in pytree.tree_leaves(cache):
                if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    total += t.numel() * t.element_size()
        return total
