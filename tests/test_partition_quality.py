"""partition="quality": balanced contiguous splits, chosen by measured staleness error."""
import itertools

import pytest

from asyncdiff_rt.partition import MAX_IMBALANCE, contiguous_splits, quality_split, resolve_partition
from asyncdiff_rt.settings import check_settings


@pytest.fixture(scope="module")
def sd15():
    """(unet on meta, UnitGraph) of the tiny SD 1.5 layout."""
    from asyncdiff_rt.models.configs import build_unet
    from asyncdiff_rt.trace import unet_inputs
    from asyncdiff_rt.units import find_units

    unet = build_unet("tiny-sd15")
    return unet, find_units(unet, unet_inputs(unet))


def _loads(costs, cuts):
    bounds = (0, *cuts, len(costs))
    return [sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])]


def test_contiguous_splits_are_every_split_within_the_bound():
    costs = [1, 2, 1, 1, 2, 1, 1, 1, 2, 1, 1, 2, 1, 1, 1, 2, 1, 1, 2, 1, 1, 1, 2, 1]
    for n in (2, 3, 4):
        brute = [c for c in itertools.combinations(range(1, len(costs)), n - 1)
                 if max(_loads(costs, c)) <= MAX_IMBALANCE * sum(costs) / n]
        assert brute and sorted(contiguous_splits(costs, n)) == brute


def test_without_a_split_within_the_bound_the_most_balanced_ones_are_taken():
    # six equal transformer blocks in four components: 2 blocks is 1.33 x the mean at best
    splits = contiguous_splits([1.0] * 6, 4)
    assert splits and all(max(_loads([1.0] * 6, c)) == 2 for c in splits)
    assert len(splits) == 6  # the two-block component in any order: C(4, 2)


def test_quality_split_takes_the_cheapest_cuts_within_the_bound(sd15):
    unet, graph = sd15
    flops = [u.flops for u in graph.units]
    splits = contiguous_splits(flops, 3)
    expensive = {i: 1.0 for i in range(len(flops))}
    cheap = splits[len(splits) // 2]
    for i in cheap:
        expensive[i] = 0.0
    part = quality_split(graph, 3, expensive)
    assert [len(c) for c in part.components] == [b - a for a, b in zip((0, *cheap), (*cheap, len(flops)))]
    assert part.components[-1][-1] == graph.output_unit
    loads = part.loads(graph)
    assert max(loads) * 3 / sum(loads) <= MAX_IMBALANCE


def test_quality_is_a_strategy_that_needs_the_pipeline(sd15):
    unet, graph = sd15
    check_settings(unet, 2, 1, 1, False, "quality", "component", None, "auto", True)  # accepted
    with pytest.raises(ValueError, match="needs the pipeline"):
        resolve_partition(graph, 2, "quality", unet)


def test_the_quality_split_is_closer_to_sequential_than_auto_on_the_shipped_unet():
    # auto's split at N = 2 is 4.7 dB further from sequential than quality's (profiling/results/eval_quality_cpu, 2x1 W=1)
    import asyncdiff_rt
    from asyncdiff_rt.models.tiny_t2i import load_tiny
    from asyncdiff_rt.sensitivity import Calibration, quality_partition

    pipe = load_tiny()
    calibration = Calibration(pipe, ["a red circle", "a big blue square"], steps=4)
    split = quality_partition(pipe, 2, calibration)
    handle = asyncdiff_rt.parallelize(pipe, n_components=2, partition="auto")
    auto = [list(c) for c in handle.plan.partition.components]
    handle.remove()
    assert split != auto and calibration.error(split) < calibration.error(auto)
