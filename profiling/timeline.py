"""A timeline of what the local executor queued: every forward on its lane, every batch
of sends on its lane's copy stream, the host's time per step. Times come from CUDA
events on a GPU (device time) and from the wall clock on the CPU (where every lane runs
on the host). It writes a Chrome trace (opens in Perfetto: a track per lane and per copy
stream, sends as flow arrows to the forward that reads them), a Gantt PNG and a summary.

One file per process: the distributed executor's ranks each write their own.
"""
import json
import time
from dataclasses import dataclass, field

import torch


@dataclass
class Span:
    track: str  # "dev 1", "dev 1 copy", "host"
    name: str
    step: int
    start: object  # a float (seconds, CPU) or a CUDA event, until resolved
    end: object
    args: dict = field(default_factory=dict)
    flows_to: list = field(default_factory=list)  # indices of spans this one feeds


class Timeline:
    def __init__(self):
        self.spans = []
        self._wall = time.perf_counter()  # time zero of host marks
        self._event = None  # time zero of device marks: the first one
        self._waiting = {}  # lane -> spans whose data its next forward reads

    # ------------------------------------------------------------ recording
    def mark(self, stream):
        """A point in `stream`'s order (None: the host, now)."""
        if stream is None:
            return time.perf_counter()
        point = torch.cuda.Event(enable_timing=True)
        point.record(stream)
        if self._event is None:
            self._event = point
        return point

    def forward(self, lane, step, name, start, end):
        index = self._add(Span(f"dev {lane}", name, step, start, end))
        for source in self._waiting.pop(lane, []):
            self.spans[source].flows_to.append(index)

    def send(self, lane, step, destinations, nbytes, start, end):
        index = self._add(Span(f"dev {lane} copy", f"send to dev {', '.join(map(str, destinations))}", step,
                               start, end, {"bytes": nbytes}))
        for dst in destinations:
            self._waiting.setdefault(dst, []).append(index)

    def host(self, step, phase, start, end):
        self._add(Span("host", f"step {step} ({phase})", step, start, end))

    def _add(self, span):
        self.spans.append(span)
        return len(self.spans) - 1

    # ------------------------------------------------------------ reading
    def resolve(self):
        """Spans with start and end in microseconds from the first mark (waits for the GPU)."""
        if self._event is not None:
            torch.cuda.synchronize()
        seconds = [(self._seconds(s.start), self._seconds(s.end)) for s in self.spans]
        origin = min((a for a, _ in seconds), default=0.0)
        for s, (a, b) in zip(self.spans, seconds):
            s.start, s.end = (a - origin) * 1e6, (b - origin) * 1e6
        return self.spans

    def _seconds(self, point):
        """Seconds after time zero: device events from the first one, host times from the
        timeline's start (the two clocks are aligned only roughly, at the first mark)."""
        if isinstance(point, torch.cuda.Event):
            return self._event.elapsed_time(point) / 1e3
        return point - self._wall

    def chrome_trace(self):
        """Chrome trace JSON: a thread per track, slices named by step, flow arrows."""
        tracks = sorted({s.track for s in self.spans}, key=_track_order)
        tid = {t: i for i, t in enumerate(tracks)}
        events = [{"ph": "M", "name": "thread_name", "pid": 0, "tid": tid[t], "args": {"name": t}} for t in tracks]
        for i, s in enumerate(self.spans):
            events.append({"ph": "X", "name": s.name, "cat": s.track.split()[-1], "pid": 0, "tid": tid[s.track],
                           "ts": s.start, "dur": max(s.end - s.start, 0.0), "args": {"step": s.step, **s.args}})
            for j in s.flows_to:
                target = self.spans[j]
                events.append({"ph": "s", "name": "send", "cat": "flow", "id": f"{i}-{j}", "pid": 0,
                               "tid": tid[s.track], "ts": s.end})
                events.append({"ph": "f", "bp": "e", "name": "send", "cat": "flow", "id": f"{i}-{j}", "pid": 0,
                               "tid": tid[target.track], "ts": target.start})
        return {"traceEvents": events, "displayTimeUnit": "ms"}

    def summary(self):
        """Per track busy fraction, exposed communication, host time per step, and which
        lane finished each step last (the critical path runs through it)."""
        span = max((s.end for s in self.spans), default=0.0) - min((s.start for s in self.spans), default=0.0)
        busy = {}
        for s in self.spans:
            busy.setdefault(s.track, []).append((s.start, s.end))
        compute = _union(iv for t, ivs in busy.items() if _computes(t) for iv in ivs)
        copies = _union(iv for t, ivs in busy.items() if t.endswith("copy") for iv in ivs)
        last = {}
        for s in self.spans:
            if _computes(s.track) and s.end >= last.get(s.step, (None, -1.0))[1]:
                last[s.step] = (s.track, s.end)
        host = sorted(s.end - s.start for s in self.spans if s.track == "host")
        forwards = {}
        for s in self.spans:
            if _computes(s.track) and not s.name.startswith("warm-up"):
                forwards.setdefault(int(s.track.split()[1]), []).append(s.end - s.start)
        warmups = sorted(s.end - s.start for s in self.spans if s.name.startswith("warm-up T["))
        critical = {}
        for track, _ in last.values():
            critical[track] = critical.get(track, 0) + 1
        return {
            "span_ms": span / 1e3,
            "busy_fraction": {t: _length(_union(ivs)) / span if span else 0.0
                              for t, ivs in sorted(busy.items(), key=lambda kv: _track_order(kv[0]))},
            "exposed_communication_ms": (_length(copies) - _length(_intersect(copies, compute))) / 1e3,
            "host_ms_per_step": {"median": _median(host) / 1e3 if host else 0.0,
                                 "max": host[-1] / 1e3 if host else 0.0},
            "steps_ended_last_by": critical,
            # what `asyncdiff-rt project` takes: median asynchronous forward per device, warm-up forward
            "forward_ms_per_device": [_median(forwards[d]) / 1e3 for d in sorted(forwards)],
            "warmup_ms": _median(warmups) / 1e3 if warmups else None,
        }

    def write(self, folder, stem="timeline"):
        """`stem`.json (Chrome trace), `stem`.png (Gantt) and `stem`_summary.json in `folder`."""
        from pathlib import Path

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{stem}.json").write_text(json.dumps(self.chrome_trace()))
        (folder / f"{stem}_summary.json").write_text(json.dumps(self.summary(), indent=1))
        gantt(self.spans, folder / f"{stem}.png")
        return folder / f"{stem}.json"


def gantt(spans, path):
    """A Gantt chart of the spans: a row per track, forwards coloured by step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tracks = sorted({s.track for s in spans}, key=_track_order)
    fig, ax = plt.subplots(figsize=(12, 0.5 + 0.45 * len(tracks)))
    colours = plt.get_cmap("tab20")
    for s in spans:
        y = tracks.index(s.track)
        ax.barh(y, (s.end - s.start) / 1e3, left=s.start / 1e3, height=0.7, color=colours(s.step % 20),
                edgecolor="black", linewidth=0.3)
    ax.set_yticks(range(len(tracks)), tracks)
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    ax.set_title("asyncdiff_rt timeline (colour: step)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _computes(track):
    """Whether `track` is a lane's compute (not its copy stream, not the host)."""
    return track.startswith("dev") and not track.endswith("copy")


def _median(values):
    values = sorted(values)
    return values[len(values) // 2]


def _track_order(track):
    parts = track.split()
    return (0, -1, "") if track == "host" else (1, int(parts[1]), " ".join(parts[2:]))


def _union(intervals):
    out = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _intersect(xs, ys):
    out, i, j = [], 0, 0
    while i < len(xs) and j < len(ys):
        a, b = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        if a < b:
            out.append((a, b))
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return out


def _length(intervals):
    return sum(b - a for a, b in intervals)
