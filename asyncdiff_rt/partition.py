"""Partition: which component owns each unit.

Strategies: "auto" (minimise the largest component's estimated time: its FLOPs, plus on
a CPU a fixed cost per operator and per element: `estimated_costs`), "measured" (the
same with measured unit times: unit_times.py), "upstream" (the reference code's table
for a recognised family), "quality" (a balanced contiguous split with the least measured
staleness error: `quality_split` here, its measurements in sensitivity.py) or an explicit
list of N lists of module paths.
Component N-1 always owns the unit that produces the denoiser's output.
"""
import re
from dataclasses import dataclass

from .upstream_splits import SPLITS, recognise_family

STRATEGIES = ("auto", "measured", "upstream", "quality")
CHOICES = '"auto", "measured", "upstream", "quality" or a list of N lists of module paths'

TIE = 0.005  # largest loads within 0.5% of each other are a tie (FLOP counts are estimates anyway)
# On a CPU an operator costs time whatever its FLOPs (dispatch, allocation, passes over
# memory): "auto" counts each as 200k FLOPs and each tensor element it reads or writes as
# 10 more. Fitted to the shipped tiny UNet's unit times (thread CPU time, 1 thread, two
# sets, this project's 2-core CPU, 2026-12-03): least squares gave 200-226k and 21-22;
# these balanced both sets best. FLOPs alone made its N = 2 split's largest component
# 1.23-1.26x the mean time (N = 3: 1.35-1.44, N = 4: 1.35-1.37); these, 1.06-1.09 (N = 3:
# 1.03-1.07, N = 4: 1.11-1.12).
CPU_OP_FLOPS = 200_000
CPU_ELEMENT_FLOPS = 10


@dataclass(frozen=True)
class Partition:
    components: tuple  # per component, its unit paths in execution order
    strategy: str

    @property
    def n_components(self):
        return len(self.components)

    @property
    def owner(self):
        return {path: c for c, paths in enumerate(self.components) for path in paths}

    def loads(self, graph):
        return [sum(graph.unit(p).flops for p in paths) for paths in self.components]

    def compact(self, component, all_paths):
        """A component's units with whole modules named once ("down_blocks" for all four)."""
        members, names, covered = set(self.components[component]), [], set()
        for path in self.components[component]:
            if path in covered:
                continue
            parts = path.split(".")
            for depth in range(1, len(parts) + 1):
                prefix = ".".join(parts[:depth])
                under = [p for p in all_paths if p == prefix or p.startswith(prefix + ".")]
                if all(p in members for p in under):
                    names.append(prefix)
                    covered.update(under)
                    break
        return names


def resolve_partition(graph, n_components, spec, denoiser=None, costs=None):
    """Turn `spec` into a Partition of `graph`'s units, or raise naming the fix.
    `costs`: per unit of `graph.paths`, what "measured" balances (seconds). "auto" reads
    where `denoiser`'s weights are (without one: FLOPs alone)."""
    count = len(graph.units)
    if isinstance(n_components, bool) or not isinstance(n_components, int) or not 1 <= n_components <= count:
        raise ValueError(
            f"n_components={n_components!r} is not possible: this denoiser has {count} units, "
            f"so choose an integer from 1 to {count}"
        )
    if spec == "auto":
        return _auto(graph, n_components, estimated_costs(graph, _device_type(denoiser)), "auto")
    if spec == "measured":
        if costs is None:
            raise ValueError('partition="measured" needs the measured unit times (make_plan measures them)')
        return _auto(graph, n_components, list(costs), "measured")
    if spec == "upstream":
        family, table = upstream_table(denoiser, n_components)
        return _explicit(graph, table, f"upstream:{family}")
    if spec == "quality":
        raise ValueError('partition="quality" measures calibration generations, so it needs the pipeline: use '
                         'parallelize(pipe, partition="quality") or sensitivity.quality_partition(pipe, n)')
    if isinstance(spec, (list, tuple)):
        if len(spec) != n_components:
            raise ValueError(
                f"the explicit partition has {len(spec)} lists but n_components={n_components}; "
                "give one list of module paths per component"
            )
        return _explicit(graph, spec, "explicit")
    raise ValueError(f"partition={spec!r} is unknown; use {CHOICES}")


def estimated_costs(graph, device_type=None):
    """What "auto" balances, per unit: FLOPs, plus CPU_OP_FLOPS per operator and
    CPU_ELEMENT_FLOPS per element it reads or writes when the denoiser's weights are on the
    CPU (small models there spend much of their time per operator, not per FLOP). Counted
    in the trace, so deterministic: every executor and rank makes the same split."""
    if device_type != "cpu":
        return [u.flops for u in graph.units]
    return [u.flops + CPU_OP_FLOPS * u.ops + CPU_ELEMENT_FLOPS * u.elements for u in graph.units]


def _device_type(denoiser):
    """Where `denoiser`'s weights are ("cpu", "cuda", "meta"), or None without one."""
    if denoiser is None:
        return None
    return next((p.device.type for p in denoiser.parameters()), None)


def upstream_table(denoiser, n_components):
    """(family, the reference code's split) for `denoiser`'s block structure, found
    without a trace; ValueError naming the fix where none is published."""
    family = recognise_family(denoiser) if denoiser is not None else None
    table = SPLITS.get(family, {}).get(n_components)
    if table is None:
        known = ", ".join(f"{f} (N={'/'.join(map(str, t))})" for f, t in SPLITS.items())
        found = f"a {family} denoiser" if family else "an architecture with no published split"
        raise ValueError(
            f'partition="upstream" has no table for {found} with n_components={n_components}; '
            f'published splits exist for {known}. Use partition="auto" or an explicit list of lists'
        )
    return family, table


def _normalise(path):
    return re.sub(r"\[(\d+)\]", r".\1", str(path)).strip(".")


def _explicit(graph, lists, strategy):
    paths, owner = graph.paths, {}
    for c, entries in enumerate(lists):
        if isinstance(entries, str):
            raise ValueError(f"component {c} is the string {entries!r}; give a list of module paths")
        for entry in entries:
            name = _normalise(entry)
            matched = [p for p in paths if p == name or p.startswith(name + ".")]
            if not matched:
                near = [p for p in paths if p.split(".")[0] == name.split(".")[0]][:6]
                raise ValueError(
                    f"partition entry {entry!r} names no unit of this denoiser; units look like "
                    f"{', '.join(near or paths[:6])} (see `asyncdiff-rt plan` for the full list)"
                )
            for p in matched:
                if p in owner:
                    raise ValueError(
                        f"unit {p!r} is listed twice (components {owner[p]} and {c}); give each unit to one component"
                    )
                owner[p] = c
    missing = [p for p in paths if p not in owner]
    if missing:
        raise ValueError(f"the partition leaves units without a component: {', '.join(missing)}; add them to a list")
    components = tuple(tuple(p for p in paths if owner[p] == c) for c in range(len(lists)))
    empty = [c for c, comp in enumerate(components) if not comp]
    if empty:
        raise ValueError(f"component(s) {empty} hold no unit; give every component at least one module")
    out, last = graph.output_unit, len(lists) - 1
    if owner[out] != last:
        raise ValueError(
            f"{out!r} produces the denoiser's output, so it must be in the last component "
            f"({last}), not in component {owner[out]}; move it to the last list"
        )
    return Partition(components, strategy)


def _auto(graph, n, costs, strategy):
    cuts = _contiguous_cuts(costs, n)
    contiguous = [c for c in range(n) for _ in range(cuts[c], cuts[c + 1])]
    assign = _improve(costs, contiguous, n, pinned=graph.paths.index(graph.output_unit))
    if _largest(costs, contiguous, n) <= _largest(costs, assign, n) * (1 + TIE):
        assign = contiguous  # as good: a contiguous split sends fewer activations (a transformer's are all alike)
    # Number components by first unit, with the output unit's component last.
    out_comp = assign[graph.paths.index(graph.output_unit)]
    order = [c for c in dict.fromkeys(assign) if c != out_comp] + [out_comp]
    rank = {c: i for i, c in enumerate(order)}
    components = tuple(tuple(p for p, a in zip(graph.paths, assign) if rank[a] == c) for c in range(n))
    return Partition(components, strategy)


def _largest(costs, assign, n):
    loads = [0] * n
    for cost, c in zip(costs, assign):
        loads[c] += cost
    return max(loads)


def _contiguous_cuts(costs, n):
    """Boundaries of the contiguous split into n non-empty parts with the smallest maximum."""
    m = len(costs)
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    best = [[inf] * (m + 1) for _ in range(n + 1)]
    back = [[0] * (m + 1) for _ in range(n + 1)]
    best[0][0] = 0
    for k in range(1, n + 1):
        for j in range(k, m - (n - k) + 1):
            for i in range(k - 1, j):
                value = max(best[k - 1][i], prefix[j] - prefix[i])
                if value < best[k][j]:
                    best[k][j], back[k][j] = value, i
    cuts, j = [m], m
    for k in range(n, 0, -1):
        j = back[k][j]
        cuts.append(j)
    return cuts[::-1]


def _improve(costs, assign, n, pinned):
    """Move or swap single units between components while that lowers the largest load.

    This is where non-contiguous splits come from: a move is taken only when both
    components it touches end below the current largest load."""
    assign = list(assign)
    while True:
        loads = [0] * n
        for unit, c in enumerate(assign):
            loads[c] += costs[unit]
        top = max(loads)
        heavy = loads.index(top)
        best = None  # (new max over the two components touched, unit, target, swap partner)
        for u, cu in enumerate(assign):
            if cu != heavy or u == pinned:
                continue
            for target in range(n):
                if target == heavy:
                    continue
                if assign.count(heavy) > 1:
                    worst = max(loads[heavy] - costs[u], loads[target] + costs[u])
                    if worst < top and (best is None or worst < best[0]):
                        best = (worst, u, target, None)
                for v, cv in enumerate(assign):
                    if cv != target or v == pinned or costs[v] >= costs[u]:
                        continue
                    delta = costs[u] - costs[v]
                    worst = max(loads[heavy] - delta, loads[target] + delta)
                    if worst < top and (best is None or worst < best[0]):
                        best = (worst, u, target, v)
        if best is None:  # each move lowers (largest load, how many components carry it)
            return assign
        _, u, target, v = best
        assign[u] = target
        if v is not None:
            assign[v] = heavy


MAX_IMBALANCE = 1.10  # "quality" keeps the largest component within 10% of the mean (FLOPs)


def contiguous_splits(costs, n, max_imbalance=MAX_IMBALANCE):
    """Every split of units in execution order into n contiguous non-empty runs whose
    largest cost is at most max_imbalance times the mean, as tuples of n-1 cut positions
    (a cut at i starts a component at unit i). Where none is that balanced, those within
    TIE of the most balanced contiguous split (a model of few equal blocks, e.g. six
    transformer blocks in four components, cannot do better)."""
    limit = max(max_imbalance, _largest_contiguous(costs, n) * n / sum(costs) * (1 + TIE)) * sum(costs) / n
    m, found = len(costs), []

    def extend(start, cuts):
        if len(cuts) == n - 1:
            if sum(costs[start:]) <= limit:
                found.append(tuple(cuts))
            return
        load = 0.0
        for end in range(start + 1, m - (n - 1 - len(cuts)) + 1):
            load += costs[end - 1]
            if load > limit:
                return
            extend(end, cuts + [end])

    extend(0, [])
    return found


def _largest_contiguous(costs, n):
    cuts = _contiguous_cuts(costs, n)
    return max(sum(costs[a:b]) for a, b in zip(cuts, cuts[1:]))


def quality_split(graph, n, cut_cost, max_imbalance=MAX_IMBALANCE, costs=None):
    """The contiguous split, balanced within max_imbalance (FLOPs, or `costs`), whose cuts
    cost the least in sum: `cut_cost[i]` is what a cut before unit i costs in quality (the
    error measured with that one cut, sensitivity.py). Ties go to the better balance."""
    splits = ranked_splits(graph, n, cut_cost, max_imbalance, costs)
    return splits[0]


def ranked_splits(graph, n, cut_cost, max_imbalance=MAX_IMBALANCE, costs=None):
    """Partitions of `contiguous_splits`, cheapest summed cut cost first."""
    costs = [u.flops for u in graph.units] if costs is None else list(costs)
    total = sum(costs)

    def key(cuts):
        bounds = (0, *cuts, len(costs))
        largest = max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))
        return (sum(cut_cost[i] for i in cuts), largest / total)

    return [_from_cuts(graph, cuts, "quality") for cuts in sorted(contiguous_splits(costs, n, max_imbalance), key=key)]


def _from_cuts(graph, cuts, strategy):
    bounds = (0, *cuts, len(graph.paths))
    return Partition(tuple(tuple(graph.paths[a:b]) for a, b in zip(bounds, bounds[1:])), strategy)
