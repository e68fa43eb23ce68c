"""The CUDA extension asyncdiff_rt._C: build/import, argument checks (CPU) and
the real thing on a GPU (marked `gpu`)."""
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import torch

HAS_EXT = importlib.util.find_spec("asyncdiff_rt._C") is not None
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="asyncdiff_rt._C is not built (no CUDA toolkit at install)")


def _nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    for c in (os.environ.get("CUDACXX"), home and os.path.join(home, "bin", "nvcc"), shutil.which("nvcc")):
        if c and os.path.isfile(c):
            return c
    return None


@pytest.fixture(scope="module")
def C():
    if not HAS_EXT:
        pytest.skip("asyncdiff_rt._C is not built")
    from asyncdiff_rt import _C

    return _C


def _gpu_present(C):
    try:
        return C.device_count() > 0
    except C.CudaError:
        return False


# ---------------------------------------------------------------- CPU tests


def test_built_when_toolkit_present():
    if _nvcc() is None:
        pytest.skip("no nvcc here: the extension is optional")
    if os.environ.get("ASYNCDIFF_RT_BUILD_EXT") == "0":
        pytest.skip("ASYNCDIFF_RT_BUILD_EXT=0")
    assert HAS_EXT, ("nvcc is available but asyncdiff_rt._C is not built: run "
                     "`pip install --no-build-isolation -e .` (or set ASYNCDIFF_RT_BUILD_EXT=0)")
    from asyncdiff_rt import _C

    assert _C.runtime_version() >= 12000
    assert set(_C.build_info()) == {"cuda_version", "cuda_archs"}


@needs_ext
def test_no_gpu_raises_cuda_error_naming_the_call(C):
    if _gpu_present(C):
        pytest.skip("a GPU is present")
    with pytest.raises(C.CudaError, match=r"cudaGetDeviceCount failed: .+\(cuda\w+\)"):
        C.device_count()
    assert issubclass(C.CudaError, RuntimeError) and issubclass(C.Unsupported, C.CudaError)
    # Checks that need the driver report the same error instead of crashing.
    with pytest.raises(C.CudaError, match="cudaGetDeviceCount"):
        C.copy_batch([(0x1000, 0, 0x2000, 0, 16)], 0)


def _entry(dst=0x10000, src=0x20000, n=256, dd=0, sd=0):
    return (dst, dd, src, sd, n)


@needs_ext
@pytest.mark.parametrize(
    "entries, match",
    [
        ([_entry(n=0)], "nbytes must be > 0"),
        ([_entry(n=-4)], "nbytes must be > 0"),
        ([_entry(dst=0)], "dst pointer is null"),
        ([_entry(src=0)], "src pointer is null"),
        ([_entry(dd=-1)], "device ordinal must be >= 0"),
        ([_entry(sd=-2)], "device ordinal must be >= 0"),
        ([_entry(dst=2**64 - 16, n=64)], "overflows"),
        ([_entry(dst=0x10000, n=256), _entry(dst=0x100ff, src=0x30000, n=8)], "entry 1: dst range overlaps"),
        ([_entry(dst=0x10000, src=0x10080, n=256)], "entry 0: src range overlaps the dst of copy_batch entry 0"),
        ([_entry(dst=0x10000, src=0x20000), _entry(dst=0x40000, src=0x100f0, n=32)], "entry 1: src range overlaps"),
    ],
)
def test_copy_batch_rejects_bad_entries_before_cuda(C, entries, match):
    with pytest.raises(ValueError, match=match):
        C.copy_batch(entries, 0)


@needs_ext
def test_copy_batch_accepts_touching_ranges_and_shared_sources(C):
    # Adjacent destinations and two reads of one source are fine; only the
    # driver-dependent checks can fail here (no GPU) or pass (GPU).
    entries = [_entry(dst=0x10000, src=0x20000, n=256), _entry(dst=0x10100, src=0x20000, n=256)]
    try:
        C.copy_batch(entries, 0)
    except ValueError as e:  # on a GPU these fake pointers are rejected as foreign
        assert "not CUDA device memory" in str(e)
    except C.CudaError as e:
        assert "cudaGetDeviceCount" in str(e) or "cudaPointerGetAttributes" in str(e)


@needs_ext
def test_copy_batch_entry_shape_is_checked(C):
    with pytest.raises(TypeError):
        C.copy_batch([(1, 0, 2, 0)], 0)
    with pytest.raises(TypeError):
        C.copy_batch([(-5, 0, 2, 0, 4)], 0)  # negative pointer


@needs_ext
def test_other_calls_reject_bad_arguments_before_cuda(C):
    with pytest.raises(ValueError, match="device ordinal"):
        C.can_access_peer(-1, 0)
    with pytest.raises(ValueError, match="interprocess events cannot record timing"):
        C.event_create(0, timing=True, interprocess=True)
    with pytest.raises(ValueError, match="event handle is null"):
        C.event_record(0, 0)
    with pytest.raises(ValueError, match="event handle is null"):
        C.event_query(0)
    with pytest.raises(ValueError, match="not 4-byte aligned"):
        C.signal_write(0, 0x1002, 1, 0)
    with pytest.raises(ValueError, match="flag pointer is null"):
        C.signal_wait(0, 0, 1, 0)
    with pytest.raises(ValueError, match="mode must be"):
        C.signal_wait(0, 0x1000, 1, 0, mode="gt")
    with pytest.raises(ValueError, match="IPC handle is 64 bytes, got 3"):
        C.ipc_open(b"abc", 0, 0)
    with pytest.raises(ValueError, match="offset must be >= 0"):
        C.ipc_open(bytes(64), -1, 0)
    with pytest.raises(ValueError, match="not open"):
        C.ipc_close(bytes(64), 0)
    with pytest.raises(ValueError, match="parts must be >= 1"):
        C.SmPartition(0, 0)
    with pytest.raises(ValueError, match="n_blocks"):
        C.sm_probe(0, 0x1000, 0, 0)
    assert C.ipc_open_count() == 0


# ---------------------------------------------------------------- GPU tests

gpu = pytest.mark.gpu


def _cuda_ext(C):
    if not _gpu_present(C):
        pytest.skip("the extension sees no GPU")


def _wait_or_fail(stream, seconds=20.0, unblock=None):
    """Synchronize with a deadline, so a broken handshake fails instead of hanging."""
    end = time.monotonic() + seconds
    while not stream.query():
        if time.monotonic() > end:
            if unblock:
                unblock()
            stream.synchronize()
            pytest.fail("stream did not finish: a device-side wait was never satisfied")
        time.sleep(1e-3)


@gpu
def test_topology(C):
    _cuda_ext(C)
    n = C.device_count()
    assert n == torch.cuda.device_count()
    props = C.device_properties(0)
    assert props["sm_count"] == torch.cuda.get_device_properties(0).multi_processor_count
    assert C.can_access_peer(0, 0) and C.link_info(0, 0)["same_device"]
    assert C.enable_peer_access(0, 0) is False
    for b in range(1, n):
        info = C.link_info(0, b)
        assert info["can_access_peer"] == C.can_access_peer(0, b)
        assert info["nvlink"] in (True, False, None)
        if info["can_access_peer"]:
            C.enable_peer_access(0, b)
            assert C.enable_peer_access(0, b) is False  # already enabled
    with pytest.raises(ValueError, match="does not exist"):
        C.device_properties(n)


def _odd_batch(dst_device, src_device, count=37, seed=0):
    """A zeroed source, the random payload meant for it, and `count` copies with
    odd sizes at odd offsets (disjoint destinations, sources read in shuffled order)."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 70_000, (count,), generator=g).tolist()
    gaps = torch.randint(0, 13, (count,), generator=g).tolist()
    total = sum(sizes) + sum(gaps) + 64
    payload_cpu = torch.randint(0, 256, (total,), dtype=torch.uint8, generator=g)
    payload = payload_cpu.to(src_device)
    src = torch.zeros(total, dtype=torch.uint8, device=src_device)
    dst = torch.zeros(total, dtype=torch.uint8, device=dst_device)
    starts, off = [], 3
    for n, gap in zip(sizes, gaps):
        starts.append(off)
        off += n + gap
    order = torch.randperm(count, generator=g).tolist()
    entries, expect = [], torch.zeros(total, dtype=torch.uint8)
    for i, start in enumerate(starts):
        s_start, n = starts[order[i]], min(sizes[i], sizes[order[i]])
        entries.append((dst.data_ptr() + start, dst.device.index, src.data_ptr() + s_start, src.device.index, n))
        expect[start:start + n] = payload_cpu[s_start:s_start + n]
    return dst, src, payload, entries, expect


@gpu
@pytest.mark.parametrize("force_peer", [False, True])
def test_copy_batch_exact_and_stream_ordered(C, force_peer):
    _cuda_ext(C)
    pairs = [(0, 0)] + [(0, 1), (1, 0)] * (torch.cuda.device_count() > 1)
    for dd, sd in pairs:
        dst, src, payload, entries, expect = _odd_batch(torch.device("cuda", dd), torch.device("cuda", sd))
        torch.cuda.synchronize(dd)
        torch.cuda.synchronize(sd)
        # The source is written, copied and overwritten on one stream, with a delay
        # first: the bytes come out right only if copy_batch issued on that stream.
        stream = torch.cuda.Stream(device=sd)
        with torch.cuda.stream(stream):
            torch.cuda._sleep(2_000_000)
            src.copy_(payload)
        C.copy_batch(entries, stream.cuda_stream, force_peer=force_peer)
        with torch.cuda.stream(stream):
            src.zero_()
        stream.synchronize()
        got = dst.cpu()
        bad = (got != expect).nonzero()
        assert bad.numel() == 0, f"{dd}<-{sd}: {bad.numel()} bytes differ, first at {bad[:5].flatten().tolist()}"


@gpu
def test_copy_batch_rejects_foreign_pointers(C):
    _cuda_ext(C)
    a = torch.zeros(1024, dtype=torch.uint8, device="cuda:0")
    host = torch.zeros(1024, dtype=torch.uint8).pin_memory()
    with pytest.raises(ValueError, match="host memory"):
        C.copy_batch([(a.data_ptr(), 0, host.data_ptr(), 0, 16)], 0)
    with pytest.raises(ValueError, match="runs past its allocation"):
        C.sm_probe(0, a.data_ptr(), 1 << 20, 0)  # 4 MB of output from a small block
    if torch.cuda.device_count() > 1:
        with pytest.raises(ValueError, match="lives on device 0, not the stated device 1"):
            C.copy_batch([(a.data_ptr(), 1, a.data_ptr() + 512, 0, 16)], 0)


@gpu
def test_events_order_work_across_streams(C):
    _cuda_ext(C)
    src = torch.zeros(1 << 20, dtype=torch.int32, device="cuda:0")
    dst = torch.empty_like(src)
    torch.cuda.synchronize()  # the zeros are written before the producer starts
    producer, consumer = torch.cuda.Stream(), torch.cuda.Stream()
    ev, t0, t1 = C.event_create(0), C.event_create(0, timing=True), C.event_create(0, timing=True)
    try:
        C.event_record(t0, producer.cuda_stream)
        with torch.cuda.stream(producer):
            torch.cuda._sleep(5_000_000)
            src.fill_(7)
        C.event_record(ev, producer.cuda_stream)
        C.event_record(t1, producer.cuda_stream)
        C.stream_wait_event(consumer.cuda_stream, ev)
        C.copy_batch([(dst.data_ptr(), 0, src.data_ptr(), 0, src.numel() * 4)], consumer.cuda_stream)
        consumer.synchronize()
        assert C.event_query(ev)
        assert torch.equal(dst.cpu(), torch.full((1 << 20,), 7, dtype=torch.int32))
        C.event_synchronize(t1)
        assert C.event_elapsed_ms(t0, t1) > 0
    finally:
        for e in (ev, t0, t1):
            C.event_destroy(e)


_IPC_CHILD = textwrap.dedent("""
    import sys, torch
    from asyncdiff_rt import _C
    handle, offset, ev_handle, n = bytes.fromhex(sys.argv[1]), int(sys.argv[2]), bytes.fromhex(sys.argv[3]), int(sys.argv[4])
    ptr = _C.ipc_open(handle, offset, 0)
    assert _C.ipc_open(handle, offset, 0) == ptr and _C.ipc_open_count() == 1  # cached
    src = torch.arange(n, dtype=torch.int32, device="cuda:0") * 3 + 1
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    _C.copy_batch([(ptr, 0, src.data_ptr(), 0, n * 4)], s.cuda_stream)
    ev = _C.event_ipc_open(ev_handle, 0)
    _C.event_record(ev, s.cuda_stream)
    s.synchronize()
    _C.event_destroy(ev)
    _C.ipc_close(handle, 0); _C.ipc_close(handle, 0)
    assert _C.ipc_open_count() == 0
    print("child ok")
""")


@gpu
def test_ipc_between_two_processes(C):
    _cuda_ext(C)
    n = 100_003
    buf = torch.zeros(n + 1000, dtype=torch.int32, device="cuda:0")
    view = buf[17:17 + n]  # an interior pointer: exported as (handle, offset)
    torch.cuda.synchronize()
    handle, offset = C.ipc_export(view.data_ptr(), 0)
    assert len(handle) == 64 and offset >= 17 * 4
    ev = C.event_create(0, interprocess=True)
    try:
        ev_handle = C.event_ipc_export(ev)
        r = subprocess.run([sys.executable, "-c", _IPC_CHILD, handle.hex(), str(offset), ev_handle.hex(), str(n)],
                           capture_output=True, text=True, timeout=180)
        assert r.returncode == 0 and "child ok" in r.stdout, r.stderr[-3000:]
        C.stream_wait_event(torch.cuda.current_stream().cuda_stream, ev)
        expect = torch.arange(n, dtype=torch.int32) * 3 + 1
        assert torch.equal(view.cpu(), expect)
        assert int(buf[:17].abs().sum()) == 0 and int(buf[17 + n:].abs().sum()) == 0
    finally:
        C.event_destroy(ev)


@gpu
@pytest.mark.parametrize("mode, value", [("geq", 1), ("eq", 5)])
def test_signal_orders_streams_without_host(C, mode, value):
    _cuda_ext(C)
    flag = torch.zeros(4, dtype=torch.int32, device="cuda:0")
    src = torch.zeros(1 << 20, dtype=torch.int32, device="cuda:0")
    dst = torch.full_like(src, -1)
    producer, consumer = torch.cuda.Stream(), torch.cuda.Stream()
    torch.cuda.synchronize()
    C.signal_wait(consumer.cuda_stream, flag.data_ptr() + 4, value, 0, mode=mode)
    with torch.cuda.stream(consumer):
        dst.copy_(src)
    with torch.cuda.stream(producer):
        torch.cuda._sleep(5_000_000)
        src.fill_(9)
    C.signal_write(producer.cuda_stream, flag.data_ptr() + 4, value, 0)

    def unblock():
        C.signal_write(torch.cuda.Stream().cuda_stream, flag.data_ptr() + 4, value, 0)

    _wait_or_fail(consumer, unblock=unblock)
    assert int(flag[1]) == value and int(flag[0]) == 0
    assert bool((dst == 9).all()), "consumer ran before the producer's signal"


@gpu
def test_sm_partitions_stay_on_their_sms(C):
    _cuda_ext(C)
    try:
        part = C.SmPartition(0, 2)
    except C.Unsupported as e:
        pytest.skip(f"green contexts unsupported here: {e}")
    with part:
        total = C.device_properties(0)["sm_count"]
        assert part.total_sms == total and len(part.streams) == 2
        assert all(c > 0 for c in part.sm_counts) and sum(part.sm_counts) <= total
        used = []
        for stream, count in zip(part.streams, part.sm_counts):
            out = torch.full((8 * total,), -1, dtype=torch.int32, device="cuda:0")
            torch.cuda.synchronize()
            C.sm_probe(stream, out.data_ptr(), out.numel(), 0)
            ext = torch.cuda.ExternalStream(stream, device="cuda:0")
            ext.synchronize()
            sms = set(out.cpu().tolist())
            assert -1 not in sms and len(sms) <= count, f"{len(sms)} SMs used by a {count}-SM part"
            used.append(sms)
            # torch kernels run on the part's stream too.
            x = torch.arange(1000, dtype=torch.float32, device="cuda:0")
            torch.cuda.synchronize()
            with torch.cuda.stream(ext):
                y = x * 2
            ext.synchronize()
            assert torch.equal(y.cpu(), torch.arange(1000, dtype=torch.float32) * 2)
        assert not (used[0] & used[1]), "the two parts shared SMs"
    assert part.streams == []
    with pytest.raises(ValueError, match="splits into"):
        C.SmPartition(0, total)
