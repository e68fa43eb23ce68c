"""Device lists for the local executor: real GPUs, virtual devices on one GPU, the CPU.

One string per entry (a single string is a list of one):

  "cuda:1"          a GPU
  "cpu"             the CPU
  "cuda:0*4"        4 virtual devices on GPU 0, one stream each
  "cuda:0*4@sm"     4 virtual devices on GPU 0, one SM partition (green context) each
  "cuda:0*1@sm/4"   the first 1 of 4 equal SM partitions of GPU 0 (one partition of the
                    size that 4 partitions get: the baseline of a scaling efficiency)
  "cpu*3"           3 devices on the CPU (streams and events are no-ops)

Parsing touches no device; `open_devices` makes the streams and partitions.
"""
import re
from dataclasses import dataclass, field

import torch

_ENTRY = re.compile(r"^(?P<dev>cpu|cuda(?::\d+)?)(?:\*(?P<n>\d+)(?:@(?P<sm>sm)(?:/(?P<parts>\d+))?)?)?$")


@dataclass(frozen=True)
class DeviceEntry:
    """One parsed entry: `count` devices on `device`; `parts` > 0: SM partitions of it."""

    device: torch.device
    count: int = 1
    virtual: bool = False
    parts: int = 0

    def __str__(self):
        if not self.virtual:
            return str(self.device)
        sm = "" if not self.parts else "@sm" if self.parts == self.count else f"@sm/{self.parts}"
        return f"{self.device}*{self.count}{sm}"


def parse_devices(devices):
    """Entries of a device list; TypeError or ValueError naming the fix for a malformed one."""
    items = [devices] if isinstance(devices, (str, torch.device)) else devices
    # Sets and generators are refused too: the order of the list is the order of the devices.
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, (str, torch.device)) for i in items):
        raise TypeError(f"devices={devices!r}: give None, a string like 'cuda:0*2' or 'cpu*2', a torch.device, "
                        "or a list or tuple of those (e.g. ['cuda:0', 'cuda:1'])")
    entries = []
    for item in items:
        text = str(item).strip().lower()
        m = _ENTRY.match(text)
        if m is None:
            raise ValueError(f"device {item!r}: write 'cuda:0', 'cpu', 'cuda:0*4' (virtual devices on streams), "
                             "'cuda:0*4@sm' (on SM partitions), 'cuda:0*1@sm/4' or 'cpu*3'")
        dev = torch.device(m["dev"] if m["dev"] != "cuda" else "cuda:0")
        n = int(m["n"] or 1)
        parts = int(m["parts"] or n) if m["sm"] else 0
        if n < 1 or (m["sm"] and not 1 <= n <= parts):
            raise ValueError(f"device {item!r}: use at least one virtual device and no more than the partitions")
        if m["sm"] and dev.type != "cuda":
            raise ValueError(f"device {item!r}: SM partitions exist on GPUs only")
        entries.append(DeviceEntry(dev, n, m["n"] is not None, parts))
    return entries


def count_devices(devices):
    return sum(e.count for e in parse_devices(devices))


def lists_gpus(devices):
    """True when every listed device is a GPU or a virtual device on one."""
    return devices is not None and all(e.device.type == "cuda" for e in parse_devices(devices))


def check_visible(devices):
    """ValueError naming the fix for a listed GPU this process does not see (it asks the
    driver how many there are; it makes no context)."""
    for entry in parse_devices(devices):
        _check_entry(entry)


def _check_entry(entry):
    if entry.device.type != "cuda":
        return
    seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if entry.device.index >= seen:
        raise ValueError(f"device {entry}: this process sees {seen} GPU(s); list devices it has "
                         "(check CUDA_VISIBLE_DEVICES) or use 'cpu*N'")


@dataclass
class LocalDevice:
    """One device of the program: where its replica lives and the streams it runs on.
    `stream` runs its forwards, `copy_stream` the copies of its outputs (None on the CPU)."""

    name: str
    device: torch.device
    stream: object = None
    copy_stream: object = None
    sms: int = 0  # SMs of its partition, 0 = the whole GPU


@dataclass
class DeviceSet:
    devices: list
    _closers: list = field(default_factory=list)

    def close(self):
        for close in self._closers:
            close()
        self._closers = []


def open_devices(devices):
    """Streams (and SM partitions) for each entry of `devices`."""
    out, closers = [], []
    for entry in parse_devices(devices):
        dev = entry.device
        if dev.type == "cpu":
            names = [f"cpu#{i}" for i in range(entry.count)] if entry.virtual else ["cpu"]
            out += [LocalDevice(n, dev) for n in names]
            continue
        _check_entry(entry)
        streams, sms = [], [0] * entry.count
        if entry.parts:
            partition = _sm_partition(dev.index, entry.parts)
            closers.append(partition.close)
            streams = [torch.cuda.ExternalStream(h, device=dev) for h in partition.streams[: entry.count]]
            sms = list(partition.sm_counts[: entry.count])
        else:
            streams = [torch.cuda.Stream(device=dev) for _ in range(entry.count)]
        for i, (stream, n_sms) in enumerate(zip(streams, sms)):
            name = f"{dev}#{i}" if entry.virtual else str(dev)
            out.append(LocalDevice(name, dev, stream, torch.cuda.Stream(device=dev), n_sms))
    return DeviceSet(out, closers)


def _sm_partition(index, parts):
    try:
        from .. import _C

        return _C.SmPartition(index, parts)
    except ImportError as e:
        reason = f"the extension asyncdiff_rt._C is not built ({e})"
    except Exception as e:  # _C.Unsupported (old driver), CudaError
        reason = str(e)
    raise RuntimeError(f"SM partitions of cuda:{index} are not available: {reason}; "
                       f"use 'cuda:{index}*{parts}' (virtual devices on streams) instead")
