"""The distributed executor on GPUs, CUDA graphs per rank. NCCL needs one GPU per rank, so
its tests need two GPUs and skip on one; the ipc transport (CUDA IPC mailboxes) also
runs as two processes on one GPU, with a gloo group for the settings and predictions."""
import pytest
import torch

from asyncdiff_rt import parallelize
from asyncdiff_rt.models.tiny_t2i import load_tiny

from test_executor_distributed import PROMPTS, STEPS, _ok, launch

pytestmark = [pytest.mark.gpu, pytest.mark.distributed]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs a GPU per rank: two GPUs")


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
def test_two_gpus_equal_the_reference_to_rounding(tmp_path, transport):
    results = launch(tmp_path, 2, 2, 1, STEPS, "--cuda", "--transport", transport)
    _check(tmp_path, results, 2, 1, transport)


@pytest.mark.parametrize("n,s", [(2, 1), (2, 2)])
def test_ipc_on_one_gpu_equals_the_reference_to_rounding(tmp_path, n, s):
    """Two or three processes on one GPU: IPC mailboxes, graphs, and a generation cut
    short first (its unreceived messages must not be read by the next)."""
    results = launch(tmp_path, n + s - 1, n, s, STEPS, "--cuda", "--same-gpu", "--transport", "ipc",
                        "--interrupt-after", 3)
    _check(tmp_path, results, n, s, "ipc")
