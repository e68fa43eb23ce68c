"""Point-to-point messages between the ranks of one process group, with failures made
loud: every wait is bounded, and a rank that fails, dies or hangs makes the others raise
a message naming that rank and the cause instead of waiting forever.

How a failure travels: a rank whose step raises writes the cause into the group's
store (the rendezvous key-value store every torch.distributed group has) and aborts its
side of the group, so the peers' pending receives fail at once; they read the cause
from the store. A killed rank closes its connections without a cause (the message says
so); a hung one is found when a wait passes `timeout_s`. Either way the group cannot
carry this program's messages any more (pending operations were abandoned): the error
says so, and a host framework must make a new group.
"""
import json
import pickle
import time
from datetime import timedelta

import torch
import torch.distributed as dist

POLL_S = 0.0002  # NCCL waits poll their events: the host must not block past the timeout
CHECK_S = 0.02  # shared-memory waits look for a dead or failed peer this often


class PeerFailure(RuntimeError):
    """Another rank of the group failed, died or hung; this rank stopped with it."""


class Peers:
    def __init__(self, group, timeout_s):
        self.group = group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.backend = dist.get_backend(group)
        self.timeout_s = float(timeout_s)
        self.failure = None  # the message of the failure that stopped this rank
        self.step = None  # the step in progress, for messages
        self._store = _default_store()

    def global_rank(self, rank):
        return dist.get_global_rank(self.group, rank) if self.group is not dist.group.WORLD else rank

    # ---------------------------------------------------------------- tensors
    # `what` says what a wait is for, naming the peer: "receiving rank 1's cached outputs ..."
    def isend(self, tensor, peer, what):
        return self._post(dist.isend, tensor, peer, what)

    def irecv(self, tensor, peer, what):
        return self._post(dist.irecv, tensor, peer, what)

    def _post(self, op, tensor, peer, what):
        self._check_usable()
        try:
            return _Pending(op(tensor, self.global_rank(peer), group=self.group), peer, what)
        except Exception as e:  # gloo refuses to post on a connection a dead peer closed
            self._peer_failed(_Pending(None, peer, what), e)

    def batch(self, ops):
        """Post [(dist.isend or dist.irecv, tensor, peer, what)] together (one NCCL group,
        so the order of operations across peers cannot deadlock); the pending list."""
        if self.backend != "nccl":
            return [self._post(op, tensor, peer, what) for op, tensor, peer, what in ops]
        self._check_usable()
        p2p = [dist.P2POp(op, tensor, self.global_rank(peer), group=self.group) for op, tensor, peer, _ in ops]
        try:
            works = dist.batch_isend_irecv(p2p) if p2p else []
        except Exception as e:
            self._peer_failed(_Pending(None, ops[0][2], ops[0][3]), e)
        return [_Pending(w, peer, what) for w, (_, _, peer, what) in zip(works, ops)]

    def wait(self, pending):
        """Wait for every `_Pending` in `pending`, each within the timeout; PeerFailure
        naming the peer if its connection closed, it reported a failure, or it hung."""
        for p in pending:
            self._wait_one(p)

    def _wait_one(self, p):
        self._check_usable()
        deadline = time.monotonic() + self.timeout_s
        try:
            if self.backend == "nccl":  # wait() would only order the stream: poll, then order it
                while not p.work.is_completed():
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"no completion within {self.timeout_s:g} s")
                    time.sleep(POLL_S)
                p.work.wait()
            else:
                p.work.wait(timeout=timedelta(seconds=self.timeout_s))
        except Exception as e:
            self._peer_failed(p, e)

    def wait_until(self, done, watched, what, alive):
        """Poll `done()` (a counter another process writes, a GPU event) within the
        timeout; PeerFailure naming the rank as soon as the process of a rank in `watched`
        is gone (`alive(rank)` false) or a rank recorded a failure."""
        self._check_usable()
        now = time.monotonic()
        deadline, check = now + self.timeout_s, now + CHECK_S
        while not done():
            now = time.monotonic()
            if now > check:
                check = now + CHECK_S
                gone = next((p for p in watched if not alive(p)), None)
                if gone is not None:
                    self._peer_failed(_Pending(None, gone, what), ConnectionError("its process is gone: closed"))
                stopped = next(iter(self._records() or {}), None)
                if stopped is not None:
                    self._peer_failed(_Pending(None, stopped, what), ConnectionError("it stopped: closed"))
                if now > deadline:
                    self._peer_failed(_Pending(None, watched[0], what),
                                      TimeoutError(f"nothing within {self.timeout_s:g} s"))
            time.sleep(POLL_S)

    # ---------------------------------------------------------------- objects
    def exchange_objects(self, objects, what, device):
        """Send objects[peer] to each peer and receive one from each: {peer: object}. Two
        batches (sizes, then bytes), so no order of posting can deadlock."""
        payloads = {peer: _encoded(obj, device) for peer, obj in objects.items()}
        sizes_out = {p: torch.tensor([t.numel()], dtype=torch.int64, device=device) for p, t in payloads.items()}
        sizes_in = {p: torch.zeros(1, dtype=torch.int64, device=device) for p in objects}
        self.wait(self.batch([(dist.isend, t, p, what) for p, t in sizes_out.items()] +
                             [(dist.irecv, t, p, what) for p, t in sizes_in.items()]))
        received = {p: torch.empty(int(t.item()), dtype=torch.uint8, device=device) for p, t in sizes_in.items()}
        self.wait(self.batch([(dist.isend, t, p, what) for p, t in payloads.items()] +
                             [(dist.irecv, t, p, what) for p, t in received.items()]))
        return {p: _decoded(t) for p, t in received.items()}

    def send_object(self, obj, peer, what, device):
        """Send a picklable object (a size, then the bytes); returns the pending sends."""
        payload = _encoded(obj, device)
        size = torch.tensor([payload.numel()], dtype=torch.int64, device=device)
        return [self.isend(size, peer, what), self.isend(payload, peer, what)]

    def recv_object(self, peer, what, device):
        size = torch.zeros(1, dtype=torch.int64, device=device)
        self.wait([self.irecv(size, peer, what)])
        payload = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
        self.wait([self.irecv(payload, peer, what)])
        return _decoded(payload)

    # ---------------------------------------------------------------- failures
    def fail(self, error):
        """This rank's step raised `error`: tell the peers why, then close this side of
        the group so that their waits end now rather than at the timeout."""
        if self.failure is None:
            self.failure = f"rank {self.rank} failed at step {self.step}: {type(error).__name__}: {error}"
            self._record({"kind": "failed", "text": self.failure})
        self._abort()

    def _peer_failed(self, p, error):
        """Raise PeerFailure naming the rank at the root: a waited-for peer that itself
        waited for another (and recorded so) passes the blame along that chain."""
        text = str(error).split("\n")[0]
        lowered = text.lower()
        kind = ("timeout" if isinstance(error, TimeoutError) or "timed out" in lowered else
                "closed" if any(w in lowered for w in ("closed", "reset", "broken pipe")) else "other")
        if kind == "timeout":  # the peer may be waiting too: let its record land
            self._record({"kind": kind, "peer": p.peer})
            time.sleep(min(2.0, self.timeout_s / 2))
        else:
            time.sleep(0.05)  # a peer that failed wrote its record before aborting
        records = self._records()
        chain, how = [p.peer], kind
        while records and chain[-1] in records and records[chain[-1]]["kind"] in ("timeout", "closed"):
            nxt = records[chain[-1]]["peer"]
            if nxt in chain or nxt == self.rank:
                break
            how = records[chain[-1]]["kind"]
            chain.append(nxt)
        culprit = chain[-1]
        root = records.get(culprit) if records else None
        if root is not None and root["kind"] == "failed":
            cause = root["text"]
        elif how == "closed":
            cause = f"rank {culprit} closed its connection: that process died or was killed without reporting an error"
            if records is None:
                cause += (", or it stopped after another rank's failure (the store that would name the cause is "
                          "unreachable: it lived in a process that is gone)")
        elif how == "timeout":
            cause = (f"rank {culprit} sent nothing for {self.timeout_s:g} s: it hangs, is slower than the timeout "
                     "(pass a larger timeout= to parallelize), or failed outside asyncdiff_rt")
        else:
            cause = f"rank {culprit}: {text}"
        via = "".join(f", which waited for rank {r}" for r in chain[1:])
        message = (f"{cause}; rank {self.rank} stopped at step {self.step} while {p.what}{via}. See the ranks' "
                   "logs. The process group cannot carry this program's messages any more: create a new one and "
                   "call parallelize again")
        self.failure = message
        if kind != "timeout":
            self._record({"kind": kind, "peer": p.peer})
        self._abort()
        raise PeerFailure(message) from error

    def _check_usable(self):
        if self.failure is not None:
            raise PeerFailure(f"this distributed executor stopped after a failure ({self.failure}); create a new "
                              "process group and call parallelize again")

    def _key(self, rank):
        return f"asyncdiff_rt/failure/{self.global_rank(rank)}"

    def _record(self, record):
        if self._store is not None:
            try:
                self._store.set(self._key(self.rank), json.dumps(record))
            except Exception:  # the store's host may be the rank that died
                pass

    def _records(self):
        """{rank: record} of the other ranks that recorded a failure; None when the store
        cannot be reached."""
        if self._store is None:
            return None
        records = {}
        for rank in range(self.size):
            try:
                if rank != self.rank and self._store.check([self._key(rank)]):
                    records[rank] = json.loads(self._store.get(self._key(rank)).decode())
            except Exception:
                return records or None
        return records

    def clear_failures(self):
        """Forget failure records of earlier programs (at setup: keys outlive processes
        only as long as the store, but a group may be reused)."""
        if self._store is not None:
            try:
                self._store.delete_key(self._key(self.rank))
            except Exception:
                pass

    def _abort(self):
        try:
            self.group.abort()
        except Exception:  # not every backend can abort; its peers then see the timeout
            pass


class _Pending:
    def __init__(self, work, peer, what):
        self.work, self.peer, self.what = work, peer, what


def _encoded(obj, device):
    return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(device)


def _decoded(payload):
    return pickle.loads(payload.cpu().numpy().tobytes())


def _default_store():
    """The default group's store: every group of the world, a subgroup too, reaches it."""
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # no store reachable: failures are still found, their causes are not named
        return None
