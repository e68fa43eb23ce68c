"""One rank of a mailbox protocol test (launched by tests/test_mailbox.py with torchrun's
environment variables): two ranks, a route each way, MESSAGES numbered messages per
route, each a buffer filled with its number.

    python tests/mailbox_worker.py OUT [--cuda] [--unsafe free|ready] [--stop kill|fail --after M]

Rank 0 sends all its messages, then receives rank 1's; rank 1 receives, then sends, so
a sender can run ahead of its receiver by as much as the protocol lets it. The first
messages have a slow receiver (delayed on purpose: the sender must wait for a free
slot), the next a slow sender (the receiver must wait for the data), the rest random
delays on both sides. On a GPU the delays are `torch.cuda._sleep` on the streams (the
hosts never wait), and the receiver checks every message after the last.

`--unsafe` removes one of the protocol's waits, to show that the test catches the race.
`--stop` makes rank 0 die (SIGKILL) or report a failure, then sleep, after M sends.
Writes OUT/rank<r>.json: the message numbers that arrived wrong, or the error raised,
the messages received before it and the seconds from the last of them to it.
"""
import argparse
import json
import os
import random
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from asyncdiff_rt.engine.links import CudaIpcLinks, SharedMemoryLinks
from asyncdiff_rt.engine.mailbox import Mailbox, Route
from asyncdiff_rt.engine.peers import Peers

MESSAGES = 40
SLOW = 10  # messages with a slow receiver, then as many with a slow sender
DELAY_S = 0.003
ROUTES = [Route(0, 1, ("a",), 4096 + 13), Route(1, 0, ("b",), 1000)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--cuda", action="store_true")
    p.add_argument("--unsafe", choices=("free", "ready"))
    p.add_argument("--stop", choices=("kill", "fail"))
    p.add_argument("--after", type=int, default=5)
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, peer = dist.get_rank(), 1 - dist.get_rank()
    peers = Peers(dist.group.WORLD, timeout_s=30)
    peers.clear_failures()
    device = torch.device("cuda:0" if args.cuda else "cpu")
    pids = peers.exchange_objects({peer: os.getpid()}, "pids", "cpu")
    links = CudaIpcLinks(device, pids) if args.cuda else SharedMemoryLinks(peers, pids)
    mailbox = Mailbox(rank, ROUTES, links)
    if args.unsafe:
        _remove_wait(mailbox, args.unsafe)
    mailbox.connect(peers.exchange_objects({peer: mailbox.export_for(peer)}, "exports", "cpu"))
    out_route, in_route = ROUTES[rank], ROUTES[peer]
    record = {"wrong": []}
    if rank == 0:
        _send_all(mailbox, out_route, device, rank, args.stop and (args.stop, args.after, peers))
        record["wrong"] = _receive_all(mailbox, in_route, device, rank)
    else:
        try:
            record["wrong"] = _receive_all(mailbox, in_route, device, rank)
        except Exception as e:
            record.update(error=str(e), type=type(e).__name__, seconds=time.monotonic() - _LAST["at"],
                          received=_LAST["received"])
            (Path(args.out) / f"rank{rank}.json").write_text(json.dumps(record))
            return
        _send_all(mailbox, out_route, device, rank)
    if args.cuda:
        torch.cuda.synchronize()
    peers.exchange_objects({peer: "done"}, "finishing", "cpu")  # neither closes while the other copies
    mailbox.close()
    (Path(args.out) / f"rank{rank}.json").write_text(json.dumps(record))


def _delay(device, seconds):
    if device.type == "cuda":
        torch.cuda._sleep(int(seconds * 2e9))  # cycles: at least `seconds` on any current GPU clock
    else:
        time.sleep(seconds)


def _slow(side, m, rank):
    """Whether `side` ("sender" or "receiver") waits before message m."""
    if m <= SLOW:
        return side == "receiver"
    if m <= 2 * SLOW:
        return side == "sender"
    return random.Random(f"{rank} {side} {m}").random() < 0.3


_LAST = {"at": 0.0, "received": 0}  # when the last message arrived, and how many had


def _send_all(mailbox, route, device, rank, stop=None):
    buffer = torch.empty(route.nbytes, dtype=torch.uint8, device=device)
    for m in range(1, MESSAGES + 1):
        if stop and m > stop[1]:
            how, _, peers = stop
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            peers.fail(RuntimeError("injected failure"))
            time.sleep(3)  # alive meanwhile: the peer must learn it from the record
            os._exit(0)
        mailbox.before_pack(route)
        if _slow("sender", m, rank):
            _delay(device, DELAY_S)
        buffer.fill_(m)
        mailbox.send(route, buffer)


def _receive_all(mailbox, route, device, rank):
    buffers = [torch.empty(route.nbytes, dtype=torch.uint8, device=device) for _ in range(MESSAGES)]
    for m in range(1, MESSAGES + 1):
        if _slow("receiver", m, rank):
            _delay(device, DELAY_S)
        mailbox.receive(route, buffers[m - 1])
        _LAST.update(at=time.monotonic(), received=m)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return [m for m in range(1, MESSAGES + 1) if not bool((buffers[m - 1] == m).all())]


def _remove_wait(mailbox, which):
    """Skip the waits on the free counters (the sender's) or the ready ones (the receiver's)."""
    links, wait = mailbox.links, mailbox.links.wait
    skipped = {mailbox._counter[r] for r in (mailbox.outgoing if which == "free" else mailbox.incoming)}

    def maybe_wait(memory, index, target, peer, what):
        if index not in skipped:
            wait(memory, index, target, peer, what)

    links.wait = maybe_wait


if __name__ == "__main__":
    main()
    dist.destroy_process_group()  # gloo's threads must not outlive the interpreter
