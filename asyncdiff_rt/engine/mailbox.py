"""Same-node transport of the per-step cache messages: static double-buffered receive
slots that the sender writes directly, ordered by counters instead of a host round trip.

Every message of the program (a `Route`: sender, receiver, units) has two receive slots
in the receiver's memory and two counters, each in the memory of the rank that waits
on it and written by its peer:
  ready  (receiver's memory): how many of the route's messages were delivered;
  free   (sender's memory):   how many the receiver has copied out of its slots.
The n-th send waits until free >= n - 2 (the slot's previous message was copied out),
copies into slot n % 2, then sets ready = n. The n-th receive waits until ready >= n,
copies slot n % 2 into the receiver's buffer, then sets free = n. Both sides count the
same sends of the same program, so the counts agree; a count wraps at 2**32 and is
compared as a wrapping counter.

`links.py` supplies the memory, copies and counters: CUDA IPC with copy-engine copies
and stream-ordered signals on GPUs (neither host waits), POSIX shared memory with host
polls on the CPU (the same protocol, runnable and tested without a GPU).
"""
from dataclasses import dataclass

SLOTS = 2
MASK = 0xFFFFFFFF
RELEASE_MARGIN = 1 << 20
SLOT_ALIGN = 256  # slot offsets: aligned for any dtype view and for copy engines


@dataclass(frozen=True, order=True)
class Route:
    src: int
    dst: int
    units: tuple
    nbytes: int  # the message buffer's size


class Mailbox:
    """One rank's end of every route of one input layout: the slots and counters in its
    own memory, and (after `connect`) its peers' slots and counters it writes."""

    def __init__(self, rank, routes, links):
        self.rank, self.links = rank, links
        self.incoming = sorted(r for r in routes if r.dst == rank)
        self.outgoing = sorted(r for r in routes if r.src == rank)
        counters = self.incoming + self.outgoing  # ready counters, then free counters
        self._counter = {route: i for i, route in enumerate(counters)}
        self._slots, offset = {}, 0
        for route in self.incoming:
            self._slots[route] = []
            for _ in range(SLOTS):
                self._slots[route].append(offset)
                offset = aligned(offset + route.nbytes)
        self.memory = links.alloc(offset, len(counters))
        self._sent = {route: 0 for route in self.outgoing}
        self._received = {route: 0 for route in self.incoming}
        self._mapped = {}  # rank -> (its memory mapped here, {route: (counter index, slot offsets)})
        self._released = False

    def export_for(self, peer):
        """What `peer` needs to write into this rank's memory: its token, and per route
        between us the slot offsets and counter index."""
        return {"token": self.memory.token,
                "routes": {route: (self._counter[route], self._slots.get(route))
                           for route in self.incoming + self.outgoing if peer in (route.src, route.dst)}}

    def peers(self):
        return sorted({r.src for r in self.incoming} | {r.dst for r in self.outgoing})

    def connect(self, exports):
        """Open every peer's memory ({rank: its export_for(this rank)})."""
        for peer in self.peers():
            self._mapped[peer] = (self.links.open(exports[peer]["token"], peer), exports[peer]["routes"])

    # ---------------------------------------------------------------- the protocol
    def send(self, route, buffer):
        """Deliver `buffer` (this rank's packed message for `route`) into the receiver's slot."""
        _check_size(route, buffer)
        n = _next(self._sent[route])
        remote, routes = self._mapped[route.dst]
        counter, slots = routes[route]
        with self.links.sending():
            self.links.wait(self.memory, self._counter[route], (n - SLOTS) & MASK, route.dst,
                            f"waiting for rank {route.dst} to free a receive slot")
            self.links.copy_to(remote, slots[n % SLOTS], buffer)
            self.links.signal(remote, counter, n)
            self.links.sent(route)
        self._sent[route] = n

    def receive(self, route, buffer):
        """Copy `route`'s next message into `buffer`, then free its slot for the sender."""
        _check_size(route, buffer)
        n = _next(self._received[route])
        remote, routes = self._mapped[route.src]
        with self.links.receiving():
            self.links.wait(self.memory, self._counter[route], n, route.src,
                            f"receiving rank {route.src}'s cached outputs")
            self.links.copy_from(self.memory, self._slots[route][n % SLOTS], buffer)
            self.links.signal(remote, routes[route][0], n)
        self._received[route] = n

    def before_pack(self, route):
        """Call before overwriting the buffer last passed to `send(route, ...)`."""
        self.links.reuse(route)

    def release(self):
        """After a failure: let every wait on this rank's counters pass (a GPU stream
        blocked on one would otherwise never finish)."""
        self._released = True
        counts = {**self._received, **self._sent}  # no wait targets more than its own count
        for route, count in counts.items():
            self.links.force(self.memory, self._counter[route], count + RELEASE_MARGIN)

    def close(self):
        """Unmap the peers' memory and free this rank's; after a release, keep both
        (links.keep): copies queued behind the released waits may still run."""
        remotes = [remote for remote, _ in self._mapped.values()]
        self._mapped.clear()
        if self._released:
            self.links.keep(self.memory, remotes)
            return
        for remote in remotes:
            self.links.close_remote(remote)
        self.links.free(self.memory)


def reached(value, target):
    """Whether wrapping 32-bit counter `value` has reached `target`."""
    return ((value - target) & MASK) < 0x80000000


def _check_size(route, buffer):
    if buffer.numel() * buffer.element_size() != route.nbytes:
        raise ValueError(f"a message of {buffer.numel() * buffer.element_size()} bytes for a route of "
                         f"{route.nbytes} (rank {route.src} to {route.dst}, {route.units})")


def _next(n):
    return (n + 1) & MASK


def aligned(n):
    return -(-n // SLOT_ALIGN) * SLOT_ALIGN
