"""The mailbox protocol (engine/mailbox.py) between two processes, with delays put in
on purpose: every message arrives whole and in order, and the same test with one of
the protocol's waits removed finds the race. On the CPU over shared memory; on a GPU
over CUDA IPC (two processes on one GPU) with the delays on the streams."""
import contextlib
import json
from pathlib import Path

import pytest
import torch

from asyncdiff_rt.engine.mailbox import SLOTS, Mailbox, Route, reached

from ranks import run_ranks

WORKER = Path(__file__).with_name("mailbox_worker.py")


def _run(tmp_path, *args, codes=(0, 0)):
    done = run_ranks(WORKER, [tmp_path, *args], 2, tmp_path, timeout=120)
    assert tuple(code for code, _ in done) == codes, [log for _, log in done]
    return [json.loads(path.read_text()) for path in (tmp_path / "rank0.json", tmp_path / "rank1.json")
            if path.exists()]


def _wrong(records):
    return [record["wrong"] for record in records]


@pytest.mark.distributed
def test_every_message_arrives_whole_over_shared_memory(tmp_path):
    assert _wrong(_run(tmp_path)) == [[], []]


@pytest.mark.distributed
@pytest.mark.parametrize("stop", ["kill", "fail"])
def test_a_waiting_receiver_learns_its_sender_stopped(tmp_path, stop):
    """The sender dies (SIGKILL) or reports a failure mid-stream; the receiver, polling
    shared memory with a 30 s timeout, raises at once, naming the sender and the cause."""
    records = _run(tmp_path, "--stop", stop, "--after", "5", codes=(-9 if stop == "kill" else 0, 0))
    receiver = records[-1]
    assert receiver["type"] == "PeerFailure" and receiver["received"] == 5, receiver  # waiting for the 6th
    # not the 30 s timeout: 0.08-0.40 s measured (3 runs of each, 2026-12-03, a busy 2-core machine)
    assert receiver["seconds"] < 10.0, receiver
    expected = "rank 0 closed its connection" if stop == "kill" else "rank 0 failed at step None: RuntimeError"
    assert expected in receiver["error"], receiver["error"]


@pytest.mark.distributed
@pytest.mark.parametrize("unsafe", ["free", "ready"])
def test_the_test_finds_a_missing_wait(tmp_path, unsafe):
    """Without the free wait a fast sender overwrites slots not yet copied out; without
    the ready wait a fast receiver copies a slot before its message lands."""
    wrong = _wrong(_run(tmp_path, "--unsafe", unsafe))
    assert wrong[0] or wrong[1], "the race went unnoticed"


@pytest.mark.gpu
@pytest.mark.distributed
@pytest.mark.parametrize("unsafe", [None, "free", "ready"])
def test_cuda_ipc_between_two_processes_on_one_gpu(tmp_path, unsafe):
    pytest.importorskip("asyncdiff_rt._C")
    wrong = _wrong(_run(tmp_path, "--cuda", *(["--unsafe", unsafe] if unsafe else [])))
    if unsafe is None:
        assert wrong == [[], []]
    else:
        assert wrong[0] or wrong[1], "the race went unnoticed"


def test_counters_wrap():
    assert reached(5, 5) and reached(6, 5) and not reached(4, 5)
    assert reached(3, 0xFFFFFFFE) and not reached(0xFFFFFFFE, 3)  # 3 comes after the wrap
    assert reached(0, (1 - SLOTS) & 0xFFFFFFFF)  # the first send waits for nothing


class _Recorder:
    """Links that record what the protocol does, in one process."""

    def __init__(self):
        self.log = []

    def alloc(self, slot_bytes, n_counters):
        self.slot_bytes = slot_bytes
        return type("M", (), {"token": ("mine",), "counters": [0] * n_counters})()

    def open(self, token, peer):
        return token

    def sending(self):
        return contextlib.nullcontext()

    receiving = sending

    def wait(self, memory, index, target, peer, what):
        self.log.append(("wait", index, target))

    def copy_to(self, remote, offset, buffer):
        self.log.append(("copy_to", offset))

    def copy_from(self, memory, offset, buffer):
        self.log.append(("copy_from", offset))

    def signal(self, remote, index, value):
        self.log.append(("signal", index, value))

    def force(self, memory, index, value):
        self.log.append(("force", index, value))

    def sent(self, route):
        pass


def test_slots_alternate_and_counters_count():
    """The n-th message of a route uses slot n % 2, waits for the (n - 2)-th to be freed,
    and a release lets every wait pass."""
    out, into = Route(0, 1, ("u",), 300), Route(1, 0, ("v",), 100)
    links = _Recorder()
    box = Mailbox(0, [out, into], links)
    assert links.slot_bytes == 2 * 256  # two aligned slots for the one incoming route
    box.connect({1: {"token": ("theirs",), "routes": {out: (7, [0, 512]), into: (3, None)}}})
    for _ in range(3):
        box.send(out, torch.zeros(300, dtype=torch.uint8))
    assert links.log == [("wait", 1, 0xFFFFFFFF), ("copy_to", 512), ("signal", 7, 1),
                     ("wait", 1, 0), ("copy_to", 0), ("signal", 7, 2),
                     ("wait", 1, 1), ("copy_to", 512), ("signal", 7, 3)]
    links.log.clear()
    box.receive(into, torch.zeros(100, dtype=torch.uint8))
    assert links.log == [("wait", 0, 1), ("copy_from", 256), ("signal", 3, 1)]
    links.log.clear()
    box.release()
    assert sorted(links.log) == [("force", 0, 1 + (1 << 20)), ("force", 1, 3 + (1 << 20))]


class _FakeC:
    """The extension's calls the CUDA links make, recorded; signal_wait refuses the flush
    once, as a GPU without remote-write flushes does."""

    class CudaError(RuntimeError):
        pass

    def __init__(self):
        self.log, self.refuse_flush = [], True

    def signal_wait(self, stream, ptr, value, device, mode, flush, check_pointer=True):
        if flush and self.refuse_flush:
            raise self.CudaError("CUDA_ERROR_NOT_SUPPORTED")
        self.log.append(("wait", stream, ptr, value, device, mode, flush, check_pointer))

    def signal_write(self, stream, ptr, value, device, check_pointer=True):
        self.log.append(("write", stream, ptr, value, device, check_pointer))

    def copy_batch(self, entries, stream, check_pointers=True):
        self.log.append(("copy", entries, stream, check_pointers))


class _FakeStream:
    def __init__(self, handle):
        self.cuda_stream, self.waited = handle, []

    def wait_stream(self, other):
        self.waited.append(other.cuda_stream)

    def wait_event(self, event):
        self.waited.append(event)


def test_cuda_links_name_their_streams_and_map_peers_as_local(monkeypatch):
    """The CUDA IPC links without a GPU (the extension and streams faked): sends run on the
    communication stream after the current one, receives on their own stream between the
    current stream's work, no call passes stream handle 0 (the extension would read it as
    the checked device's legacy stream), a peer's flag is written without a pointer lookup,
    and a GPU that cannot flush remote writes gets waits without the flag."""
    from asyncdiff_rt.engine import links as links_module

    current = _FakeStream(7)
    streams = [current]
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: streams[-1])

    @contextlib.contextmanager
    def on(stream):
        streams.append(stream)
        yield
        streams.pop()

    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(torch.cuda, "Event", lambda: type("E", (), {"record": lambda self, s: None})())
    links = links_module.CudaIpcLinks.__new__(links_module.CudaIpcLinks)
    links.C, links.device = _FakeC(), 3
    links.comm, links.recv, links._flush, links._sent = _FakeStream(11), _FakeStream(12), True, {}
    out, into = Route(0, 1, ("u",), 64), Route(1, 0, ("v",), 32)
    monkeypatch.setattr(links, "alloc", lambda slot_bytes, n: links_module._Memory(
        ("mine",), data=torch.arange(slot_bytes, dtype=torch.int32).to(torch.uint8), ptr=1000, counters=2000))
    box = Mailbox(0, [out, into], links)
    box._mapped[1] = (links_module._Memory(("theirs",), ptr=5000, counters=9000),
                      {out: (4, [0, 256]), into: (2, None)})
    sent = torch.zeros(64, dtype=torch.uint8)
    box.send(out, sent)
    received = torch.zeros(32, dtype=torch.uint8)
    box.receive(into, received)
    assert links.C.log == [
        ("wait", 11, 2000 + 4 * 1, 0xFFFFFFFF, 3, "geq", False, True),  # free counter, after the refused flush
        ("copy", [(5000 + 256, 3, sent.data_ptr(), 3, 64)], 11, False),  # into the peer's slot 1
        ("write", 11, 9000 + 4 * 4, 1, 3, False),  # the peer's ready counter
        ("wait", 12, 2000 + 4 * 0, 1, 3, "geq", False, True),  # this rank's ready counter
        ("write", 12, 9000 + 4 * 2, 1, 3, False),  # the peer's free counter
    ]
    assert torch.equal(received, torch.arange(256, 288, dtype=torch.int32).to(torch.uint8))  # slot 1, copied out
    assert links.comm.waited == [7] and links.recv.waited == [7] and current.waited == [12]
