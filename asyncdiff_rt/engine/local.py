"""The local executor: one process drives every device of the program.

Devices are GPUs, virtual devices on one GPU (a stream or an SM partition each) or the
CPU, where streams and events are no-ops and every line below still runs (devices.py).
Each device holds a replica with the weights of its own units and the shared modules
(replica.py), and nothing else: warm-up forwards run as a chain through the devices
(the host runs the glue and its own units, every other unit runs on its owner's device,
its inputs passed over and its output passed back), so no device ever needs the whole
denoiser, and each unit's commit stays where it was computed. Caches and latents are
static, double-buffered tensors (buffers.py); asynchronous forwards replay CUDA graphs
(graphs.py); warm-up forwards (W of K steps) run eagerly. The Sends of step k+1 are issued right after the forwards of step k, on
the producer's copy stream, ordered by events: a send waits for the forward that made
its data and for the receiver's forward that last read the slot it overwrites; a
forward waits for the sends into its slot and for the copies that read its outputs of
two forwards ago. Nothing waits on the host in steady state.
"""
import logging
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree

from ..profiling.nvtx import RANGES
from ..schedule import Send
from .buffers import SLOTS, DeviceBuffers, buffer_plan
from .call import timestep_table, tree_leaves
from .devices import count_devices, open_devices
from .graphs import GraphCache
from .replica import Replica, call_layout, replicate, weight_bytes
from .stages import EAGER
from .stats import ExecutorStats
from .step_loop import StepLoop
from .transfer import TransferEngine

log = logging.getLogger(__name__)
MAX_LAYOUTS = 3  # input layouts (resolutions, batches, kwargs) whose inputs, buffers and graphs are kept


def _on(stream):
    return torch.cuda.stream(stream) if stream is not None else nullcontext()


def _moved(tree, device):
    """`tree` with its tensors on `device` (the same tensors where they already are)."""
    return pytree.tree_map(lambda t: t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t, tree)


@dataclass
class _Layout:
    """What one input layout owns besides its graphs and the replicas' static inputs."""

    buffers: list = None  # DeviceBuffers per device, sized by the warm-up commit
    warmup_latent: torch.Tensor = None  # the host's latent in warm-up forwards


class LocalExecutor(StepLoop):
    name = "local"
    # a sibling (another call role) has its own caches, graphs, events and generation state on
    # these: the lanes, streams and replicas (weights are not copied again)
    shared_by_roles = ("plan", "home", "lanes", "engine", "replicas", "stats", "delay_cycles", "timeline",
                       "_devices", "_use_graphs")

    def __init__(self, denoiser, plan, devices=None, graphs=True, backend=None, stages=EAGER):
        self.plan = plan
        self.home = next(denoiser.parameters()).device
        n = plan.n_devices
        devices = devices if devices is not None else f"{self.home}*{n}"
        if count_devices(devices) != n:
            raise ValueError(f"devices {devices!r} name {count_devices(devices)} devices; this plan runs on "
                             f"n_components + stride - 1 = {n}")
        if getattr(denoiser, "_asyncdiff_switch", None) is not None:
            raise RuntimeError("this denoiser is already driven by an executor; remove that one first")
        self._devices = open_devices(devices)
        self.lanes = self._devices.devices
        gpus = sorted({lane.device.index for lane in self.lanes if lane.device.type == "cuda"})
        try:
            self.engine = TransferEngine(backend if backend or gpus else "cpu", devices=gpus, record_streams=False)
            self._replicate(denoiser, stages)
        except BaseException:
            self._devices.close()
            raise
        self.stats = ExecutorStats(n)
        self.delay_cycles = 0  # tests: GPU spin before every queued forward and copy, to expose races
        self.timeline = None  # a profiling.timeline.Timeline records what is queued (handle.profile)
        self._use_graphs = graphs
        self._shares = None  # the executor whose lanes and replicas a sibling uses (None: its own)
        self._init_role()

    def _init_role(self):
        """The state one role of calls owns."""
        super()._init_role()
        self.graphs = GraphCache(enabled=self._use_graphs)
        self._buffer_plan = None
        self._layouts = OrderedDict()  # input layout -> _Layout, least recently used first
        ev = self.engine.event
        self._home_bound = self._input_stream = None  # bound to the pipeline's device at its first call
        self._fence = {d: ev(d) for d in {lane.device for lane in self.lanes}}  # new buffers zeroed / lanes idle
        self._loaded = [ev(lane.device) for lane in self.lanes]  # a lane's copies of the call's arguments
        self._done = [[ev(lane.device) for _ in range(SLOTS)] for lane in self.lanes]  # forward that read a slot
        self._read = [[ev(lane.device) for _ in range(SLOTS)] for lane in self.lanes]  # copies of its outputs
        host = self.lanes[-1].device
        self._hops = [(ev(host), ev(lane.device)) for lane in self.lanes]  # host -> lane -> host in a warm-up
        self._in_flight = []  # tensors a warm-up passed between lanes: kept until every lane is past them

    def _replicate(self, denoiser, stages):
        paths, comps = self.plan.graph.paths, self.plan.partition.components
        self.replicas = []
        for d, lane in enumerate(self._devices.devices):
            own = comps[min(d, self.plan.n_components - 1)]
            module = replicate(denoiser, [p for p in paths if p not in own], lane.device,
                               keep=self.plan.graph.read_outside)
            skipped = self.plan.transfers.skipped_arguments(d)
            self.replicas.append(Replica(module, paths, own, lane.device, skipped, stages))

    # ---------------------------------------------------------------- generation
    def start(self, program, timesteps):
        if self._buffer_plan is None:
            self._buffer_plan = buffer_plan(self.plan, program)
        super().start(program, timesteps)
        self._rounds = [0] * len(self.lanes)
        self._last_done = [None] * len(self.lanes)  # the event after each lane's latest forward
        self._pending = [[] for _ in self.lanes]
        self._committed, self._issued = {}, set()
        self._buffers = self._generation_layout = self._tables = self._emit_spec = None

    def _before_step(self, step):
        """Bind this call's layout (its buffers, graphs and timestep tables) and mark the
        pipeline's stream: the step's work waits for what the pipeline queued before."""
        call = self._call
        self._in_flight = []  # the last step ended with a join: no lane reads them any more
        self._layout = call_layout(call)  # None: forwards run eagerly
        key = self._layout if self._layout is not None else ("eager", call.shapes())
        if self._generation_layout is None:
            self._bind_home(call.latent.device)
            self._generation_layout, self._tables = key, [
                timestep_table(self._timesteps, call, lane.device) for lane in self.lanes]
        self._use_layouts(self._generation_layout, key)
        self._ready.record(self._pipeline_stream())
        self._host_start = self._mark(None)

    def _after_step(self, step):
        k, last = self._k, self._program.num_steps
        if k + 1 == last or step.phase == "warmup":
            self._join_lanes()  # the caller (or the next step) may free what any lane still reads
        if k + 1 < last and self._buffers is not None:
            self._issue_sends(k + 1)  # as soon as the producing forwards are queued
        if self.timeline is not None:
            self.timeline.host(k, step.phase, self._host_start, self._mark(None))

    def _abandon(self, error=None):
        """After an error (or at close): end the generation and let queued work finish, so
        that the next call starts from quiet devices (a failed capture was already closed)."""
        super()._abandon(error)
        self._quiesce()
        self._in_flight = []

    def _quiesce(self):
        """Wait on the host until every stream of every lane is idle."""
        streams = [s for lane in self.lanes for s in (lane.stream, lane.copy_stream)] + [self._input_stream]
        for stream in streams:
            if stream is not None:
                try:
                    stream.synchronize()
                except Exception:  # a broken stream reports its own error at its next use
                    log.exception("synchronising a stream after a failed step")

    def _join_lanes(self):
        """The pipeline's stream waits for everything queued on every lane (end of a
        generation): no lane reads a buffer or argument after the caller moves on."""
        pipeline = self._pipeline_stream()
        for lane in self.lanes:
            for stream in (lane.stream, lane.copy_stream):
                if stream is not None:
                    fence = self._fence[lane.device]
                    fence.record(stream)
                    fence.wait(pipeline)
        self._inputs.record(self._input_stream)
        self._inputs.wait(pipeline)

    def _use_layouts(self, *keys):
        """Mark `keys` as in use, creating their entries; evict the least recently used
        layout beyond MAX_LAYOUTS with its graphs, static inputs and buffers, once no
        stream can still read them."""
        for key in keys:
            if key not in self._layouts:
                self._layouts[key] = _Layout()
            self._layouts.move_to_end(key)
        while len(self._layouts) > MAX_LAYOUTS:
            old, _ = next(iter(self._layouts.items()))
            self._quiesce()  # rare: a fourth layout; its buffers are freed right after
            self.graphs.drop(lambda k: old in (k[3], k[4]))
            for replica in self.replicas:
                replica.drop((id(self), old))
            del self._layouts[old]

    def _bind_home(self, device):
        """The pipeline's device (where its latents are, not necessarily the UNet's: a
        UNet kept on the CPU lets GPU lanes hold only their parts): its stream orders the
        steps, and inputs are copied from it on a stream of its own."""
        if device == self._home_bound:
            return
        if (device.type == "cuda") != (self.lanes[0].device.type == "cuda"):
            raise ValueError(f"the pipeline's latents are on {device} but the devices are {self.lanes[0].device.type} "
                             "devices; run the pipeline on the kind of device the lanes are on (a UNet kept on the "
                             "CPU is fine: only its parts move to the lanes)")
        self.home = self._home_bound = device
        self._input_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._ready, self._inputs = self.engine.event(device), self.engine.event(device)

    def _pipeline_stream(self):
        return torch.cuda.current_stream(self.home) if self.home.type == "cuda" else None

    # ---------------------------------------------------------------- instructions
    def _send(self, ins):
        self._issue_sends(self._k)

    def _issue_sends(self, k):
        """All Sends of step k, one batch per producing forward, on its lane's copy stream."""
        if k in self._issued:
            return
        self._issued.add(k)
        groups = {}
        for ins in self._program.steps[k].instructions:
            if isinstance(ins, Send):
                value, lane, slot = self._committed[ins.unit]
                groups.setdefault((lane, slot), []).append((ins, value))
        for (lane, slot), sends in groups.items():
            stream = self.lanes[lane].copy_stream
            self._done[lane][slot].wait(stream)
            pairs, received = [], {}
            for ins, value in sends:
                dst_slot = self._rounds[ins.dst] % SLOTS
                self._done[ins.dst][dst_slot].wait(stream)  # its forward that last read this slot
                buffer = self._buffers[ins.dst].received[ins.unit][dst_slot]
                leaves = [(d, v) for d, v in zip(tree_leaves(buffer), tree_leaves(value))
                          if isinstance(v, torch.Tensor)]  # outputs may hold None (SD3's last block)
                pairs += leaves
                received.setdefault(ins.dst, []).append(sum(src.nbytes for _, src in leaves))
            start = self._mark(stream)
            with RANGES.range(f"step {k}/dev {lane}/send {len(pairs)} tensors"):
                self._copy(pairs, stream)
            if self.timeline is not None:
                self.timeline.send(lane, k, sorted(received), sum(sum(v) for v in received.values()), start,
                                   self._mark(stream))
            self._read[lane][slot].record(stream)
            for dst, sizes in received.items():
                self._pending[dst].append(self._read[lane][slot])
                for nbytes in sizes:
                    self.stats.add_received(dst, nbytes)

    def _send_latent(self, ins):
        self._copy_latent(ins.dst)
        self.stats.add_received(ins.dst, self._call.latent.nbytes)

    def _copy_latent(self, lane, warmup=False):
        """x_k from the pipeline into `lane`'s latent slot for its next forward (the
        host's warm-up latent in a warm-up forward)."""
        slot = self._slot(lane)
        latent = self._call.latent
        if warmup:
            layout = self._layouts[self._generation_layout]
            if layout.warmup_latent is None:
                layout.warmup_latent = torch.empty_like(latent, device=self.lanes[lane].device)
            target = layout.warmup_latent
        else:
            target = self._buffers[lane].latent(slot)
        stream = self._input_stream
        self._ready.wait(stream)
        self._done[lane][slot].wait(stream)
        self._delay(stream)
        self._copy([(target, latent)], stream)
        if stream is not None and latent.is_cuda:
            latent.record_stream(stream)  # the pipeline may free x_k before this copy runs
        self._inputs.record(stream)
        self._inputs.wait(self._pipeline_stream())  # ... or write it in place
        self._pending[lane].append(self._inputs)
        return target

    def _slot(self, lane):
        return self._rounds[lane] % SLOTS

    def _forward(self, ins):
        if ins.device is None:
            self._outputs[None] = self._chain(ins.tau_index, ins.commit)
        else:
            self._outputs[ins.device] = self._run(ins.device, self._program.steps[self._k].phase, ins.tau_index,
                                                  ins.commit)
        self.stats.forwards[-1 if ins.device is None else ins.device] += 1

    def _prepare_forward(self, lane, slot, tau, layout, everything=False):
        """Order `lane`'s stream after what its next forward reads, and load the call's
        arguments it is sent (all with `everything`) and timestep `tau` into its static
        inputs of `layout`."""
        stream = self.lanes[lane].stream
        for event in (self._ready, *self._pending[lane], self._read[lane][slot]):
            event.wait(stream)
        self._pending[lane] = []
        self._delay(stream)
        with _on(stream):
            # static inputs are per role (id(self)): roles share the replicas, not their graphs
            key = (id(self), layout) if layout is not None else None
            copied = self.replicas[lane].load(self._call, key, tau, self._tables[lane], everything)
        if self._program.steps[self._k].phase != "reuse":  # counted per Forward, as every executor does
            self.stats.argument_bytes[lane] += copied
        if copied:  # the pipeline may free those arguments: its stream waits for the copies
            # (record_stream would tie the tensors to this lane's stream, which an SM
            # partition destroys on close, possibly before the tensors are freed)
            self._loaded[lane].record(stream)
            self._loaded[lane].wait(self._pipeline_stream())

    def _finish_forward(self, lane, slot):
        self._done[lane][slot].record(self.lanes[lane].stream)
        self._last_done[lane] = self._done[lane][slot]

    def _chain(self, tau, commit):
        """A warm-up forward (every unit computed) as a chain through the lanes: the host
        runs the glue, the shared modules and its own units; every other unit runs on its
        owner's lane. Eager: warm-up steps are few, and a graph cannot span the lanes."""
        host = self._program.host
        slot = self._slot(host)
        latent = self._copy_latent(host, warmup=True)
        self._prepare_forward(host, slot, tau, layout=None, everything=True)  # delegated units get them from it
        record = {}

        def delegate(path, args, kwargs):
            return self._delegate(path, args, kwargs, record)

        start = self._mark(self.lanes[host].stream)
        with _on(self.lanes[host].stream), RANGES.range(f"step {self._k}/dev {host}/warm-up forward"):
            out, own = self.replicas[host].forward(latent, {}, delegate=delegate)
        if self.timeline is not None:
            self.timeline.forward(host, self._k, f"warm-up T[{tau}] (glue, own units)", start,
                                  self._mark(self.lanes[host].stream))
        self._finish_forward(host, slot)
        self._note_output(out, own)
        record.update((unit, (value, host, slot)) for unit, value in own.items())
        if commit:
            self._commit(record)
        return out

    def _delegate(self, path, args, kwargs, record):
        """Unit `path` of a warm-up forward, on its owner's lane: the inputs go over, the
        output comes back to the host, each hop ordered by an event."""
        host, owner = self._program.host, self.plan.transfers.owner[path]
        src, dst = self.lanes[host], self.lanes[owner]
        there, back = self._hops[owner]
        there.record(src.stream)
        there.wait(dst.stream)
        self._delay(dst.stream)
        start = self._mark(dst.stream)
        with _on(dst.stream), RANGES.range(f"step {self._k}/dev {owner}/{path}"):
            inputs = _moved((args, kwargs), dst.device)
            out = self.replicas[owner].module.get_submodule(path)(*inputs[0], **inputs[1])
        if self.timeline is not None:
            self.timeline.forward(owner, self._k, f"warm-up {path}", start, self._mark(dst.stream))
        slot = self._slot(owner)
        self._finish_forward(owner, slot)  # sends of this output wait for it
        back.record(dst.stream)
        back.wait(src.stream)
        with _on(src.stream):
            result = _moved(out, src.device)
        self._in_flight.append((args, kwargs, inputs, out, result))
        record[path] = (out, owner, slot)
        return result

    def _run(self, lane, phase, tau, commit, compute=None):
        """Queue one asynchronous forward on `lane`; return its output (static when replayed)."""
        replica, stream, slot = self.replicas[lane], self.lanes[lane].stream, self._slot(lane)
        if lane == self._program.host:
            latent = self._copy_latent(lane)
        else:
            latent = self._buffers[lane].latent(slot)
        buffers = self._buffers[lane]
        cache = buffers.cache(slot) if compute is None else buffers.full_cache(slot)
        if compute is not None:  # full_cache may have just zero-filled on the device's current stream
            self._fence_current(self.lanes[lane].device, [stream])
        self._prepare_forward(lane, slot, tau, self._layout)

        def forward():
            return replica.forward(latent, cache, compute)

        start = self._mark(stream)
        if self._layout is None:
            with _on(stream), RANGES.range(f"step {self._k}/dev {lane}/forward (eager)"):
                out, record = forward()
        else:
            key = (lane, phase, slot, self._layout, self._generation_layout)
            inputs = [latent, *replica.static_inputs(), *tree_leaves(cache)]
            how = "replay" if self.graphs.captured(key) else "eager"
            with RANGES.range(f"step {self._k}/dev {lane}/forward ({how})"):
                out, record = self.graphs.run(key, (lane, slot), stream, forward, inputs)
        if self.timeline is not None:
            self.timeline.forward(lane, self._k, f"{phase} T[{tau}]", start, self._mark(stream))
        self._finish_forward(lane, slot)
        self._rounds[lane] += 1
        if commit:
            self._commit({unit: (value, lane, slot) for unit, value in record.items()})
        return out

    def _commit(self, record):
        """unit -> (output, the lane that holds it, the slot of the forward that made it)."""
        self._committed.update(record)
        if self._buffers is None:
            self._prepare({unit: value for unit, (value, _, _) in record.items()})

    def _note_output(self, out, record):
        """Whether the denoiser returns its output unit's output unchanged: then a reuse
        step emits the cached tensor itself instead of running the glue around it."""
        leaves, spec = pytree.tree_flatten(out)
        unit_out = record.get(self.plan.graph.output_unit)
        same = len(leaves) == 1 and isinstance(unit_out, torch.Tensor) and leaves[0] is unit_out
        self._emit_spec = spec if same else None

    def _prepare(self, record):
        """This generation's buffers: the ones of its layout, or new ones from the plan,
        whose zero-fill every stream that may touch them waits for."""
        layout = self._layouts[self._generation_layout]
        if layout.buffers is None:
            bp = self._buffer_plan
            layout.buffers = [
                DeviceBuffers(lane.device, bp.received[d], bp.zeros[d], bp.latent[d], record, self._call.latent)
                for d, lane in enumerate(self.lanes)
            ]
            streams = [s for lane in self.lanes for s in (lane.stream, lane.copy_stream)] + [self._input_stream]
            for device in self._fence:
                self._fence_current(device, streams)
        self._buffers = layout.buffers

    def _fence_current(self, device, streams):
        """`streams` wait for what `device`'s current stream has queued (new buffers'
        zero-fill happens there)."""
        fence = self._fence[device]
        fence.record(torch.cuda.current_stream(device) if device.type == "cuda" else None)
        for stream in streams:
            if stream is not None:
                fence.wait(stream)

    def _emit(self, ins):
        with RANGES.range(f"step {self._k}/emit ({ins.source})"):
            super()._emit(ins)

    def _emit_forward(self, device):
        lane = self._program.host if device is None else device
        self._last_done[lane].wait(self._pipeline_stream())
        return self._to_pipeline(self._outputs[device])

    def _emit_cache(self):
        host, stream = self._program.host, self._pipeline_stream()
        if self._emit_spec is not None:  # the fetched output unit's output
            for event in self._pending[host]:
                event.wait(stream)
            cached = self._buffers[host].received[self.plan.graph.output_unit][self._slot(host)]
            return self._to_pipeline(pytree.tree_unflatten([cached], self._emit_spec))
        # a general denoiser: the glue around the host's cached units
        out = self._run(host, "reuse", self._k - int(self._program.time_shift), commit=False, compute=())
        self._last_done[host].wait(stream)
        return self._to_pipeline(out)

    def _to_pipeline(self, out):
        """A copy of a (static) output on the pipeline's device, queued on its stream."""
        return pytree.tree_map(
            lambda t: t.to(self.home, non_blocking=True, copy=True) if isinstance(t, torch.Tensor) else t, out)

    def _mark(self, stream):
        """A timeline mark on `stream` (None: the host); None when no timeline records."""
        return self.timeline.mark(stream) if self.timeline is not None else None

    def _delay(self, stream):
        if self.delay_cycles and stream is not None:
            with _on(stream):
                torch.cuda._sleep(self.delay_cycles)

    def _copy(self, pairs, stream):
        self._delay(stream)
        fast, rest = [], []
        for pair in pairs:
            (fast if pair[0].is_contiguous() and pair[1].is_contiguous() else rest).append(pair)
        self.engine.copy(fast, stream)
        with _on(stream):
            for dst, src in rest:
                dst.copy_(src, non_blocking=True)

    # ---------------------------------------------------------------- reporting
    def weights_per_device(self):
        """Bytes of weights each device's replica holds (shared modules + own units)."""
        return [weight_bytes(r.module) for r in self.replicas]

    def close(self):
        if self._devices is None:
            return
        self._abandon()
        for key in self._layouts:
            for replica in self.replicas:
                replica.drop((id(self), key))
        self.graphs.clear()
        self._layouts.clear()
        self._committed = self._outputs = {}
        if self._shares is None:  # a sibling leaves the lanes and replicas to their owner
            for replica in self.replicas:
                replica.close()
            self._devices.close()
        self._devices = None
