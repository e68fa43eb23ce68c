"""The distributed executor: one process per device of the program, on torch.distributed.

Every rank runs the same pipeline call (SPMD): its own text encoder, scheduler and
decoder, so every rank holds the same latent x_k at step k and no latent ever moves.
Rank r is device r of the program and holds the weights of its own units plus the
shared modules. Per step a rank receives the cached unit outputs the program sends it
(one message per sending rank: wire.py), runs its forward, and posts the sends of the
next step before it waits for the step's prediction, which the host sends to every
rank (a few KB), so every rank returns the same prediction and the same images.

A warm-up forward runs on every rank in lockstep: each runs the glue, computes its own
units and sends their outputs to the others as they are made, so every rank sees every
unit's output once (and sizes its buffers from them); each commit stays with its owner.

Transports of the per-step messages (transports.py): NCCL between GPUs (every exchange
is one batch of point-to-point operations) or, on one node, CUDA IPC mailboxes; gloo on
the CPU or shared-memory mailboxes (mailbox.py). On a GPU, forwards replay CUDA graphs
per rank, on a stream of the rank's own. Failures (peers.py): a rank that raises, dies
or hangs makes every other rank raise within the timeout, with a message naming it.
"""
import logging
from collections import OrderedDict

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree

from ..profiling.nvtx import RANGES
from ..schedule import Send
from . import wire
from .agreement import GenerationMismatch, differences, generation_digest
from .call import timestep_table, tree_leaves
from .graphs import GraphCache
from .local import _moved, _on
from .mailbox import Mailbox, Route
from .peers import PeerFailure, Peers
from .process_group import pinning, rank_device
from .replica import Replica, call_layout, replicate, weight_bytes
from .stages import EAGER
from .stats import ExecutorStats
from .step_loop import StepLoop
from .transports import choose_transport

log = logging.getLogger(__name__)
MAX_LAYOUTS = 3  # input layouts whose receive buffers and graphs are kept


class _Wires:
    """One input layout's messages: per (peer, units) a byte buffer, and the cache views
    (received units, zeros for the rest) that this rank's forwards read."""

    def __init__(self, skeletons, device):
        self.skeletons = skeletons  # unit -> wire.Skeleton of its output
        self.device = device
        self.inbox, self.outbox = {}, {}  # (peer, units) -> (skeleton, buffer, views)
        self.cache, self.full_cache = {}, {}
        self.mailbox = None  # ipc and shm: the slots and counters of these messages

    def message(self, box, peer, units):
        key = (peer, units)
        if key not in box:
            skeleton = wire.describe({u: wire.zeros(self.skeletons[u], "meta") for u in units})
            buffer = wire.empty_buffer(skeleton, self.device)
            box[key] = (skeleton, buffer, wire.views(skeleton, buffer))
        return box[key]


class DistributedExecutor(StepLoop):
    name = "distributed"
    # a sibling (another call role) has its own caches, graphs and generation state on these:
    # this one's process group, replica and stream
    shared_by_roles = ("plan", "peers", "rank", "transport", "_links", "device", "replica", "_stream", "stats",
                       "timeline", "_use_graphs")

    def __init__(self, denoiser, plan, group, devices=None, timeout_s=30.0, graphs=True, transport=None,
                 stages=EAGER):
        self.plan = plan
        self.peers = Peers(group, timeout_s)
        self.rank = self.peers.rank
        if self.peers.size != plan.n_devices:
            raise ValueError(f"the process group has {self.peers.size} ranks; this plan runs on {plan.n_devices}")
        self.device = rank_device(devices, denoiser, self.rank)
        self._check_same_plan(transport)
        self.peers.clear_failures()
        self.transport = choose_transport(self.peers, self.device, transport)
        self._links = self.transport.links() if self.transport.mailbox else None
        paths, own = plan.graph.paths, plan.partition.components[min(self.rank, plan.n_components - 1)]
        module = replicate(denoiser, [p for p in paths if p not in own], self.device, keep=plan.graph.read_outside)
        self.replica = Replica(module, paths, own, self.device, plan.transfers.skipped_arguments(self.rank), stages)
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.stats = ExecutorStats(plan.n_devices)
        self.timeline = None
        self._use_graphs = graphs and self._stream is not None
        self._shares = None
        self._init_role()

    @property
    def _range_suffix(self):
        return f" (rank {self.rank})"

    def _init_role(self):
        super()._init_role()
        self.graphs = GraphCache(enabled=self._use_graphs)
        self._layouts = OrderedDict()  # (input layout, messages) -> _Wires, least recently used first
        self._loose = None  # the _Wires of a call without a layout key (made again each generation)
        self._posted = {}  # step -> the exchange posted for it
        # input layout -> {unit: wire.Skeleton}: the layouts of warm-up outputs already sent. Every rank
        # must agree on it (it decides whether a layout message comes first), so it is kept and
        # evicted by the sequence of generations alone, which is the same on every rank.
        self._skeletons = OrderedDict()

    def describe(self):
        """What handle.stats() adds for this executor."""
        return {"rank": self.rank, "world": self.peers.size, **self.transport.describe(), "device": str(self.device),
                "weight_bytes_this_rank": weight_bytes(self.replica.module),
                "cpu_affinity": pinning() or "not pinned (GPU ranks, or a group joined outside parallelize)"}

    def _check_same_plan(self, transport):
        """Every rank must run the same program on the same split: compare at setup."""
        plan = self.plan
        mine = (plan.n_components, plan.stride, plan.warmup, transport, [list(c) for c in plan.partition.components])
        everyone = [None] * self.peers.size
        dist.all_gather_object(everyone, mine, group=self.peers.group)
        for rank, theirs in enumerate(everyone):
            if theirs != mine:
                raise ValueError(f"rank {rank} planned differently from rank {self.rank} ({theirs[:4]} vs "
                                 f"{mine[:4]}, or another split): pass the same model and settings on every rank")

    # ---------------------------------------------------------------- generation
    def start(self, program, timesteps):
        self._drain()
        super().start(program, timesteps)
        self._committed = {}
        self._wires = self._wires_key = self._out_skeleton = None

    def _before_step(self, step):
        self.peers.step = self._k  # named in the failures peers.py reports
        if self._k == 0:
            self._begin(self._call)

    def _abandon(self, error):
        if isinstance(error, GenerationMismatch):  # every rank raises it at the same message: the group stays usable
            super()._abandon(error)
            return
        self._stop()
        if not isinstance(error, PeerFailure):
            self.peers.fail(error)  # the other ranks raise now instead of at the timeout

    def _begin(self, call):
        """First step of a program: the ranks agree on what they run, and the timesteps
        are laid out for this rank's device."""
        if call.latent.device.type != self.device.type:
            raise ValueError(f"rank {self.rank}'s pipeline runs on {call.latent.device} but its device is "
                             f"{self.device}; move each rank's pipeline to its device (pipe.to(...))")
        self._agree(generation_digest(self._program, self._timesteps, call))
        self._table = timestep_table(self._timesteps, call, self.device)
        self._layout = call_layout(call)
        self._known = self._skeletons.pop(self._layout, {}) if self._layout is not None else {}
        if self._layout is not None:
            self._skeletons[self._layout] = self._known
            while len(self._skeletons) > MAX_LAYOUTS:
                self._skeletons.popitem(last=False)

    def _agree(self, digest):
        """The host compares every rank's generation (settings and a digest of its inputs:
        agreement.py) with its own and tells each the verdict, so that every rank raises."""
        host, peers, device = self._program.host, self.peers, self._wire_device()
        what = f"comparing the generation's settings with rank {host}"
        if self.rank != host:
            peers.wait(peers.send_object(digest, host, what, device))
            verdict = peers.recv_object(host, what, device)
        else:
            found = []
            for rank in range(peers.size - 1):
                theirs = peers.recv_object(rank, f"comparing the generation's settings of rank {rank}", device)
                differs = differences(theirs, digest)
                if differs:
                    found.append(f"rank {rank} runs a different generation than the host (rank {host}): "
                                 f"{'; '.join(differs)}")
            verdict = None if not found else (
                f"{'. '.join(found)}. Every rank must call the pipeline with the same arguments: the same prompt "
                "and negative prompt, the same seed or generator (or latents=), the same input image, steps and "
                "settings")
            for rank in range(peers.size - 1):
                what = f"sending the verdict on the settings to rank {rank}"
                peers.wait(peers.send_object(verdict, rank, what, device))
        if verdict is not None:
            raise GenerationMismatch(verdict)

    def _wire_device(self):
        """Where what the process group carries lives: gloo sends from the CPU."""
        return self.device if self.peers.backend == "nccl" else torch.device("cpu")

    def _message_device(self):
        """Where the per-step message buffers live: the rank's device when a mailbox
        carries them (ipc copies from GPU to GPU whatever the group's backend), else the
        group's."""
        return self.device if self._links is not None else self._wire_device()

    # ---------------------------------------------------------------- instructions
    def _send_latent(self, ins):
        pass  # every rank's pipeline computed x_k itself

    def _send(self, ins):
        """The first Send of a step: wait for what this rank receives in it (the exchange
        was posted at the step before: _post)."""
        posted = self._posted.pop(self._k, None)
        if posted is not None:
            self._complete(posted)

    def _complete(self, posted):
        pending, arrived = posted
        self.peers.wait(pending)
        for skeleton, buffer, views, mailbox, route in arrived:
            if mailbox is not None:
                mailbox.receive(route, buffer)
            wire.refresh(views, skeleton, buffer)
            self.stats.add_received(self.rank, buffer.numel())

    def _drain(self):
        """Complete the exchanges posted for steps that never ran (a pipeline that stopped
        calling the denoiser early), so that the next messages pair up with their own."""
        posted, self._posted = self._posted, {}
        if self.peers.failure is None and posted:
            try:
                for k in sorted(posted):
                    self._complete(posted[k])
                self._settle("finishing the messages of a generation cut short")
            except PeerFailure:
                self._stop()  # as in a step: no stream stays stuck, no slot is freed under a late copy
                raise

    def _stop(self):
        """After a failure: no generation runs, and no GPU stream waits on a counter forever."""
        self._program, self._posted = None, {}
        for wires in self._every_wires():
            if wires.mailbox is not None:
                try:
                    wires.mailbox.release()
                except Exception:  # the failure being raised matters more
                    log.warning("could not release rank %s's message counters", self.rank, exc_info=True)

    def _every_wires(self):
        return [*self._layouts.values(), *([self._loose] if self._loose is not None else [])]

    def _post(self, k):
        """Post the exchange of step k's Sends: pack this rank's commits for each
        receiver, and receive into this layout's buffers (one message per peer)."""
        sends = [i for i in self._program.steps[k].instructions if isinstance(i, Send) and i.src != i.dst]
        if not sends or k in self._posted:
            return
        outgoing, incoming = {}, {}
        for i in sends:
            if i.src == self.rank:
                outgoing.setdefault(i.dst, []).append(i.unit)
            elif i.dst == self.rank:
                incoming.setdefault(i.src, []).append(i.unit)
        ops, arrived, mailbox = [], [], self._wires.mailbox
        for dst, units in outgoing.items():
            skeleton, buffer, _ = self._wires.message(self._wires.outbox, dst, tuple(units))
            route = Route(self.rank, dst, tuple(units), buffer.numel())
            if mailbox is not None:
                mailbox.before_pack(route)
            wire.pack({u: self._committed[u] for u in units}, skeleton, buffer)
            if mailbox is not None:
                mailbox.send(route, buffer)
            else:
                ops.append((dist.isend, buffer, dst, f"sending step {k}'s cached outputs to rank {dst}"))
        for src, units in incoming.items():
            skeleton, buffer, views = self._wires.message(self._wires.inbox, src, tuple(units))
            if mailbox is None:
                ops.append((dist.irecv, buffer, src, f"receiving rank {src}'s cached outputs for step {k}"))
            arrived.append((skeleton, buffer, views, mailbox, Route(src, self.rank, tuple(units), buffer.numel())))
        self._posted[k] = (self.peers.batch(ops) if ops else [], arrived)

    def _forward(self, ins):
        host = self._program.host
        if ins.device is None:
            self._outputs[None] = self._lockstep(ins.tau_index, ins.commit)
            self.stats.forwards[-1] += self.rank == host  # one warm-up forward, counted once
            return
        if ins.device != self.rank:
            return
        phase = self._program.steps[self._k].phase
        out, record = self._run(phase, ins.tau_index, self._wires.cache)
        if ins.commit:
            self._committed.update(record)
        self._outputs[ins.device] = out
        self.stats.forwards[self.rank] += 1

    def _run(self, phase, tau, cache, compute=None):
        """One forward of this rank's replica; its output and the outputs of its units."""
        replica, stream = self.replica, self._stream
        key = (self.rank, phase, 0, self._wires_key)  # (device, phase, slot, ...) as graphs.py names them
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.device))
        with _on(stream):
            statics = (id(self), self._layout) if self._layout is not None else None  # roles share the replica
            replica.load(self._call, statics, tau, self._table)
            if self._wires_key is None or not self.graphs.enabled:
                with RANGES.range(f"step {self._k}/rank {self.rank}/forward (eager)"):
                    out, record = replica.forward(self._call.latent, cache, compute)
            else:
                latent = self._wires.latent
                latent.copy_(self._call.latent, non_blocking=True)
                how = "replay" if self.graphs.captured(key) else "eager"
                if how == "eager":  # a capture may follow, and it synchronizes: nothing may wait on a peer then
                    self._settle(f"step {self._k}'s messages before a graph capture")
                inputs = [latent, *replica.static_inputs(), *tree_leaves(cache)]
                with RANGES.range(f"step {self._k}/rank {self.rank}/forward ({how})"):
                    out, record = self.graphs.run(key, "rank", stream, lambda: replica.forward(latent, cache, compute),
                                                  inputs)
                out, record = _copies(out), _copies(record)  # the next replay overwrites the graph's outputs
        if stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(stream)
        return out, record

    # ---------------------------------------------------------------- warm-up forward
    def _lockstep(self, tau, commit):
        """A warm-up forward, on every rank at once: each runs the glue and the shared
        modules, computes the units it owns and sends each output to every other rank
        as soon as it is made; the other units return what their owners sent. No unit's
        inputs travel, and no rank waits for a reply."""
        owner, sends, known = self.plan.transfers.owner, [], self._known
        mine = {path for path, rank in owner.items() if rank == self.rank}
        executor = self

        class Sending(dict):  # the forward's record: written as each of this rank's units finishes
            def __setitem__(self, path, out):
                super().__setitem__(path, out)
                sends.extend(executor._send_output(path, out, known))

        received = {}

        def receive(path, args, kwargs):
            received[path] = self._receive_output(path, owner[path], known)
            return received[path]

        self.replica.load(self._call, None, tau, self._table, everything=True)
        with RANGES.range(f"step {self._k}/rank {self.rank}/warm-up forward"):
            out, record = self.replica.forward(self._call.latent, {}, compute=mine, delegate=receive,
                                               record=Sending())
        self.peers.wait(sends)
        if commit:
            self._committed.update(record)
            self._set_wires({u: wire.describe(v) for u, v in {**received, **record}.items()})
        self._out_skeleton = wire.describe(out)
        return out

    def _send_output(self, path, out, known):
        """Post `path`'s output to every other rank (its layout first, unless this input
        layout sent it before: every rank keeps the same record of that)."""
        peers, device = self.peers, self._wire_device()
        skeleton = known.get(path)
        header = skeleton is None
        if header:
            skeleton = known[path] = wire.describe(out)
        buffer = wire.pack(out, skeleton, wire.empty_buffer(skeleton, device))
        pending = []
        for rank in range(peers.size):
            if rank != self.rank:
                what = f"sending the warm-up output of {path} to rank {rank}"
                if header:
                    pending += peers.send_object(skeleton, rank, what, device)
                pending.append(peers.isend(buffer, rank, what))
        return pending

    def _receive_output(self, path, rank, known):
        what = f"receiving the warm-up output of {path} from rank {rank}"
        if path not in known:
            known[path] = self.peers.recv_object(rank, what, self._wire_device())
        return _moved(self._receive_tree(known[path], rank, what), self.device)

    def _receive_tree(self, skeleton, rank, what, batched=False):
        """Receive a message of `skeleton` from `rank`, in the form it was sent: NCCL pairs
        a batched send only with a batched receive (batches and single operations run
        on different communicators)."""
        buffer = wire.empty_buffer(skeleton, self._wire_device())
        if batched:
            self.peers.wait(self.peers.batch([(dist.irecv, buffer, rank, what)]))
        else:
            self.peers.wait([self.peers.irecv(buffer, rank, what)])
        tree = wire.views(skeleton, buffer)
        wire.refresh(tree, skeleton, buffer)
        return tree

    def _set_wires(self, skeletons):
        """The buffers of this layout and program's messages (made once per pair):
        received units, zeros for the other units this rank's glue reads, and the full
        cache of a reuse step. Every rank makes new ones at the same warm-up forward: the
        key and the decision depend only on what every rank knows."""
        messages = self._messages()
        incoming = {(src, units) for src, dst, units in messages if dst == self.rank}
        key = (self._layout, messages) if self._layout is not None else None
        wires = self._layouts.get(key) if key is not None else None
        if wires is None or wires.skeletons != skeletons:
            wires = _Wires(skeletons, self._message_device())
            for src, units in sorted(incoming):
                _, _, views = wires.message(wires.inbox, src, units)
                for unit in units:
                    if unit in wires.cache:
                        raise NotImplementedError(
                            f"unit {unit} reaches rank {self.rank} in two different messages; the distributed "
                            "executor expects one per unit (please report the plan)")
                    wires.cache[unit] = views[unit]
            own = set(self.replica.compute)
            for unit, skeleton in skeletons.items():
                if unit not in own and unit not in wires.cache:
                    wires.cache[unit] = wire.zeros(skeleton, self.device)
            wires.full_cache = {u: wire.zeros(skeletons[u], self.device) for u in own if u in skeletons}
            wires.full_cache.update(wires.cache)  # own units the host fetches for a reuse step included
            wires.latent = torch.empty_like(self._call.latent, device=self.device) if self.graphs.enabled else None
            retired = self._keep_layout(key, wires)
            if self._links is not None:
                self._open_mailbox(wires, messages, retired)
        self._wires, self._wires_key = wires, key

    def _messages(self):
        """{(sender, receiver, units)}: every message of the program, the same on every rank."""
        messages = set()
        for step in self._program.steps:
            by_pair = {}
            for i in step.instructions:
                if isinstance(i, Send) and i.src != i.dst:
                    by_pair.setdefault((i.src, i.dst), []).append(i.unit)
            messages.update((src, dst, tuple(units)) for (src, dst), units in by_pair.items())
        return frozenset(messages)

    def _keep_layout(self, key, wires):
        """Keep `wires` (under `key`, or as the loose one); the _Wires it replaces."""
        if key is None:
            retired, self._loose = [self._loose] if self._loose is not None else [], wires
            return retired
        retired = [self._layouts[key]] if key in self._layouts else []
        self._layouts[key] = wires
        self._layouts.move_to_end(key)
        while len(self._layouts) > MAX_LAYOUTS:
            old, evicted = self._layouts.popitem(last=False)
            retired.append(evicted)
            if self._stream is not None:  # its graphs go: their last replay must be done
                self._synchronize("dropping the graphs of an old input layout", [self._stream])
            self.graphs.drop(lambda k: k[3] == old)
            if all(k[0] != old[0] for k in self._layouts):
                self.replica.drop((id(self), old[0]))
        return retired

    def _open_mailbox(self, wires, messages, retired):
        """Slots and counters for every message this rank sends or receives, mapped by the
        peers. The exchange of their addresses also tells this rank that every peer has
        finished with the mailboxes retired here (each synchronized before sending)."""
        routes = []
        for src, dst, units in sorted(messages):
            if self.rank in (src, dst):
                box, peer = (wires.outbox, dst) if src == self.rank else (wires.inbox, src)
                routes.append(Route(src, dst, units, wires.message(box, peer, units)[1].numel()))
        self._synchronize("finishing with the message slots of an old input layout", self._gpu_streams())
        wires.mailbox = Mailbox(self.rank, routes, self._links)  # its host wait: on streams just found idle
        others = [p for p in range(self.peers.size) if p != self.rank]
        exports = self.peers.exchange_objects({p: wires.mailbox.export_for(p) for p in others},
                                              "sharing the addresses of the message slots", self._wire_device())
        wires.mailbox.connect(exports)
        for old in retired:
            if old.mailbox is not None:
                old.mailbox.close()

    # ---------------------------------------------------------------- the prediction
    def _emit(self, ins):
        """Post the next step's exchange, then share this step's prediction."""
        if self._k + 1 < self._program.num_steps and self._wires is not None:
            self._post(self._k + 1)
        super()._emit(ins)

    def _emit_forward(self, device):
        return self._share(lambda: self._outputs[device])

    def _emit_cache(self):
        # the glue around the cached output units
        tau = self._k - int(self._program.time_shift)
        return self._share(lambda: self._run("reuse", tau, self._wires.full_cache, compute=())[0])

    def _share(self, prediction):
        """The host makes the prediction (`prediction()`, run on the host alone) and sends it
        to every rank; the others receive it."""
        k, host, peers, device = self._k, self._program.host, self.peers, self._wire_device()
        if peers.backend != "nccl":  # NCCL's waits are polled, and they follow this rank's stream
            self._settle(f"waiting for step {k}'s messages on this rank's GPU")
        if self.rank == host:
            out = prediction()
            skeleton = self._out_skeleton
            buffer = wire.pack(out, skeleton, wire.empty_buffer(skeleton, device))
            peers.wait(peers.batch([(dist.isend, buffer, rank, f"sending the prediction of step {k} to rank {rank}")
                                    for rank in range(peers.size - 1)]))
            return out
        what = f"receiving the prediction of step {k} from rank {host}"
        received = self._receive_tree(self._out_skeleton, host, what, batched=True)  # as the host sends it
        return _moved(received, self._call.latent.device)

    def _settle(self, what, streams=None):
        """ipc: wait within the timeout for this rank's current stream (or `streams`)
        before the host copies from it or waits for it otherwise. The stream may wait on
        a peer's counter, and a host wait (a copy to the host, this executor's or the
        pipeline's; a graph capture's synchronize) would block forever on a peer that died."""
        watched = [p for p in range(self.peers.size) if p != self.rank]
        if self._links is None or self.device.type != "cuda" or not watched:
            return
        events = []
        for stream in streams or [torch.cuda.current_stream(self.device)]:
            events.append(torch.cuda.Event())
            events[-1].record(stream)
        self.peers.wait_until(lambda: all(e.query() for e in events), watched, what, alive=self._links.alive)

    def _gpu_streams(self):
        """Every stream this rank's work runs on (none off the GPU)."""
        if self.device.type != "cuda":
            return []
        return [torch.cuda.current_stream(self.device), self._stream, *(self._links.streams() if self._links else [])]

    def _synchronize(self, what, streams):
        """Wait for `streams` (None entries skipped): within the timeout under ipc with
        peers (settle), plainly otherwise."""
        streams = [s for s in streams if s is not None]
        if self._links is not None and self.peers.size > 1:
            self._settle(what, streams)
        else:
            for stream in streams:
                stream.synchronize()

    # ---------------------------------------------------------------- reporting
    def weights_per_device(self):
        """Bytes of weights this rank holds, at its index (None for the other ranks)."""
        out = [None] * self.peers.size
        out[self.rank] = weight_bytes(self.replica.module)
        return out

    def close(self):
        """Peers may still run: drain what they sent here, and keep (links.py) the
        counters they may yet write."""
        if self._posted:
            try:
                self._drain()
            except PeerFailure:
                pass
        if any(w.mailbox is not None for w in self._every_wires()) and self.peers.failure is None:
            try:  # this rank's last copies into the peers' slots land before their mappings go
                self._synchronize("finishing this rank's last messages", self._gpu_streams())
            except PeerFailure:
                self._stop()
        self._program = None
        self.graphs.clear()
        for wires in self._every_wires():
            if wires.mailbox is not None:
                wires.mailbox.close()
        self._layouts.clear()
        self._loose = None
        if self._shares is None:
            self.replica.close()


def _copies(tree):
    return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, tree)
