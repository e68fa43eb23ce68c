"""Counters every executor keeps, reported by `handle.stats()`."""
from collections import Counter


class ExecutorStats:
    def __init__(self, n_devices):
        self.n_devices = n_devices
        self.reset()

    def reset(self):
        self.steps = Counter()
        self.forwards = [0] * (self.n_devices + 1)  # last slot: whole (warm-up) forwards
        self.received_bytes = [0] * self.n_devices
        self.argument_bytes = [0] * self.n_devices  # call arguments loaded by each device's forwards
        self.transfers = 0
        self.generations = 0

    def absorb(self, other):
        """Add the counts of `other` (the same plan's executor, replaced)."""
        self.steps.update(other.steps)
        self.forwards = [a + b for a, b in zip(self.forwards, other.forwards)]
        self.received_bytes = [a + b for a, b in zip(self.received_bytes, other.received_bytes)]
        self.argument_bytes = [a + b for a, b in zip(self.argument_bytes, other.argument_bytes)]
        self.transfers += other.transfers
        self.generations += other.generations

    def add_received(self, device, nbytes):
        self.received_bytes[device] += nbytes
        self.transfers += 1

    def as_dict(self):
        return {
            "generations": self.generations,
            "steps": dict(self.steps),
            "forwards_per_device": self.forwards[:-1],
            "warmup_forwards": self.forwards[-1],
            "transfers": self.transfers,
            "received_bytes_per_device": list(self.received_bytes),
            "argument_bytes_per_device": list(self.argument_bytes),
        }
