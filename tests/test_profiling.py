"""Profiling: NVTX ranges that name the program (through a recording stub of the nvtx
backend), the switch, and `asyncdiff-rt profile --quick`'s Chrome trace, Gantt PNG and
summary, ordered as the program says."""
import json
import warnings

import pytest
import torch

import asyncdiff_rt
from asyncdiff_rt.cli import main
from asyncdiff_rt.models.tiny_pipelines import tiny_sd_pipeline
from asyncdiff_rt.profiling.nvtx import ENV, RANGES, Ranges

warnings.filterwarnings("ignore")
STEPS = 4


class Recorder:
    """Stands in for the nvtx package: records what the runtime asks of it."""

    def __init__(self):
        self.calls, self.handles = [], 0

    def push(self, name):
        self.calls.append(("push", name))

    def pop(self):
        self.calls.append(("pop", None))

    def start(self, name):
        self.handles += 1
        self.calls.append(("start", name))
        return self.handles

    def end(self, handle):
        self.calls.append(("end", handle))


def generate(pipe):
    return pipe("a red cube", num_inference_steps=STEPS, height=16, width=16, output_type="latent",
                generator=torch.Generator().manual_seed(0)).images


def test_nvtx_ranges_name_steps_lanes_forwards_sends_and_emits(monkeypatch):
    recorder = Recorder()
    monkeypatch.setattr(RANGES, "backend", recorder)
    monkeypatch.setattr(RANGES, "enabled", True)
    pipe = tiny_sd_pipeline("sd15")
    handle = asyncdiff_rt.parallelize(pipe, executor="local", devices="cpu*2", n_components=2, warmup=1)
    try:
        generate(pipe)
    finally:
        handle.remove()
    pushed = [name for kind, name in recorder.calls if kind == "push"]
    depth = 0
    for kind, _ in recorder.calls:  # every push is popped, in order
        depth += {"push": 1, "pop": -1}.get(kind, 0)
        assert depth >= 0
    assert depth == 0
    assert [n for k, n in recorder.calls if k == "start"] == ["generation 1"] and ("end", 1) in recorder.calls
    for name in ("step 0/warmup", "step 0/dev 1/warm-up forward", "step 1/async", "step 1/dev 0/forward (eager)",
                 "step 1/dev 1/forward (eager)", "step 3/dev 1/forward (eager)", "step 0/emit (forward)"):
        assert name in pushed, name
    assert any(n.startswith("step 0/dev 0/") for n in pushed)  # a warm-up unit delegated to its owner
    assert any(n.startswith("step 1/dev 0/send") for n in pushed)  # sends issued at step 1 for step 2
    assert "step 3/dev 0/forward (eager)" not in pushed  # the last step runs only the host


def test_nvtx_switch(monkeypatch):
    monkeypatch.setenv(ENV, "0")
    assert not Ranges(backend=Recorder()).active
    monkeypatch.setenv(ENV, "1")
    assert Ranges(backend=Recorder()).active


def test_profile_quick_writes_a_chrome_trace_ordered_as_the_program(tmp_path, capsys):
    assert main(["profile", "--quick", "--steps", "5", "--out", str(tmp_path)]) == 0
    assert '"busy_fraction"' in capsys.readouterr().out
    trace = json.loads((tmp_path / "timeline.json").read_text())
    events = trace["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M"}
    assert set(names.values()) >= {"host", "dev 0", "dev 1", "dev 0 copy", "dev 1 copy"}
    slices = [dict(e, track=names[e["tid"]]) for e in events if e["ph"] == "X"]
    assert {s["args"]["step"] for s in slices if s["track"] == "host"} == set(range(5))
    for lane in ("dev 0", "dev 1"):  # a lane's forwards follow the steps
        steps = [s["args"]["step"] for s in sorted(slices, key=lambda s: s["ts"]) if s["track"] == lane]
        assert steps == sorted(steps)
    starts = {e["id"]: e for e in events if e["ph"] == "s"}
    flows = [(starts[e["id"]], e) for e in events if e["ph"] == "f"]
    assert flows and all(s["ts"] <= f["ts"] for s, f in flows)  # a send ends before its reader starts
    sends = [s for s in slices if s["track"].endswith("copy")]
    assert sends and all(s["args"]["bytes"] > 0 for s in sends)
    summary = json.loads((tmp_path / "timeline_summary.json").read_text())
    assert set(summary) >= {"busy_fraction", "exposed_communication_ms", "host_ms_per_step", "steps_ended_last_by"}
    assert (tmp_path / "timeline.png").read_bytes()[:4] == b"\x89PNG"


def test_profile_without_a_gpu_is_refused_in_one_line(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(SystemExit) as refused:
        main(["profile"])
    assert refused.value.code == 2 and "use --quick" in capsys.readouterr().err
