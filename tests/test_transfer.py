"""TransferEngine and backend selection: the cpu and torch backends on CPU
tensors here, every available backend on a GPU (marked `gpu`)."""
import logging

import pytest
import torch

from asyncdiff_rt.backend import BACKENDS, availability, backend_info, choose_backend
from asyncdiff_rt.engine.transfer import TransferEngine


def _pairs(device="cpu", sizes=(1, 7, 1000, 65_537), dtype=torch.int32, seed=0):
    g = torch.Generator().manual_seed(seed)
    srcs = [torch.randint(-1000, 1000, (n,), generator=g, dtype=dtype).to(device) for n in sizes]
    return [(torch.zeros_like(s), s) for s in srcs]


def test_backend_info_reports_a_live_path_and_reasons():
    info = backend_info()
    assert info["backend"] in BACKENDS and info["reason"]
    assert info["candidates"]["cpu"]["available"]
    for name, c in info["candidates"].items():
        assert isinstance(c["reason"], str) and c["reason"], name
    ext = info["extension"]
    if not ext["built"]:
        assert "not built" in ext["error"]
    if not torch.cuda.is_available():
        assert info["backend"] == "cpu"
        assert "sees no CUDA device" in info["candidates"]["torch"]["reason"]
        if ext["built"]:
            assert not ext["usable"] and ext["error"]


def test_engine_logs_its_choice(caplog):
    with caplog.at_level(logging.INFO, logger="asyncdiff_rt.engine.transfer"):
        eng = TransferEngine()
    assert eng.backend == choose_backend()[0]
    assert f"transfer backend {eng.backend}" in caplog.text


def test_unavailable_backend_raises_with_reason():
    for name in BACKENDS:
        ok, reason = availability(name)
        if not ok:
            with pytest.raises(RuntimeError, match=f"transfer backend '{name}' is not available"):
                TransferEngine(backend=name)
    with pytest.raises(ValueError, match="unknown transfer backend"):
        TransferEngine(backend="nccl")


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_cpu_tensor_copies_exact(backend):
    eng = TransferEngine(backend="cpu") if backend == "cpu" else _torch_engine_on_cpu()
    pairs = _pairs()
    pairs.append((torch.empty(0), torch.empty(0)))  # empty tensors are a no-op
    eng.copy(pairs)
    for dst, src in pairs:
        assert torch.equal(dst, src)


def _torch_engine_on_cpu():
    """The torch backend's code path on CPU tensors, even where torch has no CUDA."""
    eng = TransferEngine(backend="cpu")
    eng.backend = "torch"
    return eng


def test_host_events_time_and_complete():
    eng = TransferEngine(backend="cpu")
    a, b = eng.event("cpu", timing=True), eng.event("cpu", timing=True)
    with pytest.raises(RuntimeError, match="recorded"):
        a.elapsed_ms(b)
    a.record()
    eng.copy(_pairs())
    b.record()
    b.wait()
    assert a.query() and b.query() and a.elapsed_ms(b) >= 0


@pytest.mark.parametrize(
    "pair, exc, match",
    [
        ((torch.zeros(4), torch.zeros(4, dtype=torch.float64)), ValueError, "does not match"),
        ((torch.zeros(4), torch.zeros(5)), ValueError, "does not match"),
        ((torch.zeros(4, 4).t(), torch.zeros(4, 4)), ValueError, "contiguous"),
        ((torch.zeros(4), [0.0] * 4), TypeError, "expected \\(dst, src\\) tensors"),
    ],
)
def test_copy_rejects_bad_pairs(pair, exc, match):
    with pytest.raises(exc, match=match):
        TransferEngine(backend="cpu").copy([pair])


# ---------------------------------------------------------------- GPU


def _gpu_backends():
    return [b for b in ("_C", "cupy", "torch") if availability(b)[0]]


@pytest.mark.gpu
def test_auto_choice_on_gpu_prefers_extension():
    name = choose_backend()[0]
    assert name != "cpu"
    if availability("_C")[0]:
        assert name == "_C"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["_C", "cupy", "torch"])
def test_gpu_backends_copy_exact_and_order_with_events(backend):
    if backend not in _gpu_backends():
        pytest.skip(f"{backend}: {availability(backend)[1]}")
    n_dev = torch.cuda.device_count()
    routes = [(0, 0)] + ([(0, 1), (1, 0)] if n_dev > 1 else [])
    eng = TransferEngine(backend=backend, devices=range(n_dev))
    for dd, sd in routes:
        pairs = _pairs(f"cuda:{sd}", sizes=(1, 3, 4097, 1_000_003))
        dsts = [torch.zeros_like(s, device=f"cuda:{dd}") for _, s in pairs]
        expect = [s.cpu() for _, s in pairs]
        torch.cuda.synchronize(sd)
        copy_stream = torch.cuda.Stream(device=sd)
        ready = eng.event(f"cuda:{sd}")
        with torch.cuda.stream(copy_stream):
            torch.cuda._sleep(2_000_000)
        eng.copy(list(zip(dsts, [s for _, s in pairs])), stream=copy_stream)
        ready.record(copy_stream)
        # A consumer on the destination device waits for the event, then reads.
        consumer = torch.cuda.Stream(device=dd)
        ready.wait(consumer)
        with torch.cuda.stream(consumer):
            sums = [d.sum() for d in dsts]
        with torch.cuda.stream(copy_stream):
            for _, s in pairs:
                s.zero_()  # overwrite right after: stream order must protect the copy
        consumer.synchronize()
        for d, e, total in zip(dsts, expect, sums):
            assert torch.equal(d.cpu(), e) and int(total) == int(e.sum())


@pytest.mark.gpu
def test_gpu_timing_events():
    eng = TransferEngine()
    start, end = eng.event("cuda:0", timing=True), eng.event("cuda:0", timing=True)
    start.record()
    torch.cuda._sleep(1_000_000)
    end.record()
    end.synchronize()
    assert start.query() and end.query()
    assert start.elapsed_ms(end) > 0
