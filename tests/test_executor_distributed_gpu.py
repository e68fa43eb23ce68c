"""The distributed executor on GPUs, CUDA graphs per rank. NCCL needs one GPU per rank, so
its tests need two GPUs and skip on one; the ipc transport (CUDA IPC mailboxes) also
runs as two processes on one GPU, with a gloo group for the settings and predictions.
The ipc tests skip, with the reason, where the extension is missing or cannot run."""
import functools

import pytest
import torch

from asyncdiff_rt import parallelize
from asyncdiff_rt.models.tiny_t2i import load_tiny

from test_executor_distributed import PROMPTS, STEPS, _ok, launch

pytestmark = [pytest.mark.gpu, pytest.mark.distributed]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs a GPU per rank: two GPUs")


@functools.lru_cache(maxsize=None)
def _ipc_unusable():
    """Why the extension cannot carry ipc messages on this GPU, or None: it must be built,
    accepted by the driver (one older than the extension's CUDA runtime refuses every
    call) and able to write a stream-ordered signal and export a buffer."""
    from asyncdiff_rt import _C
    from asyncdiff_rt.backend import availability

    usable, reason = availability("_C")
    if not usable:
        return reason
    try:
        flag = torch.zeros(1, dtype=torch.int32, device="cuda:0")
        _C.signal_write(torch.cuda.current_stream(0).cuda_stream, flag.data_ptr(), 7, 0)
        _C.ipc_export(flag.data_ptr(), 0)
        torch.cuda.synchronize(0)
        if int(flag.item()) != 7:
            return "the extension's stream signal did not land on this GPU"
    except Exception as e:
        return f"the extension cannot run on this GPU: {type(e).__name__}: {e}"
    return None


@pytest.fixture
def ipc():
    pytest.importorskip("asyncdiff_rt._C", reason="the extension asyncdiff_rt._C is not built")
    reason = _ipc_unusable()
    if reason is not None:
        pytest.skip(reason)


def _check(tmp_path, results, n, s, transport):
    _ok(results)
    pipe = load_tiny(device="cuda:0")
    handle = parallelize(pipe, n_components=n, stride=s, warmup=1, executor="reference")
    expected = pipe(PROMPTS, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                    output_type="pt").images.cpu()
    handle.remove()
    first = torch.load(tmp_path / "rank0.pt")
    for rank in results:
        assert torch.equal(torch.load(tmp_path / f"rank{rank}.pt"), first)  # every rank: the same images
        assert results[rank][1]["stats"]["transport"] == transport
    torch.testing.assert_close(first, expected, atol=2e-3, rtol=0)


@two_gpus
@pytest.mark.parametrize("transport", ["nccl", "ipc"])
def test_two_gpus_equal_the_reference_to_rounding(tmp_path, transport, request):
    if transport == "ipc":
        request.getfixturevalue("ipc")
    results = launch(tmp_path, 2, 2, 1, STEPS, "--cuda", "--transport", transport)
    _check(tmp_path, results, 2, 1, transport)


@pytest.mark.parametrize("n,s", [(2, 1), (2, 2)])
def test_ipc_on_one_gpu_equals_the_reference_to_rounding(tmp_path, n, s, ipc):
    """Two or three processes on one GPU: IPC mailboxes, graphs, and a generation cut
    short first (its unreceived messages must not be read by the next)."""
    results = launch(tmp_path, n + s - 1, n, s, STEPS, "--cuda", "--same-gpu", "--transport", "ipc",
                        "--interrupt-after", 3)
    _check(tmp_path, results, n, s, "ipc")


def test_a_rank_killed_during_an_ipc_generation_stops_the_others(tmp_path, ipc):
    """Three processes on one GPU over ipc; rank 1 is killed (SIGKILL) at step 3, while
    its peers' streams may wait on counters only it would write. The others raise
    PeerFailure naming it within the timeout (no host wait outlives it) and exit."""
    timeout = 4.0
    results = launch(tmp_path, 3, 2, 2, STEPS, "--cuda", "--same-gpu", "--transport", "ipc", "--inject", "kill",
                     "--at-rank", 1, "--at-call", 4, "--timeout", timeout, timeout=180)
    for rank in (0, 2):
        code, record, log = results[rank]
        assert record is not None and record.get("type") == "PeerFailure", f"rank {rank}:\n{record}\n{log}"
        assert "rank 1 closed its connection" in record["error"], record["error"]
        assert record["seconds"] < 60 + timeout, record  # CUDA start-up, parallelize, 3 steps, then the timeout
