"""The memory, copies and counters that carry mailbox.py's protocol between the
processes of one node.

`CudaIpcLinks` (GPUs): each rank's slots and its counters are device allocations that
its peers map through CUDA IPC handles. A send runs on a stream of its own: wait for the
packed message, wait on the free counter, copy-engine copy into the peer's slot, then
write the peer's ready counter (cuStreamWriteValue32: fenced after the copy). A receive
runs on another, between the current stream's work before and after it: wait on the
ready counter (flushing remote writes where the GPU can), copy the slot out, write the
peer's free counter. No host waits anywhere. Every operation names its stream: the
extension would take handle 0 as the legacy stream of whichever device it checks.

`SharedMemoryLinks` (CPU): POSIX shared memory; waits poll the counter on the host,
bounded by the timeout, and notice a peer that died or reported a failure.
"""
import atexit
import contextlib
import ctypes
from dataclasses import dataclass
import os
import platform
from multiprocessing import resource_tracker, shared_memory

import numpy as np
import torch

from .mailbox import aligned, reached


@dataclass
class _Memory:
    """A rank's slots and counters, its own or a peer's as mapped here."""
    token: tuple  # what a peer needs to map it
    data: torch.Tensor = None  # the bytes (None for a peer's device memory)
    counters: object = None  # the counters: an array (shared memory) or an address (device)
    shm: shared_memory.SharedMemory = None
    ptr: int = 0  # device memory: the slots' address in this GPU's address space


class SharedMemoryLinks:
    kind = "shm"

    def __init__(self, peers, pids):
        self.peers, self.pids = peers, pids  # pids: rank -> process id, to notice a peer that died

    @staticmethod
    def unusable():
        """Why this machine cannot run the protocol on shared memory, or None."""
        if platform.machine().lower() not in ("x86_64", "amd64"):
            return (f"shared-memory messages rely on x86-64's store ordering (payload before counter); this "
                    f"machine is {platform.machine()}")
        return None

    def alloc(self, slot_bytes, n_counters):
        """One segment: the counters, then (aligned) the slots; zero-filled."""
        start = aligned(4 * n_counters)
        shm = shared_memory.SharedMemory(create=True, size=max(start + slot_bytes, 1))
        return _opened(self._view(shm, (shm.name, n_counters, start)), own=True)

    def open(self, token, peer):
        shm = shared_memory.SharedMemory(name=token[0])
        # The creator unlinks it; Python < 3.13 would also register it for this process.
        with contextlib.suppress(Exception):
            resource_tracker.unregister(shm._name, "shared_memory")
        return _opened(self._view(shm, token), own=False)

    @staticmethod
    def _view(shm, token):
        _, n_counters, start = token
        return _Memory(token, data=torch.frombuffer(shm.buf, dtype=torch.uint8)[start:],
                       counters=np.frombuffer(shm.buf, dtype=np.uint32, count=n_counters), shm=shm)

    @contextlib.contextmanager
    def sending(self):
        yield

    receiving = sending

    def wait(self, memory, index, target, peer, what):
        counters = memory.counters
        if not reached(int(counters[index]), target):
            self.peers.wait_until(lambda: reached(int(counters[index]), target), [peer], what, alive=self.alive)

    def alive(self, peer):
        return _alive(self.pids[peer])

    def copy_to(self, remote, offset, buffer):
        remote.data[offset:offset + buffer.numel()].copy_(buffer)

    def copy_from(self, memory, offset, buffer):
        buffer.copy_(memory.data[offset:offset + buffer.numel()])

    def signal(self, remote, index, value):
        remote.counters[index] = value  # after the copy: x86-64 keeps stores in order

    def force(self, memory, index, value):
        memory.counters[index] = value & 0xFFFFFFFF

    def reuse(self, route):
        pass  # sends are done when send() returns

    def sent(self, route):
        pass

    def close_remote(self, remote):
        _close(remote, unlink=False)

    def free(self, memory):
        _close(memory, unlink=True)

    def keep(self, memory, remotes):
        """After a failure, as always: a peer's late copy lands in its own mapping of the
        segment, which outlives this rank's unmapping and unlinking."""
        for remote in remotes:
            self.close_remote(remote)
        self.free(memory)


_MAPPED = {}  # id -> (_Memory, whether this process made it): shared memory still mapped here
os.register_at_fork(after_in_child=_MAPPED.clear)  # a forked child neither closes nor unlinks its parent's


def _opened(memory, own):
    _MAPPED[id(memory)] = memory, own
    return memory


def _close(memory, unlink):
    _MAPPED.pop(id(memory), None)
    shm, memory.data, memory.counters = memory.shm, None, None  # the views go first
    with contextlib.suppress(BufferError):  # a view still alive: the mapping goes at exit
        shm.close()
    if unlink:
        with contextlib.suppress(FileNotFoundError):
            shm.unlink()


@atexit.register
def _close_at_exit():
    """A process that ends without handle.remove(): unmap while the interpreter is alive
    (at shutdown SharedMemory's finaliser meets our views and prints a BufferError) and
    unlink what this process made (else the resource tracker reports it leaked)."""
    for memory, own in list(_MAPPED.values()):
        _close(memory, unlink=own)


class CudaIpcLinks:
    kind = "ipc"

    def __init__(self, device, pids):
        from .. import _C

        self.C, self.device, self.pids = _C, device.index, pids
        self.comm, self.recv = torch.cuda.Stream(device), torch.cuda.Stream(device)
        self._release = _release_stream(self.device)
        self._flush = True  # CU_STREAM_WAIT_VALUE_FLUSH, until the GPU says it cannot
        self._sent = {}  # route -> event after its last copy (its buffer may be packed again after it)

    def alloc(self, slot_bytes, n_counters):
        """The slots, and the counters in an allocation of their own that is never freed:
        a peer's last signal may land after this rank is done with the slots."""
        device = f"cuda:{self.device}"
        data = torch.empty(max(slot_bytes, 1), dtype=torch.uint8, device=device)
        counters = torch.zeros(max(n_counters, 1), dtype=torch.int32, device=device)
        _KEPT_COUNTERS.append(counters)
        torch.cuda.synchronize(self.device)  # zeroed before any peer maps it
        token = (self.C.ipc_export(data.data_ptr(), self.device), self.C.ipc_export(counters.data_ptr(), self.device))
        return _Memory(token, data=data, ptr=data.data_ptr(), counters=counters.data_ptr())

    def open(self, token, peer):
        (slots, slot_offset), (counters, counter_offset) = token
        # Mapped into this GPU's address space (peer access enabled as needed): copies and
        # signals address it as this GPU's, with no context on the peer's.
        return _Memory(token, ptr=self.C.ipc_open(slots, slot_offset, self.device),
                       counters=self.C.ipc_open(counters, counter_offset, self.device))

    @contextlib.contextmanager
    def sending(self):
        """Sends run on the communication stream, after what the current stream did."""
        current = torch.cuda.current_stream(self.device)
        self.comm.wait_stream(current)
        with torch.cuda.stream(self.comm):
            yield

    @contextlib.contextmanager
    def receiving(self):
        """Receives run after the current stream's work, and the current stream's later
        work (the forward that reads the buffer) after them."""
        current = torch.cuda.current_stream(self.device)
        self.recv.wait_stream(current)
        with torch.cuda.stream(self.recv):
            yield
        current.wait_stream(self.recv)

    def _stream(self):
        return torch.cuda.current_stream(self.device).cuda_stream

    def wait(self, memory, index, target, peer, what):
        while True:
            try:
                return self.C.signal_wait(self._stream(), memory.counters + 4 * index, target & 0xFFFFFFFF,
                                          self.device, mode="geq", flush=self._flush)
            except self.C.CudaError:  # no remote-write flush on this GPU: the writer's fence orders
                if not self._flush:
                    raise
                self._flush = False

    def copy_to(self, remote, offset, buffer):
        self.C.copy_batch([(remote.ptr + offset, self.device, buffer.data_ptr(), self.device, buffer.numel())],
                          self._stream(), check_pointers=False)

    def copy_from(self, memory, offset, buffer):
        buffer.copy_(memory.data[offset:offset + buffer.numel()], non_blocking=True)

    def signal(self, remote, index, value):
        # A peer's flag: no pointer lookup (it would report the peer's GPU and make it current).
        self.C.signal_write(self._stream(), remote.counters + 4 * index, value & 0xFFFFFFFF, self.device,
                            check_pointer=False)

    def force(self, memory, index, value):
        # On the release stream: behind no wait that this rank's streams may be stuck on.
        self.C.signal_write(self._release, memory.counters + 4 * index, value & 0xFFFFFFFF, self.device)

    def streams(self):
        """The streams this rank's messages run on (the executor bounds its waits for them)."""
        return [self.comm, self.recv]

    def alive(self, peer):
        return _alive(self.pids[peer])

    def reuse(self, route):
        event = self._sent.get(route)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def sent(self, route):
        event = self._sent.setdefault(route, torch.cuda.Event())
        event.record(self.comm)

    def close_remote(self, remote):
        for handle, _ in remote.token:
            self.C.ipc_close(handle, self.device)

    def free(self, memory):
        # The allocator reuses the slots once the copies out of them queued so far are done,
        # with no host wait (a wait on a stream stuck on a dead peer's counter never ends).
        memory.data.record_stream(self.recv)
        memory.data = None

    def keep(self, memory, remotes):
        """After a failure: keep this rank's slots and its mappings of the peers' for the
        process's life. A peer's copy queued behind a released counter may still land in
        these slots, and this rank's own queued copies in the peers'; freed, they would
        land in whatever the allocator put there next (or fault on an unmapped address)."""
        _KEPT_AFTER_FAILURE.append((memory, remotes))


_KEPT_COUNTERS = []  # a few bytes per mailbox, for the process's life
_KEPT_AFTER_FAILURE = []  # (slots, peers' mappings) of mailboxes released after a failure
_RELEASE_STREAMS = {}  # GPU index -> the handle of its release stream
CU_STREAM_NON_BLOCKING = 0x1


def _release_stream(device):
    """A stream of this process's own on GPU `device`, made once and never destroyed, to
    release counters after a failure. Not from torch's pool: its streams are handed out
    round-robin (32 per priority), so a stream taken from it may be this rank's
    communication stream, stuck on the wait it should release. Non-blocking, so that it
    does not wait for the legacy default stream either."""
    if device not in _RELEASE_STREAMS:
        _RELEASE_STREAMS[device] = _driver_stream(device, CU_STREAM_NON_BLOCKING)
    return _RELEASE_STREAMS[device]


def _driver_stream(device, flags):
    """cuStreamCreate in GPU `device`'s primary context (the one torch uses): its handle."""
    driver = _driver()
    dev, context, stream = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_void_p()

    def check(result, call):
        if result != 0:
            raise RuntimeError(f"{call} failed with CUresult {result} (creating the release stream of GPU {device})")

    check(driver.cuDeviceGet(ctypes.byref(dev), device), "cuDeviceGet")
    check(driver.cuDevicePrimaryCtxRetain(ctypes.byref(context), dev), "cuDevicePrimaryCtxRetain")
    check(driver.cuCtxPushCurrent_v2(context), "cuCtxPushCurrent")
    try:
        check(driver.cuStreamCreate(ctypes.byref(stream), flags), "cuStreamCreate")
    finally:
        driver.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))
    return stream.value


def _driver():
    return ctypes.CDLL("libcuda.so.1")  # loaded already wherever torch uses the GPU


def _alive(pid):
    """Whether process `pid` runs (a killed child its parent has not reaped yet is a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
