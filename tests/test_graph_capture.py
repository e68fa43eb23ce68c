"""Graph capture of the local executor's asynchronous forwards, whose static inputs are
pytree leaves that may be None: SD3's last joint block returns `(None, hidden_states)`,
and a capture that asked None for its address failed, so those forwards ran eagerly for
good (with a warning). On the CPU the capture path runs through a stand-in for torch's
graph API whose replay recomputes the forward into the captured outputs, as a replay
does; on a GPU, through the real one."""
import contextlib
import warnings

import pytest
import torch
import torch.utils._pytree as pytree

import asyncdiff_rt
from asyncdiff_rt.engine.graphs import GraphCache
from asyncdiff_rt.models import tiny_pipelines as tiny

warnings.filterwarnings("ignore")
STEPS = 4
EMBEDS, POOLED = tiny.tiny_prompt_embeddings()


def sd3(pipe, device="cpu"):
    embeds, pooled = EMBEDS.to(device), POOLED.to(device)
    return pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=-embeds,
                negative_pooled_prompt_embeds=-pooled, height=16, width=16, num_inference_steps=STEPS,
                output_type="latent", generator=torch.Generator().manual_seed(0)).images


@pytest.fixture(scope="module")
def pipe():
    return tiny.tiny_transformer_pipeline("sd3")


class _Stream:
    def synchronize(self):
        pass


class _Graph:
    """torch.cuda.CUDAGraph's calls as GraphCache makes them; what a replay computes is
    done by `cpu_graphs` below, which knows the forward."""

    def capture_begin(self, pool=None):
        pass

    def capture_end(self):
        pass

    def replay(self):
        pass


@pytest.fixture
def cpu_graphs(monkeypatch):
    """GraphCache captures on the CPU: every GraphCache that runs is listed."""
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _Graph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", object)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    run, caches = GraphCache.run, []

    def run_on_a_stream(self, key, pool, stream, fn, inputs=()):
        if self not in caches:
            caches.append(self)
        replay = self.captured(key)
        out = run(self, key, pool, stream if stream is not None else _Stream(), fn, inputs)
        if replay:  # a replay writes the forward's results into the captured outputs
            for static, fresh in zip(pytree.tree_leaves(out), pytree.tree_leaves(fn())):
                if isinstance(static, torch.Tensor):
                    static.copy_(fresh)
        return out

    monkeypatch.setattr(GraphCache, "run", run_on_a_stream)
    return caches


def parallel(pipe, device="cpu", **settings):
    handle = asyncdiff_rt.parallelize(pipe, **settings)
    try:
        return sd3(pipe, device), handle.denoiser.executor
    finally:
        handle.remove()


@pytest.mark.parametrize("n, stride", [(2, 1), (3, 2)])
def test_sd3_forwards_are_captured_and_replays_equal_the_reference(pipe, cpu_graphs, n, stride):
    settings = dict(n_components=n, stride=stride, warmup=1, devices=f"cpu*{n + stride - 1}")
    reference, _ = parallel(pipe, executor="reference", **settings)
    local, executor = parallel(pipe, executor="local", **settings)
    assert cpu_graphs == [executor.graphs]
    graphs = executor.graphs
    assert graphs.failures == 0 and graphs.captures > 0  # (closed by remove(): its graphs are gone)
    assert torch.equal(local, reference)


def test_addresses_skip_leaves_that_are_not_tensors():
    from asyncdiff_rt.engine.graphs import input_addresses

    t = torch.zeros(2)
    assert input_addresses([None, t, 3, (t, None)[0]]) == [t.data_ptr(), t.data_ptr()]


@pytest.mark.gpu
def test_sd3_captures_every_forward_on_virtual_devices(pipe):
    pipe = pipe.to("cuda")
    try:
        sequential = sd3(pipe, "cuda")
        out, executor = parallel(pipe, "cuda", n_components=2, warmup=1, devices="cuda:0*2")
        assert executor.graphs.failures == 0 and executor.graphs.captures > 0
        assert torch.isfinite(out).all() and not torch.equal(out, sequential)
    finally:
        pipe.to("cpu")
