"""The distributed executor's GPU paths without a GPU (issue 23): the executor and the
CUDA IPC links driven piecewise with fake peers, streams, events and extension, as
test_mailbox.py drives the links. Each test names the defect it guards against."""
import contextlib
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from asyncdiff_rt.engine import links as links_module
from asyncdiff_rt.engine import wire
from asyncdiff_rt.engine.distributed import DistributedExecutor, _Wires
from asyncdiff_rt.engine.graphs import GraphCache
from asyncdiff_rt.engine.mailbox import Mailbox, Route
from asyncdiff_rt.engine.peers import PeerFailure
from asyncdiff_rt.schedule import Emit, Send, Step


class _Peers:
    """A rank's peers that record every operation's form: ("batch" or "single", op, from, to)."""

    def __init__(self, rank, size, backend, log):
        self.rank, self.size, self.backend, self.log = rank, size, backend, log
        self.failure, self.waited = None, []

    def batch(self, ops):
        self.log += [("batch", op.__name__, *self._ends(op, peer)) for op, _, peer, _ in ops]
        return []

    def isend(self, tensor, peer, what):
        self.log.append(("single", "isend", self.rank, peer))
        return None

    def irecv(self, tensor, peer, what):
        self.log.append(("single", "irecv", peer, self.rank))
        return None

    def send_object(self, obj, peer, what, device):
        return [self.isend(None, peer, what), self.isend(None, peer, what)]

    def recv_object(self, peer, what, device):
        self.irecv(None, peer, what)
        self.irecv(None, peer, what)
        return self.objects.pop(0)

    def wait(self, pending):
        pass

    def exchange_objects(self, objects, what, device):
        return objects  # what each peer sends back is not read by these tests

    def wait_until(self, done, watched, what, alive):
        """A bounded wait that finds the GPU stuck: PeerFailure, as the timeout would."""
        self.waited.append(what)
        if not done():
            raise PeerFailure(f"rank {watched[0]} sent nothing ({what})")

    def _ends(self, op, peer):
        return (self.rank, peer) if op is dist.isend else (peer, self.rank)


def _executor(rank, size=2, backend="gloo", device="cpu", links=None, log=None):
    ex = DistributedExecutor.__new__(DistributedExecutor)
    ex.rank, ex.device, ex._links, ex._stream, ex._shares = rank, torch.device(device), links, None, None
    ex.peers = _Peers(rank, size, backend, [] if log is None else log)
    ex._use_graphs = False
    ex._init_role()
    ex._k, ex._outputs, ex._layout, ex._wires = 0, {}, None, None
    ex._call = SimpleNamespace(latent=torch.zeros(4, device=device))
    return ex


class _Links:
    """Mailbox links that only record what happens to the memory."""

    def __init__(self):
        self.log = []

    def alloc(self, slot_bytes, n_counters):
        return links_module._Memory(("mine",), data=torch.empty(slot_bytes, dtype=torch.uint8))

    def open(self, token, peer):
        return links_module._Memory(token)

    def close_remote(self, remote):
        self.log.append("unmapped")

    def free(self, memory):
        self.log.append("freed")

    def keep(self, memory, remotes):
        self.log.append("kept")

    def force(self, memory, index, value):
        self.log.append("released")

    def streams(self):
        return []


def _program_between_ranks_0_and_1():
    instructions = (Send("a", 0, 1), Send("b", 1, 0), Emit("forward", 1))
    return SimpleNamespace(steps=(Step(0, "async", instructions),), host=1, num_steps=2, time_shift=False)


def _open_wires(ex):
    """The warm-up commit's buffers of a program where rank 0 sends unit a and receives b."""
    ex._program = _program_between_ranks_0_and_1()
    ex.replica = SimpleNamespace(compute=("a",), close=lambda: None)
    ex._set_wires(_SKELETONS)
    return ex._wires


_SKELETONS = {"a": wire.describe(torch.zeros(3, 5)), "b": wire.describe(torch.zeros(2, 7))}


# ---------------------------------------------------------------- 1: where the messages live
def test_mailbox_messages_live_on_the_ranks_device_also_over_a_gloo_group():
    """ipc over gloo (several ranks on one GPU): the message buffers were made on the
    gloo group's device, the CPU, so the links would copy device memory from host
    pointers and the forward would read CPU caches. The meta device stands for the GPU."""
    wires = _open_wires(_executor(0, backend="gloo", device="meta", links=_Links()))
    buffers = [buffer for box in (wires.inbox, wires.outbox) for _, buffer, _ in box.values()]
    assert len(buffers) == 2 and all(b.device.type == "meta" for b in buffers), [b.device for b in buffers]
    assert wires.cache["b"].device.type == "meta"  # what this rank's forward reads


def test_group_messages_live_where_the_group_sends_from():
    gloo = _open_wires(_executor(0, backend="gloo", device="cpu"))
    assert all(b.device.type == "cpu" for _, b, _ in gloo.inbox.values())
    nccl = _open_wires(_executor(0, backend="nccl", device="meta"))
    assert all(b.device.type == "meta" for _, b, _ in nccl.inbox.values())


# ---------------------------------------------------------------- 2: send and receive in one form
def test_every_message_is_received_in_the_form_it_was_sent():
    """NCCL runs batched point-to-point operations on the group's communicator and single
    ones on a communicator per pair: a batched send never pairs with a single receive.
    The host's prediction went in a batch and was received alone."""
    log = []
    host, other = _executor(1, backend="nccl", log=log), _executor(0, backend="nccl", log=log)
    prediction = torch.arange(6.0).reshape(2, 3)
    for ex in (host, other):
        ex._program, ex._out_skeleton = _program_between_ranks_0_and_1(), wire.describe(prediction)
    host._outputs[1] = prediction
    host._emit(Emit("forward", 1))
    other._emit(Emit("forward", 1))
    # a warm-up output, with its layout first (objects: a size and the bytes)
    other.peers.objects = [wire.describe(prediction)]
    host._send_output("b", prediction, {})
    other._receive_output("b", 1, {})
    sent = [(form, src, dst) for form, op, src, dst in log if op == "isend"]
    received = [(form, src, dst) for form, op, src, dst in log if op == "irecv"]
    assert len(sent) == 4 and sent == received, log


# ---------------------------------------------------------------- 4: the release stream
class _FakeC:
    def __init__(self):
        self.log = []

    def signal_write(self, stream, ptr, value, device, check_pointer=True):
        self.log.append(("write", stream, ptr, value))

    def ipc_open(self, handle, offset, device):
        return 5000 + offset

    def ipc_close(self, handle, device):
        self.log.append(("unmap", handle))


class _Pool:
    """torch's stream pool, round-robin: with two streams, the third is the first again."""

    def __init__(self):
        self.made = 0

    def __call__(self, device=None, priority=0):
        self.made += 1
        return SimpleNamespace(cuda_stream=10 + (self.made - 1) % 2)


class _Driver:
    """libcuda as _driver_stream calls it: records the calls, hands out stream 99."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        def call(*args):
            self.calls.append(name)
            if name == "cuStreamCreate":
                args[0]._obj.value = 99
                assert args[1] == links_module.CU_STREAM_NON_BLOCKING  # waits for no other stream
            return 0

        return call


@pytest.fixture
def fake_cuda_links(monkeypatch):
    """CudaIpcLinks made by its own constructor on GPU 3 with torch's pool, the driver and
    the extension faked."""
    pool, driver = _Pool(), _Driver()
    monkeypatch.setattr(torch.cuda, "Stream", pool)
    monkeypatch.setattr(links_module, "_driver", lambda: driver)
    monkeypatch.setattr(links_module, "_RELEASE_STREAMS", {})

    def make():
        links = links_module.CudaIpcLinks(torch.device("cuda", 3), pids={})
        links.C = _FakeC()
        return links

    return make, pool, driver


def test_counters_are_released_on_a_stream_of_their_own(fake_cuda_links):
    """Releasing after a failure wrote the counters on a stream taken from torch's pool,
    which can be the communication stream stuck on the very wait being released."""
    make, pool, driver = fake_cuda_links
    links = make()
    memory = links_module._Memory(("mine",), counters=2000)
    links.force(memory, 1, 5)
    links.force(memory, 2, 6)
    streams = {entry[1] for entry in links.C.log}
    assert streams == {99}, (streams, links.comm.cuda_stream, links.recv.cuda_stream)
    assert make()._release == 99 and driver.calls.count("cuStreamCreate") == 1  # made once per GPU
    assert driver.calls[:3] == ["cuDeviceGet", "cuDevicePrimaryCtxRetain", "cuCtxPushCurrent_v2"]
    assert driver.calls[-1] == "cuCtxPopCurrent_v2"


# ---------------------------------------------------------------- 5: slots after a failure
def test_after_a_failure_slots_and_mappings_are_kept(fake_cuda_links, monkeypatch):
    """After a release a peer's copy queued behind it may still land in this rank's slots
    (and this rank's in the peer's): freed, they went back to the caching allocator."""
    make, _, _ = fake_cuda_links
    monkeypatch.setattr(links_module, "_KEPT_AFTER_FAILURE", [])
    out, into = Route(0, 1, ("u",), 64), Route(1, 0, ("v",), 32)
    for failed in (True, False):
        links = make()
        recorded = []
        slots = torch.zeros(512, dtype=torch.uint8)
        slots.record_stream = lambda stream: recorded.append(stream)  # the allocator's hook, faked
        links.alloc = lambda slot_bytes, n: links_module._Memory(("mine",), data=slots, counters=2000)
        box = Mailbox(0, [out, into], links)
        box.connect({1: {"token": ((b"slots", 0), (b"counters", 0)), "routes": {out: (4, [0, 256]), into: (2, None)}}})
        if failed:
            box.release()
        box.close()
        unmapped = [e for e in links.C.log if e[0] == "unmap"]
        if failed:
            assert unmapped == [] and recorded == [], links.C.log
            assert links_module._KEPT_AFTER_FAILURE[0][0].data is slots
        else:  # freed with no host wait: the allocator waits for the copies out on the receive stream
            assert unmapped == [("unmap", b"slots"), ("unmap", b"counters")]
            assert recorded == [links.recv] and box.memory.data is None


def test_a_failure_while_draining_releases_the_counters(monkeypatch):
    """close() after a generation cut short drains its messages; a peer that died meanwhile
    raised there, and the mailboxes were then closed unreleased: streams left waiting on
    counters, slots freed under late copies."""
    ex = _executor(0, links=_Links())
    wires = _open_wires(ex)
    box = wires.mailbox

    def dead(posted):
        raise PeerFailure("rank 1 closed its connection")

    monkeypatch.setattr(ex, "_complete", dead)
    ex._posted = {3: ([], [])}
    ex.close()
    assert ex._links.log == ["released", "released", "kept"]  # both counters of the mailbox, then kept
    assert box._released


# ---------------------------------------------------------------- 6: host waits under ipc
class _Unbounded(BaseException):
    """A host wait the timeout does not bound (BaseException: no `except Exception` hides it)."""


class _Stuck:
    """A GPU stream that waits on a counter of a peer that died: its events never complete."""

    def __init__(self, handle):
        self.cuda_stream = handle

    def synchronize(self):
        raise _Unbounded("stream.synchronize() on a stream stuck on a dead peer")

    def wait_stream(self, other):
        pass


class _Event:
    def record(self, stream):
        pass

    def query(self):
        return False


@pytest.fixture
def stuck_gpu(monkeypatch):
    current = _Stuck(7)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())

    def synchronize(device=None):
        raise _Unbounded("torch.cuda.synchronize() with a stream stuck on a dead peer")

    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    links = _Links()
    links.streams = lambda: [_Stuck(11), _Stuck(12)]
    links.alive = lambda peer: True
    ex = _executor(0, device="cpu", links=links)
    ex.device = torch.device("cuda", 0)  # its tensors stay on the CPU: only the waits are GPU waits
    ex._stream = _Stuck(8)
    return ex


def test_new_message_slots_wait_for_the_gpu_within_the_timeout(stuck_gpu):
    """The mailbox of a new input layout synchronized the whole GPU first."""
    stuck_gpu._program = _program_between_ranks_0_and_1()
    wires = _Wires(_SKELETONS, torch.device("cpu"))
    with pytest.raises(PeerFailure):
        stuck_gpu._open_mailbox(wires, stuck_gpu._messages(), [])
    assert stuck_gpu.peers.waited == ["finishing with the message slots of an old input layout"]


def test_dropping_an_old_layout_waits_for_its_graphs_within_the_timeout(stuck_gpu):
    stuck_gpu._layouts = OrderedDict((("layout", i), None) for i in range(3))
    with pytest.raises(PeerFailure):
        stuck_gpu._keep_layout(("layout", 3), SimpleNamespace(mailbox=None))
    assert stuck_gpu.peers.waited == ["dropping the graphs of an old input layout"]


def test_a_forward_that_may_be_captured_waits_for_the_messages_within_the_timeout(stuck_gpu, monkeypatch):
    """A graph capture synchronizes its stream, which follows the receives of this step."""
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: 0)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: SimpleNamespace(capture_begin=lambda pool: None,
                                                                          capture_end=lambda: None))
    ex = stuck_gpu
    ex.graphs = GraphCache(enabled=True)
    ex._wires_key, ex._wires = "key", SimpleNamespace(latent=torch.zeros(4))
    ex._table = None
    ex.replica = SimpleNamespace(load=lambda *a, **k: 0, static_inputs=lambda: [],
                                 forward=lambda latent, cache, compute: (latent, {}))
    with torch.no_grad(), pytest.raises(PeerFailure):
        ex._run("async", 0, {})
    assert ex.peers.waited == ["step 0's messages before a graph capture"]


def test_a_wait_for_the_gpu_names_the_rank_that_died(stuck_gpu):
    """Of several peers, the one whose process is gone is named (the wait blamed the first)."""
    from asyncdiff_rt.engine.peers import Peers

    peers = Peers.__new__(Peers)
    peers.rank, peers.size, peers.timeout_s, peers.failure, peers.step = 2, 3, 2.0, None, 5
    peers.group, peers._store = SimpleNamespace(abort=lambda: None), None
    stuck_gpu.rank, stuck_gpu.peers = 2, peers
    stuck_gpu._links.alive = lambda rank: rank != 1
    with pytest.raises(PeerFailure, match=r"^rank 1 closed its connection.*rank 2 stopped at step 5 while waiting"):
        stuck_gpu._settle("waiting for step 5's messages on this rank's GPU")


def test_closing_waits_for_the_last_messages_within_the_timeout(stuck_gpu):
    """close() unmapped the peers' slots while this rank's last copies into them could still
    be queued; now it waits for its streams first, and a peer that died meanwhile makes it
    release and keep everything instead."""
    wires = _Wires(_SKELETONS, torch.device("cpu"))
    routes = [Route(0, 1, ("a",), wires.message(wires.outbox, 1, ("a",))[1].numel()),
              Route(1, 0, ("b",), wires.message(wires.inbox, 1, ("b",))[1].numel())]
    wires.mailbox = Mailbox(0, routes, stuck_gpu._links)
    wires.mailbox.connect({1: {"token": ("theirs",), "routes": {routes[0]: (1, [0, 256]), routes[1]: (0, None)}}})
    stuck_gpu._loose, stuck_gpu.replica = wires, SimpleNamespace(close=lambda: None)
    stuck_gpu.close()
    assert stuck_gpu.peers.waited == ["finishing this rank's last messages"]
    assert stuck_gpu._links.log == ["released", "released", "kept"]
