import pytest
import torch
import torch.utils._pytree as pytree

from asyncdiff_rt.models.configs import build_unet
from asyncdiff_rt.partition import resolve_partition
from asyncdiff_rt.trace import unet_inputs
from asyncdiff_rt.units import find_units
from asyncdiff_rt.upstream_splits import recognise_family

FAMILIES = ("sd15", "sd21", "sdxl")


@pytest.mark.parametrize("family", FAMILIES)
def test_units_follow_execution_order_and_skip_shared_modules(tiny_graphs, family):
    _, graph = tiny_graphs[family]
    paths = graph.paths
    assert paths[0] == "conv_in" and paths[-1] == "conv_out"
    assert graph.output_unit == "conv_out"
    assert "time_embedding" not in paths and "add_embedding" not in paths
    assert paths.index("mid_block") < paths.index("up_blocks.0.resnets.0")
    # Blocks are split into their layers; every unit has outputs and a cost.
    assert "down_blocks.1.attentions.0" in paths and "up_blocks.1.upsamplers.0" in paths
    assert all(u.outputs and u.nbytes > 0 for u in graph.units)
    assert sum(u.flops for u in graph.units) <= graph.total_flops


def test_unit_reads_follow_skip_connections(tiny_graphs):
    _, graph = tiny_graphs["sd15"]
    assert graph.reads["conv_in"] >= {"<latent>"}
    # The last up block's first resnet reads the previous layer and a down-block skip.
    reads = graph.reads["up_blocks.3.resnets.0"]
    assert "up_blocks.2.upsamplers.0" in reads and "down_blocks.0.attentions.1" in reads
    assert "time_embedding" not in reads  # shared modules are computed locally, not read


def test_family_recognised_by_structure(tiny_graphs):
    assert [recognise_family(tiny_graphs[f][0]) for f in FAMILIES] == ["sd15", "sd21", "sdxl"]
    assert recognise_family(build_unet("sd21")) == "sd21"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n", [2, 3, 4])
def test_upstream_tables_cover_every_unit_once(tiny_graphs, family, n):
    unet, graph = tiny_graphs[family]
    part = resolve_partition(graph, n, "upstream", unet)
    flat = [p for comp in part.components for p in comp]
    assert sorted(flat) == sorted(graph.paths)
    assert part.owner["conv_out"] == n - 1
    assert part.strategy == f"upstream:{family}"


def test_upstream_split_sd15_n2_matches_reference_table(tiny_graphs):
    unet, graph = tiny_graphs["sd15"]
    part = resolve_partition(graph, 2, "upstream", unet)
    assert part.compact(0, graph.paths) == [
        "conv_in", "down_blocks", "mid_block", "up_blocks.0",
        "up_blocks.1.resnets.0", "up_blocks.1.attentions.0", "up_blocks.1.resnets.1",
    ]


def test_sdxl_upstream_split_is_not_contiguous(tiny_graphs):
    unet, graph = tiny_graphs["sdxl"]
    last = resolve_partition(graph, 2, "upstream", unet).components[1]
    assert "conv_in" in last and "up_blocks.2.resnets.0" in last and "mid_block" not in last


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_auto_balances_at_least_as_well_as_upstream(tiny_graphs, family, n):
    unet, graph = tiny_graphs[family]
    auto = resolve_partition(graph, n, "auto")
    assert sorted(p for c in auto.components for p in c) == sorted(graph.paths)
    assert all(auto.components) and auto.owner["conv_out"] == n - 1
    if n > 1:
        upstream = resolve_partition(graph, n, "upstream", unet)
        assert max(auto.loads(graph)) <= max(upstream.loads(graph))


def test_auto_goes_non_contiguous_when_it_helps():
    from asyncdiff_rt.partition import _auto
    from asyncdiff_rt.units import Unit, UnitGraph

    # The best contiguous split of 5,5,1,1 is 5 | 5,1,1 (largest 7); {5,1},{5,1} reaches 6.
    costs = [5, 5, 1, 1]
    units = tuple(Unit(f"u{i}", i, (), c) for i, c in enumerate(costs))
    graph = UnitGraph(units, {u.path: frozenset() for u in units}, frozenset(["u3"]), 0, sum(costs))
    part = _auto(graph, 2, [u.flops for u in graph.units], "auto")
    assert max(part.loads(graph)) == 6
    assert part.owner["u3"] == 1


def test_explicit_partition_accepts_blocks_and_brackets(tiny_graphs):
    unet, graph = tiny_graphs["sd15"]
    first = ["conv_in", "down_blocks", "mid_block"]
    second = ["up_blocks[0]", "up_blocks.1", "up_blocks.2", "up_blocks.3", "conv_norm_out", "conv_out"]
    part = resolve_partition(graph, 2, [first, second])
    assert part.owner["down_blocks.3.resnets.1"] == 0 and part.owner["up_blocks.0.upsamplers.0"] == 1


@pytest.mark.parametrize(
    "lists, message",
    [
        ([["conv_in", "nope"], ["conv_out"]], "names no unit"),
        ([["conv_in", "down_blocks", "down_blocks.0"], ["mid_block", "up_blocks", "conv_norm_out", "conv_out"]], "listed twice"),
        ([["conv_in"], ["conv_out"]], "without a component"),
        ([["conv_in", "down_blocks", "mid_block", "up_blocks", "conv_norm_out", "conv_out"], []], "hold no unit"),
        ([["down_blocks", "mid_block", "up_blocks", "conv_norm_out", "conv_out"], ["conv_in"]], "last component"),
        ([["conv_in", "down_blocks", "mid_block", "up_blocks", "conv_norm_out", "conv_out"]], "2 lists|1 lists"),
    ],
)
def test_explicit_partition_errors_name_the_fix(tiny_graphs, lists, message):
    _, graph = tiny_graphs["sd15"]
    with pytest.raises(ValueError, match=message):
        resolve_partition(graph, 2, lists)


def test_bad_component_counts_and_unknown_architectures(tiny_graphs):
    unet, graph = tiny_graphs["sd15"]
    with pytest.raises(ValueError, match="from 1 to"):
        resolve_partition(graph, 0, "auto")
    with pytest.raises(ValueError, match="from 1 to"):
        resolve_partition(graph, len(graph.units) + 1, "auto")
    with pytest.raises(ValueError, match="no table"):
        resolve_partition(graph, 5, "upstream", unet)
    with pytest.raises(ValueError, match="unknown"):
        resolve_partition(graph, 2, "balanced")


def test_upstream_refused_for_an_unknown_layout():
    from diffusers import UNet2DConditionModel
    import torch

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=8, block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=4,
            norm_num_groups=8, layers_per_block=1,
        )
    graph = find_units(unet, unet_inputs(unet))
    with pytest.raises(ValueError, match="no published split"):
        resolve_partition(graph, 2, "upstream", unet)
    assert resolve_partition(graph, 2, "auto").n_components == 2


def test_meta_weights_trace_as_through_fake_tensors(monkeypatch):
    """Meta weights skip fake tensors (trace.py): the same calls, reads, outputs and FLOPs
    as through fake tensors, also from inputs made on the CPU. Operator and element counts
    differ (fake tensors run some decompositions) and are not used for meta weights."""
    import dataclasses

    import asyncdiff_rt.trace as trace

    def traced(make_inputs):
        found = trace.trace_denoiser(meta, make_inputs)
        return dataclasses.replace(found, calls=tuple(dataclasses.replace(c, ops=0, elements=0) for c in found.calls))

    meta = build_unet("tiny-sdxl", device="meta", dtype=torch.float32)
    direct = traced(unet_inputs(meta))
    on_cpu = lambda: pytree.tree_map(  # noqa: E731
        lambda t: torch.empty_like(t, device="cpu") if isinstance(t, torch.Tensor) else t, unet_inputs(meta)())
    assert direct == traced(on_cpu)
    monkeypatch.setattr(trace, "_all_meta", lambda denoiser: False)
    assert direct == traced(unet_inputs(meta))


def test_auto_on_the_cpu_balances_operators_as_well_as_flops():
    """On the CPU a small model's time goes per operator as much as per FLOP: with the
    weights there, auto balances FLOPs plus a cost per aten operator and per element they
    read or write, counted in the trace (so every executor and rank makes the same split).
    Balancing FLOPs alone gave the shipped tiny UNet's first component 31 units and a
    forward 1.6x the other's (CPU time per rank, 2026-12-03)."""
    from asyncdiff_rt.models.tiny_t2i import load_tiny
    from asyncdiff_rt.partition import CPU_ELEMENT_FLOPS, CPU_OP_FLOPS, estimated_costs

    unet = load_tiny().unet
    graph = find_units(unet, unet_inputs(unet))
    assert all(u.ops > 0 and u.elements > 0 for u in graph.units)
    flops = [u.flops for u in graph.units]
    assert estimated_costs(graph) == flops and estimated_costs(graph, "cuda") == flops  # GPUs, meta: FLOPs
    cpu = estimated_costs(graph, "cpu")
    assert cpu == [u.flops + CPU_OP_FLOPS * u.ops + CPU_ELEMENT_FLOPS * u.elements for u in graph.units]

    auto = resolve_partition(graph, 2, "auto", unet)
    by_flops = resolve_partition(graph, 2, "auto")  # no denoiser: FLOPs alone, as before
    assert auto.strategy == "auto" and auto.components != by_flops.components
    assert auto.owner[graph.output_unit] == 1

    def largest(part):
        owner = part.owner
        return max(sum(c for p, c in zip(graph.paths, cpu) if owner[p] == k) for k in range(2)) / (sum(cpu) / 2)

    assert largest(auto) < largest(by_flops)
    again = find_units(unet, unet_inputs(unet))  # counted, not timed: the same split every time
    assert resolve_partition(again, 2, "auto", unet).components == auto.components
