"""SEMANTICS.md checked end to end on a fake denoiser that records what it reads.

The fake denoiser is a chain of *stamp* units::

    first(sample) -> blocks.0 -> blocks.1 -> blocks.2 -> blocks.3 -> out(h, skip=first, cond)

whose activations are vectors of slots: slot "x" holds the latent's step (the test
builds x_k with k in it), and each unit u owns two slots that it overwrites with
(the step it ran at, the timestep it ran with), passing every other slot through. So
the value reaching a unit names the step (and timestep) at which each upstream unit
produced it, and a glue slot after `out` names the timestep of the forward that made
eps. Each unit also logs (step, timestep, its inputs) whenever it really runs.

It runs through AsyncDenoiser with the reference executor on the CPU; the expected
values are worked out from SEMANTICS.md, directly (readable rules per step) and by a
small model of the page in slot space (exact comparison of everything).
"""
import types
from collections import Counter

import pytest
import torch

from asyncdiff_rt.async_denoiser import AsyncDenoiser
from asyncdiff_rt.engine import make_executor
from asyncdiff_rt.plan import make_plan

UNITS = ("first", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "out")
UPSTREAM = {"first": (), "blocks.0": ("first",), "blocks.1": ("blocks.0",), "blocks.2": ("blocks.1",),
            "blocks.3": ("blocks.2",), "out": ("blocks.3", "first")}
SLOT_X, SLOT_COND, SLOT_GLUE, SLOT_GLUE_X = 0, 1 + 2 * len(UNITS), 2 + 2 * len(UNITS), 3 + 2 * len(UNITS)
WIDTH = 4 + 2 * len(UNITS)
COND = 7.0

PARTITIONS = {
    1: [list(UNITS)],
    2: [["first", "blocks.0", "blocks.1"], ["blocks.2", "blocks.3", "out"]],
    3: [["first", "blocks.0"], ["blocks.1", "blocks.2"], ["blocks.3", "out"]],
    # like the reference SDXL split: the last component holds the outer units
    "2-outer": [["blocks.0", "blocks.1", "blocks.2"], ["first", "blocks.3", "out"]],
}


def _slot(unit):
    return 1 + 2 * UNITS.index(unit)


def _onehot(*slots):
    v = torch.zeros(WIDTH)
    v[list(slots)] = 1.0
    return v


class Probe:
    """The step the test loop is at and the log of real runs: instrumentation, not model
    state (no `__dict__`, so the runtime's change detection does not look inside)."""

    __slots__ = ("k", "log")

    def __init__(self):
        self.k, self.log = -1, []


class Stamp(torch.nn.Module):
    """h -> h with this unit's slots set to (clock step, timestep); logs real runs."""

    def __init__(self, path, clock, reads_cond=False):
        super().__init__()
        self.path, self.clock, self.reads_cond = path, clock, reads_cond
        self.w = torch.nn.Parameter(torch.ones(()))  # a unit has parameters; w = 1 keeps values exact
        s = _slot(path)
        own = (s, s + 1, SLOT_COND) if reads_cond else (s, s + 1)
        self.register_buffer("keep", 1.0 - _onehot(*own), persistent=False)
        self.register_buffer("step_at", _onehot(s), persistent=False)
        self.tau_at = _onehot(s + 1)
        self.cond_at = _onehot(SLOT_COND)

    def forward(self, h, temb, skip=None, cond=None):
        self.clock.log.append((self.path, self.clock.k, temb, h, skip))
        out = h * self.w * self.keep + self.step_at * float(self.clock.k) + temb * self.tau_at.to(h)
        if self.reads_cond:
            out = out + cond * self.cond_at.to(h)
        return out


class FakeDenoiser(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.clock = Probe()
        self.time_embed = torch.nn.Linear(1, 1)  # shared: reads only the timestep
        with torch.no_grad():
            self.time_embed.weight.fill_(1.0)
            self.time_embed.bias.zero_()
        self.first = Stamp("first", self.clock)
        self.blocks = torch.nn.ModuleList(Stamp(f"blocks.{i}", self.clock) for i in range(4))
        self.out = Stamp("out", self.clock, reads_cond=True)
        self.glue_tau, self.glue_x = _onehot(SLOT_GLUE), _onehot(SLOT_GLUE_X)

    def forward(self, sample, timestep, cond=None):
        temb = self.time_embed(timestep.reshape(1, 1).to(sample.dtype))
        h = self.first(sample, temb)
        skip = h
        for block in self.blocks:
            h = block(h, temb)
        y = self.out(h, temb, skip=skip, cond=cond)
        # glue after the last unit: the forward's timestep and the step of its latent
        g, gx = self.glue_tau.to(y), self.glue_x.to(y)
        return y * (1.0 - g - gx) + temb * g + sample[:, SLOT_X:SLOT_X + 1] * gx


def make_inputs():
    return torch.zeros(1, WIDTH), torch.tensor(500.0), (), {"cond": torch.full((1, 1), COND)}


def timesteps(k):
    return torch.tensor([990.0 - 110.0 * i for i in range(k)])


def latent(k):
    x = torch.full((1, WIDTH), -1.0)
    x[0, SLOT_X] = float(k)
    return x


def decode(v):
    """A slot vector as {"x": step, unit: (step, tau), "cond": c, "glue": tau, "glue_x": step}."""
    v = [float(a) for a in v.reshape(-1)]
    out = {"x": v[SLOT_X], "cond": v[SLOT_COND], "glue": v[SLOT_GLUE], "glue_x": v[SLOT_GLUE_X]}
    for u in UNITS:
        out[u] = (v[_slot(u)], v[_slot(u) + 1])
    return out


def run_async(n, stride, warmup, shift, reuse, num_steps, partition=None):
    """Run one generation through AsyncDenoiser; return (eps per step, logs per step)."""
    torch.manual_seed(0)
    den = FakeDenoiser()
    plan = make_plan(den, make_inputs, n_components=len(PARTITIONS[partition or n]), stride=stride,
                     warmup=warmup, time_shift=shift, partition=PARTITIONS[partition or n], stride_reuse=reuse)
    den.clock.log.clear()  # the trace ran the units on fake tensors
    T = timesteps(num_steps)
    scheduler = types.SimpleNamespace(timesteps=T, begin_index=None)
    executor = make_executor("reference", den, plan)
    wrapper = AsyncDenoiser(den, plan, executor, lambda: scheduler)
    cond = torch.full((1, 1), COND)
    eps, logs = [], []
    with torch.no_grad():
        for k in range(num_steps):
            den.clock.k = k
            start = len(den.clock.log)
            eps.append(wrapper(latent(k), T[k], cond=cond).clone())
            logs.append([_entry(e) for e in den.clock.log[start:]])
    executor.close()
    return eps, logs


def _entry(e):
    path, k, temb, h, skip = e
    return (path, k, float(temb.reshape(-1)[0]), decode(h), None if skip is None else decode(skip))


def run_sequential(num_steps):
    den = FakeDenoiser()
    T, cond = timesteps(num_steps), torch.full((1, 1), COND)
    eps = []
    with torch.no_grad():
        for k in range(num_steps):
            den.clock.k = k
            eps.append(den(latent(k), T[k], cond=cond).clone())
    return eps


# ---------------------------------------------------------------- SEMANTICS.md, directly

def compute_steps(num_steps, warmup):
    """Stride 2: step k >= W computes when (k - W) is even (Change 1: also for even W)."""
    return [k for k in range(warmup, num_steps) if (k - warmup) % 2 == 0]


def committed_at(k, stride, warmup, num_steps):
    """The step whose commit a forward at step k >= W reads from the cache."""
    if stride == 1:
        return k - 1  # the step before (the warm-up's last step at k = W)
    before = [j for j in compute_steps(num_steps, warmup) if j < k]
    return before[-1] if before else warmup - 1


def commit_tau(j, stride, warmup, shift, num_steps, T):
    """The timestep the owners ran with at step j, whose outputs were committed."""
    if j < warmup:
        return T[j]
    if stride == 1:
        return T[j - shift]
    return T[j + 1 - shift] if j < num_steps - 1 else T[j - shift]


def expected_runs(k, stride, warmup, shift, n, num_steps, T, owner):
    """Multiset of (unit, tau) that really run at step k."""
    if k < warmup:
        return Counter((u, T[k]) for u in UNITS)
    if stride == 1 and k < num_steps - 1:
        return Counter((u, T[k - shift]) for u in UNITS)
    if stride == 2 and k not in compute_steps(num_steps, warmup):
        return Counter()
    if k == num_steps - 1:  # the last step runs only the host: nothing reads a commit after it
        return Counter((u, T[k - shift]) for u in UNITS if owner[u] == n - 1)
    ahead = T[k + 1 - shift] if k < num_steps - 1 else T[k - shift]
    runs = Counter((u, ahead) for u in UNITS)  # devices d < N
    runs.update((u, T[k - shift]) for u in UNITS if owner[u] == n - 1)  # the stride device
    return runs


ASYNC_CASES = [
    pytest.param(n, s, w, sh, reuse, k, id=f"N{n}-S{s}-W{w}-{'shift' if sh else 'noshift'}-{reuse}-K{k}")
    for n in (2, 3) for s in (1, 2) for w in (1, 2, 3) for sh in (False, True)
    for reuse in (("component", "previous") if s == 2 else ("component",))
    for k in ((7, 8) if s == 2 else (7,))
] + [
    pytest.param("2-outer", s, w, sh, "component", 7, id=f"N2outer-S{s}-W{w}-{'shift' if sh else 'noshift'}")
    for s in (1, 2) for w in (1, 2) for sh in (False, True)
]


def _owner(partition):
    return {u: c for c, units in enumerate(PARTITIONS[partition]) for u in units}


@pytest.fixture(scope="module")
def runs():
    cache = {}

    def get(n, s, w, sh, reuse, k):
        key = (n, s, w, sh, reuse, k)
        if key not in cache:
            cache[key] = run_async(len(PARTITIONS[n]), s, w, sh, reuse, k, partition=n)
        return cache[key]

    return get


@pytest.mark.parametrize("n,s,w,sh,reuse,k", ASYNC_CASES)
def test_units_run_with_the_right_timestep(runs, n, s, w, sh, reuse, k):
    """Which units run at each step, how often and with which timestep (SEMANTICS, Step k)."""
    _, logs = runs(n, s, w, sh, reuse, k)
    owner, T, ncomp = _owner(n), [float(t) for t in timesteps(k)], len(PARTITIONS[n])
    for step in range(k):
        got = Counter((path, tau) for path, kk, tau, _, _ in logs[step])
        assert all(kk == step for _, kk, _, _, _ in logs[step])
        assert got == expected_runs(step, s, w, int(sh), ncomp, k, T, owner), f"step {step}"


@pytest.mark.parametrize("n,s,w,sh,reuse,k", ASYNC_CASES)
def test_components_see_the_commit_semantics_names(runs, n, s, w, sh, reuse, k):
    """Every unit that runs at step k >= W reads, from a unit of its own component, this
    forward's output; from any other component, the output committed at step k-1 (S=1) or
    at the previous compute step (S=2; the warm-up's last step for the first one), made
    with that step's timestep. The latent reaching `first` is x_k; cond reaches `out`."""
    _, logs = runs(n, s, w, sh, reuse, k)
    owner, T = _owner(n), [float(t) for t in timesteps(k)]
    for step in range(k):
        for path, _, tau, h, skip in logs[step]:
            inputs = {UPSTREAM[path][0]: h} if UPSTREAM[path] else {}
            if path == "out":
                inputs["first"] = skip
            if path == "first":
                assert h["x"] == step, (step, path, h)
            for v, seen in inputs.items():
                if step < w or owner[v] == owner[path]:
                    want = (step, tau)  # computed earlier in the same forward
                else:
                    j = committed_at(step, s, w, k)
                    want = (j, commit_tau(j, s, w, int(sh), k, T))
                assert seen[v] == want, f"step {step}: {path} read {v} made at {seen[v]}, want {want}"


@pytest.mark.parametrize("n,s,w,sh,reuse,k", ASYNC_CASES)
def test_prediction_comes_from_where_semantics_says(runs, n, s, w, sh, reuse, k):
    """eps_k: the warm-up forward (k < W); device N-1's forward at T[k-sh] (S=1); the
    stride device's forward at T[k-sh] (S=2 compute); at a reuse step the cache's `out`
    made by device N-1 at the compute step before, at T[k-sh], assembled at T[k-sh]
    (stride_reuse="component"), or eps_{k-1} itself (stride_reuse="previous"). The
    glue after the last unit always runs on x_k."""
    eps, _ = runs(n, s, w, sh, reuse, k)
    T, shift = [float(t) for t in timesteps(k)], int(sh)
    computes = compute_steps(k, w)
    for step in range(k):
        got = decode(eps[step])
        assert got["cond"] == COND, step
        if step < w:
            want, glue = (step, T[step]), T[step]
        elif s == 1 or step in computes:
            want, glue = (step, T[step - shift]), T[step - shift]
        elif reuse == "component":
            assert step - 1 in computes
            want, glue = (step - 1, T[step - shift]), T[step - shift]
        else:
            assert torch.equal(eps[step], eps[step - 1]), f"step {step}: not eps_{step - 1}"
            continue
        assert got["out"] == want, f"step {step}: eps from out made at {got['out']}, want {want}"
        assert got["glue"] == glue, f"step {step}: eps assembled at {got['glue']}, want {glue}"
        assert got["glue_x"] == step, f"step {step}: eps assembled on x_{got['glue_x']:g}"


# ------------------------------------------------------- SEMANTICS.md as a model, exactly

def model_run(partition, stride, warmup, shift, reuse, num_steps, cond=COND, first=0):
    """SEMANTICS.md literally, in slot space: (eps per step, Counter of runs per step), for
    one role with conditioning `cond` first called at step `first` (its steps are T[first:])."""
    comps = PARTITIONS[partition]
    n, owner = len(comps), _owner(partition)
    T = [float(t) for t in timesteps(num_steps)][first:]
    warmup, x0 = min(warmup, num_steps - first), first  # x0: the absolute step of the role's step 0
    num_steps -= first
    blank = {"x": -1.0, "cond": -1.0, "glue": -1.0, "glue_x": -1.0, **{u: (-1.0, -1.0) for u in UNITS}}
    cache, eps, runs = {}, [], []

    def forward(k, tau, compute, log):
        """The fake denoiser's dataflow; units outside `compute` return the cache."""
        outs = {}

        def unit(u, h, skip=None):
            if u not in compute:
                outs[u] = cache[u]
                return outs[u]
            log[(u, tau, _key(h), None if skip is None else _key(skip))] += 1
            y = {**h, u: (float(k + x0), tau)}
            if u == "out":
                y["cond"] = cond
            outs[u] = y
            return y

        h = unit("first", {**blank, "x": float(k + x0)})
        skip = h
        for b in UNITS[1:-1]:
            h = unit(b, h)
        y = unit("out", h, skip)
        return {**y, "glue": tau, "glue_x": float(k + x0)}, outs

    for k in range(num_steps):
        log = Counter()
        # At the last step only the host's forward runs: the others' results have no reader.
        others = log if k < num_steps - 1 else Counter()
        if k < warmup:
            e, outs = forward(k, T[k], set(UNITS), log)
            if k == warmup - 1:
                cache = dict(outs)
        elif stride == 1:
            results = [forward(k, T[k - shift], set(comps[d]), log if d == n - 1 else others) for d in range(n)]
            e = results[n - 1][0]
            cache = {u: results[owner[u]][1][u] for u in UNITS}
        elif (k - warmup) % 2 == 0:
            ahead = T[k + 1 - shift] if k < num_steps - 1 else T[k - shift]
            results = [forward(k, ahead, set(comps[d]), others) for d in range(n)]
            e = forward(k, T[k - shift], set(comps[n - 1]), log)[0]  # the stride device
            cache = {u: results[owner[u]][1][u] for u in UNITS}
        elif reuse == "component":
            e = forward(k, T[k - shift], set(), log)[0]
        else:
            e = eps[-1]
        eps.append(e)
        runs.append(log)
    return eps, runs


def _key(d):
    return tuple(sorted(d.items()))


@pytest.mark.parametrize("n,s,w,sh,reuse,k", ASYNC_CASES)
def test_matches_the_semantics_model_exactly(runs, n, s, w, sh, reuse, k):
    eps, logs = runs(n, s, w, sh, reuse, k)
    want_eps, want_runs = model_run(n, s, w, int(sh), reuse, k)
    for step in range(k):
        got = Counter((p, tau, _key(h), None if skip is None else _key(skip)) for p, _, tau, h, skip in logs[step])
        assert got == want_runs[step], f"step {step}"
        assert decode(eps[step]) == want_eps[step], f"step {step}"


# ------------------------------------------------------------- invariants of SEMANTICS.md

@pytest.mark.parametrize("w", [1, 2, 3])
def test_one_component_is_the_sequential_denoiser(w):
    eps, _ = run_async(1, 1, w, False, "component", 6)
    for k, (a, b) in enumerate(zip(eps, run_sequential(6))):
        assert torch.equal(a, b), f"step {k}: {decode(a)} != {decode(b)}"


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("s", [1, 2])
@pytest.mark.parametrize("sh", [False, True])
def test_warmup_over_all_steps_is_the_sequential_denoiser(n, s, sh):
    eps, _ = run_async(n, s, 5, sh, "component", 5)
    for k, (a, b) in enumerate(zip(eps, run_sequential(5))):
        assert torch.equal(a, b), f"step {k}: {decode(a)} != {decode(b)}"


def test_async_run_differs_from_sequential():
    """A sanity check that the probes can fail: past the warm-up, stale reads show."""
    eps, _ = run_async(2, 1, 1, False, "component", 4)
    seq = run_sequential(4)
    assert torch.equal(eps[0], seq[0])
    assert not torch.equal(eps[2], seq[2])


def test_second_generation_starts_over():
    """A new `timesteps` tensor starts a new generation: the same eps again."""
    torch.manual_seed(0)
    den = FakeDenoiser()
    plan = make_plan(den, make_inputs, n_components=2, stride=2, warmup=1, partition=PARTITIONS[2])
    executor = make_executor("reference", den, plan)
    scheduler = types.SimpleNamespace(timesteps=timesteps(5), begin_index=None)
    wrapper = AsyncDenoiser(den, plan, executor, lambda: scheduler)
    cond = torch.full((1, 1), COND)
    out = []
    with torch.no_grad():
        for _ in range(2):
            scheduler.timesteps = timesteps(5)
            gen = []
            for k in range(5):
                den.clock.k = k
                gen.append(wrapper(latent(k), scheduler.timesteps[k], cond=cond).clone())
            out.append(gen)
    executor.close()
    for a, b in zip(*out):
        assert torch.equal(a, b)


@pytest.mark.parametrize("begin_index", [None, 3])
def test_a_generation_starting_part_way_runs_over_the_rest(begin_index):
    """img2img-style: T is the scheduler's timesteps from its begin index on (found from
    the first call's timestep when the scheduler has none)."""

    def generate(scheduler, calls):
        torch.manual_seed(0)
        den = FakeDenoiser()
        plan = make_plan(den, make_inputs, n_components=2, stride=2, warmup=1, time_shift=True,
                         partition=PARTITIONS[2])
        executor = make_executor("reference", den, plan)
        wrapper = AsyncDenoiser(den, plan, executor, lambda: scheduler)
        out = []
        with torch.no_grad():
            for k, t in enumerate(calls):
                den.clock.k = k
                out.append(wrapper(latent(k), t, cond=torch.full((1, 1), COND)).clone())
        executor.close()
        return out

    full = timesteps(8)
    part = generate(types.SimpleNamespace(timesteps=full, begin_index=begin_index), full[3:])
    rest = full[3:].clone()
    whole = generate(types.SimpleNamespace(timesteps=rest, begin_index=None), rest)
    assert len(part) == len(whole) == 5
    for k, (a, b) in enumerate(zip(part, whole)):
        assert torch.equal(a, b), f"step {k}: {decode(a)} != {decode(b)}"


def run_roles(n, stride, warmup, shift, reuse, num_steps, conds, first_step):
    """One generation where role r (cond `conds[r]`) is called at every step from
    `first_step[r]` on, roles in order within a step: eps per (step, role)."""
    torch.manual_seed(0)
    den = FakeDenoiser()
    plan = make_plan(den, make_inputs, n_components=n, stride=stride, warmup=warmup, time_shift=shift,
                     partition=PARTITIONS[n], stride_reuse=reuse)
    T = timesteps(num_steps)
    scheduler = types.SimpleNamespace(timesteps=T, begin_index=None)
    executor = make_executor("reference", den, plan)
    wrapper = AsyncDenoiser(den, plan, executor, lambda: scheduler)
    eps = {}
    with torch.no_grad():
        for k in range(num_steps):
            den.clock.k = k
            for r, (c, first) in enumerate(zip(conds, first_step)):
                if k >= first:
                    eps[k, r] = wrapper(latent(k), T[k], cond=torch.full((1, 1), c)).clone()
    wrapper.close()
    return eps


@pytest.mark.parametrize("n,s,w,sh,reuse,k", [c for c in ASYNC_CASES if isinstance(c.values[0], int)][::5])
def test_each_call_role_is_its_own_stream(n, s, w, sh, reuse, k):
    """SEMANTICS, call roles: the r-th call of a step is role r, computed exactly as the
    one-call rules with its own caches; a role first seen at step k0 runs whole forwards
    for its first W steps; stale activations of one role never reach another."""
    conds, first = (COND, -3.0, 5.0), (0, 0, 2)
    eps = run_roles(n, s, w, sh, reuse, k, conds, first)
    for r, (c, f) in enumerate(zip(conds, first)):
        want, _ = model_run(n, s, w, int(sh), reuse, k, cond=c, first=f)
        for step, value in enumerate(want, start=f):
            assert decode(eps[step, r]) == value, f"role {r} step {step}: {decode(eps[step, r])} != {value}"
    with_one_role = run_roles(n, s, w, sh, reuse, k, conds[:1], first[:1])
    assert all(torch.equal(with_one_role[step, 0], eps[step, 0]) for step in range(k))
    assert all(decode(eps[step, 1])["cond"] == -3.0 for step in range(w, k))  # role 1's own activations
