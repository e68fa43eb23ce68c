"""The distributed executor on GPUs (NCCL between processes, CUDA graphs per rank). NCCL
needs one GPU per rank, so these need two GPUs and skip on one."""
import pytest
import torch

from asyncdiff_rt import parallelize
from asyncdiff_rt.models.tiny_t2i import load_tiny

from test_executor_distributed import PROMPTS, STEPS, _ok, launch

pytestmark = [pytest.mark.gpu, pytest.mark.distributed,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs a GPU per rank: two GPUs")]


@pytest.mark.parametrize("n,s", [(2, 1)])
def test_nccl_equals_the_reference_to_rounding(tmp_path, n, s):
    results, _ = launch(tmp_path, n + s - 1, n, s, STEPS, "--cuda")
    _ok(results)
    pipe = load_tiny(device="cuda:0")
    handle = parallelize(pipe, n_components=n, stride=s, warmup=1, executor="reference")
    expected = pipe(PROMPTS, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                    output_type="pt").images.cpu()
    handle.remove()
    first = torch.load(tmp_path / "rank0.pt")
    for rank in results:
        assert torch.equal(torch.load(tmp_path / f"rank{rank}.pt"), first)  # every rank: the same images
        assert results[rank][1]["stats"]["transport"] == "nccl"
    torch.testing.assert_close(first, expected, atol=2e-3, rtol=0)
