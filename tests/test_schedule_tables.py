"""The program tables of `schedule.build_program`, written out by hand from SEMANTICS.md.

No torch: like DeepSpeed's schedule tests, these read the instruction stream only.

One row per step, ``"<phase> <forwards> ><emit>"``:

- ``W@j``   the warm-up forward of the whole denoiser at timestep T[j];
- ``d@j``   a forward on device d at timestep T[j];
- a trailing ``!`` on a forward: it commits (its units' outputs become the cache);
- ``>W``    eps is the warm-up forward's output, ``>d`` the output of the forward on
  device d, ``>cache`` the denoiser's output assembled from the cache, ``>prev``
  the previous step's eps.

The last step runs only the host's forward, without commit: nothing reads a commit after
it, and eps is the same as if every device ran (SEMANTICS.md lets executors run less).

In the stride-2 tables a reuse row is written ``reuse >R``: SEMANTICS.md makes it
``>cache`` with stride_reuse="component" and ``>prev`` with stride_reuse="previous";
every stride-2 table is checked with both.
"""
import re
from textwrap import dedent

import pytest

from asyncdiff_rt.schedule import (
    Emit,
    Forward,
    Send,
    SendLatent,
    TransferPlan,
    build_program,
    critical_path_steps,
    validate_settings,
)

# (N, S, W, time_shift, K, table)
TABLES = [
    # ---- stride 1: every step k >= W runs all N devices at T[k - sh], all commit, eps from N-1
    (2, 1, 1, False, 6, """
        warmup W@0! >W
        async 0@1! 1@1! >1
        async 0@2! 1@2! >1
        async 0@3! 1@3! >1
        async 0@4! 1@4! >1
        async 1@5 >1
    """),
    (2, 1, 1, True, 7, """
        warmup W@0! >W
        async 0@0! 1@0! >1
        async 0@1! 1@1! >1
        async 0@2! 1@2! >1
        async 0@3! 1@3! >1
        async 0@4! 1@4! >1
        async 1@5 >1
    """),
    (2, 1, 2, False, 7, """
        warmup W@0 >W
        warmup W@1! >W
        async 0@2! 1@2! >1
        async 0@3! 1@3! >1
        async 0@4! 1@4! >1
        async 0@5! 1@5! >1
        async 1@6 >1
    """),
    (2, 1, 2, True, 6, """
        warmup W@0 >W
        warmup W@1! >W
        async 0@1! 1@1! >1
        async 0@2! 1@2! >1
        async 0@3! 1@3! >1
        async 1@4 >1
    """),
    (2, 1, 3, False, 8, """
        warmup W@0 >W
        warmup W@1 >W
        warmup W@2! >W
        async 0@3! 1@3! >1
        async 0@4! 1@4! >1
        async 0@5! 1@5! >1
        async 0@6! 1@6! >1
        async 1@7 >1
    """),
    (2, 1, 3, True, 6, """
        warmup W@0 >W
        warmup W@1 >W
        warmup W@2! >W
        async 0@2! 1@2! >1
        async 0@3! 1@3! >1
        async 1@4 >1
    """),
    (3, 1, 1, False, 7, """
        warmup W@0! >W
        async 0@1! 1@1! 2@1! >2
        async 0@2! 1@2! 2@2! >2
        async 0@3! 1@3! 2@3! >2
        async 0@4! 1@4! 2@4! >2
        async 0@5! 1@5! 2@5! >2
        async 2@6 >2
    """),
    (3, 1, 1, True, 6, """
        warmup W@0! >W
        async 0@0! 1@0! 2@0! >2
        async 0@1! 1@1! 2@1! >2
        async 0@2! 1@2! 2@2! >2
        async 0@3! 1@3! 2@3! >2
        async 2@4 >2
    """),
    (3, 1, 2, False, 6, """
        warmup W@0 >W
        warmup W@1! >W
        async 0@2! 1@2! 2@2! >2
        async 0@3! 1@3! 2@3! >2
        async 0@4! 1@4! 2@4! >2
        async 2@5 >2
    """),
    (3, 1, 2, True, 8, """
        warmup W@0 >W
        warmup W@1! >W
        async 0@1! 1@1! 2@1! >2
        async 0@2! 1@2! 2@2! >2
        async 0@3! 1@3! 2@3! >2
        async 0@4! 1@4! 2@4! >2
        async 0@5! 1@5! 2@5! >2
        async 2@6 >2
    """),
    (3, 1, 3, False, 6, """
        warmup W@0 >W
        warmup W@1 >W
        warmup W@2! >W
        async 0@3! 1@3! 2@3! >2
        async 0@4! 1@4! 2@4! >2
        async 2@5 >2
    """),
    (3, 1, 3, True, 7, """
        warmup W@0 >W
        warmup W@1 >W
        warmup W@2! >W
        async 0@2! 1@2! 2@2! >2
        async 0@3! 1@3! 2@3! >2
        async 0@4! 1@4! 2@4! >2
        async 2@5 >2
    """),
    # ---- stride 2: compute at k = W, W+2, ...; devices < N at T[k+1-sh] (T[k-sh] at the
    # last step) and commit; the stride device N at T[k-sh], no commit, gives eps.
    (2, 2, 1, False, 6, """
        warmup W@0! >W
        compute 0@2! 1@2! 2@1 >2
        reuse >R
        compute 0@4! 1@4! 2@3 >2
        reuse >R
        compute 2@5 >2
    """),
    (2, 2, 1, True, 7, """
        warmup W@0! >W
        compute 0@1! 1@1! 2@0 >2
        reuse >R
        compute 0@3! 1@3! 2@2 >2
        reuse >R
        compute 0@5! 1@5! 2@4 >2
        reuse >R
    """),
    (2, 2, 2, False, 7, """
        warmup W@0 >W
        warmup W@1! >W
        compute 0@3! 1@3! 2@2 >2
        reuse >R
        compute 0@5! 1@5! 2@4 >2
        reuse >R
        compute 2@6 >2
    """),
    (2, 2, 2, True, 8, """
        warmup W@0 >W
        warmup W@1! >W
        compute 0@2! 1@2! 2@1 >2
        reuse >R
        compute 0@4! 1@4! 2@3 >2
        reuse >R
        compute 0@6! 1@6! 2@5 >2
        reuse >R
    """),
    (2, 2, 3, False, 8, """
        warmup W@0 >W
        warmup W@1 >W
        warmup W@2! >W
        compute 0@4! 1@4! 2@3 >2
        reuse >R
        compute 0@6! 1@6! 2@5 >2
        reuse >R
        compute 2@7 >2
    """),
    (2, 2, 3, True, 7, """
        warmup W@0 >W
        warmup W@1 >W
        warmup W@2! >W
        compute 0@3! 1@3! 2@2 >2
        reuse >R
        compute 0@5! 1@5! 2@4 >2
        reuse >R
    """),
    (3, 2, 1, False, 7, """
        warmup W@0! >W
        compute 0@2! 1@2! 2@2! 3@1 >3
        reuse >R
        compute 0@4! 1@4! 2@4! 3@3 >3
        reuse >R
        compute 0@6! 1@6! 2@6! 3@5 >3
        reuse >R
    """),
    (3, 2, 1, True, 6, """
        warmup W@0! >W
        compute 0@1! 1@1! 2@1! 3@0 >3
        reuse >R
        compute 0@3! 1@3! 2@3! 3@2 >3
        reuse >R
        compute 3@4 >3
    """),
    (3, 2, 2, False, 8, """
        warmup W@0 >W
        warmup W@1! >W
        compute 0@3! 1@3! 2@3! 3@2 >3
        reuse >R
        compute 0@5! 1@5! 2@5! 3@4 >3
        reuse >R
        compute 0@7! 1@7! 2@7! 3@6 >3
        reuse >R
    """),
    (3, 2, 2, True, 7, """
        warmup W@0 >W
        warmup W@1! >W
        compute 0@2! 1@2! 2@2! 3@1 >3
        reuse >R
        compute 0@4! 1@4! 2@4! 3@3 >3
        reuse >R
        compute 3@5 >3
    """),
    (3, 2, 3, False, 7, """
        warmup W@0 >W
        warmup W@1 >W
        warmup W@2! >W
        compute 0@4! 1@4! 2@4! 3@3 >3
        reuse >R
        compute 0@6! 1@6! 2@6! 3@5 >3
        reuse >R
    """),
    (3, 2, 3, True, 6, """
        warmup W@0 >W
        warmup W@1 >W
        warmup W@2! >W
        compute 0@3! 1@3! 2@3! 3@2 >3
        reuse >R
        compute 3@4 >3
    """),
]

REUSE_EMIT = {"component": ">cache", "previous": ">prev"}


def transfers_for(n, stride):
    """A small hand-made transfer plan: units a, b, c in a chain a -> b -> c (c makes
    the output), with c also reading a (a skip connection); a reads the latent."""
    if n == 2:
        owner = {"a": 0, "b": 1, "c": 1}
        receives = [(), ("a",)]
        latent = [True, False]
    else:
        owner = {"a": 0, "b": 1, "c": 2}
        receives = [(), ("a",), ("a", "b")]
        latent = [True, False, False]
    if stride == 2:  # the stride device runs a copy of the last component
        receives.append(receives[-1])
        latent.append(True)  # it is the host: it holds the latent already
    return TransferPlan(owner=owner, receives=tuple(receives), reads_latent=tuple(latent), emit_reads=("c",))


def render(program):
    """The program in the table notation of this module's docstring (formatting only)."""
    rows = []
    for step in program.steps:
        parts = [step.phase]
        forwards = sorted(step.forwards(), key=lambda f: -1 if f.device is None else f.device)
        for f in forwards:
            who = "W" if f.device is None else str(f.device)
            parts.append(f"{who}@{f.tau_index}{'!' if f.commit else ''}")
        emit = step.emit()
        if emit.source == "forward":
            parts.append(">" + ("W" if emit.device is None else str(emit.device)))
        else:
            parts.append({"cache": ">cache", "previous": ">prev"}[emit.source])
        rows.append(" ".join(parts))
    return rows


def expected_rows(table, stride_reuse):
    rows = [r.strip() for r in dedent(table).strip().splitlines()]
    return [r.replace(">R", REUSE_EMIT[stride_reuse]) for r in rows]


def _table_cases():
    for n, s, w, shift, k, table in TABLES:
        for reuse in (("component", "previous") if s == 2 else ("component",)):
            yield pytest.param(n, s, w, shift, k, reuse, table, id=f"N{n}-S{s}-W{w}-{'shift' if shift else 'noshift'}-K{k}-{reuse}")


def _program_cases():
    for n, s, w, shift, k, _ in TABLES:
        for reuse in ("component", "previous"):
            yield pytest.param(n, s, w, shift, k, reuse, id=f"N{n}-S{s}-W{w}-{'shift' if shift else 'noshift'}-K{k}-{reuse}")


def test_tables_cover_every_setting():
    seen = {(n, s, w, shift) for n, s, w, shift, _, _ in TABLES}
    assert seen == {(n, s, w, sh) for n in (2, 3) for s in (1, 2) for w in (1, 2, 3) for sh in (False, True)}
    for n, s, w, shift, k, table in TABLES:
        assert len(dedent(table).strip().splitlines()) == k, (n, s, w, shift, k)


@pytest.mark.parametrize("n,s,w,shift,k,reuse,table", list(_table_cases()))
def test_program_table(n, s, w, shift, k, reuse, table):
    program = build_program(k, w, s, n, transfers_for(n, s), time_shift=shift, stride_reuse=reuse)
    assert (program.num_steps, program.warmup, program.stride, program.n_components) == (k, w, s, n)
    assert program.n_devices == n + s - 1 and program.host == n + s - 2
    assert [st.index for st in program.steps] == list(range(k))
    assert render(program) == expected_rows(table, reuse), "\n" + str(program)


@pytest.mark.parametrize("n,s,w,shift,k", [(2, 1, 2, False, 6), (3, 1, 3, True, 7)])
def test_stride_reuse_does_not_change_a_stride1_program(n, s, w, shift, k):
    plan = transfers_for(n, s)
    a = build_program(k, w, s, n, plan, time_shift=shift, stride_reuse="component")
    b = build_program(k, w, s, n, plan, time_shift=shift, stride_reuse="previous")
    assert a.steps == b.steps


def test_one_component_is_sequential_every_step():
    plan = TransferPlan(owner={"a": 0, "c": 0}, receives=((),), reads_latent=(True,), emit_reads=("c",))
    for w in (1, 2, 3):
        rows = render(build_program(5, w, 1, 1, plan))
        assert rows == [f"warmup W@{k}{'!' if k == w - 1 else ''} >W" for k in range(w)] + [
            f"async 0@{k}{'!' if k < 4 else ''} >0" for k in range(w, 5)
        ]


def test_warmup_equal_to_steps_is_all_warmup():
    rows = render(build_program(4, 4, 2, 3, transfers_for(3, 2), time_shift=True))
    assert rows == ["warmup W@0 >W", "warmup W@1 >W", "warmup W@2 >W", "warmup W@3! >W"]


@pytest.mark.parametrize("n,s,w,shift,k,reuse", list(_program_cases()))
def test_sends_precede_their_readers(n, s, w, shift, k, reuse):
    """Every Send sits in a step before the Forward on its destination (or, at a reuse
    step, before the Emit(cache) on the host), its source is the unit's owner, and it
    comes before any committing Forward on that source in the same step: the destination
    gets the commit of an earlier step, never this step's."""
    plan = transfers_for(n, s)
    program = build_program(k, w, s, n, plan, time_shift=shift, stride_reuse=reuse)
    host = n + s - 2
    for step in program.steps:
        ins = list(step.instructions)
        for i, x in enumerate(ins):
            if isinstance(x, (Send, SendLatent)):
                later = ins[i + 1:]
                readers = [y for y in later if isinstance(y, Forward) and y.device == x.dst]
                readers += [y for y in later if isinstance(y, Emit) and y.source == "cache" and x.dst == host == y.device]
                assert readers, f"step {step.index}: {x!r} has no reader after it in {ins}"
            if isinstance(x, Send):
                assert x.src == plan.owner[x.unit], (step.index, x)
                assert x.src != x.dst, (step.index, x)
                earlier = ins[:i]
                assert not any(isinstance(y, Forward) and y.device == x.src and y.commit for y in earlier), (
                    f"step {step.index}: {x!r} after its source committed this step"
                )
        if step.phase == "warmup":
            assert not any(isinstance(x, (Send, SendLatent)) for x in ins)


@pytest.mark.parametrize("n,s,w,shift,k,reuse", list(_program_cases()))
def test_every_forward_gets_what_its_device_needs(n, s, w, shift, k, reuse):
    """Each asynchronous forward on device d is preceded, in its step, by a Send of every
    unit in receives[d], and by the latent when d reads it (the host holds it already);
    a reuse step with stride_reuse="component" fetches exactly the emit_reads units to the host."""
    plan = transfers_for(n, s)
    program = build_program(k, w, s, n, plan, time_shift=shift, stride_reuse=reuse)
    host = n + s - 2
    for step in program.steps:
        sends = [x for x in step.instructions if isinstance(x, Send)]
        latents = [x.dst for x in step.instructions if isinstance(x, SendLatent)]
        if step.phase in ("async", "compute"):
            running = list(range(n + s - 1)) if step.index < k - 1 else [host]  # the last step: host only
            assert sorted(f.device for f in step.forwards()) == running
            for d in running:
                got = {x.unit for x in sends if x.dst == d}
                assert got >= set(plan.receives[d]), (step.index, d, got)
            assert {x.dst for x in sends} <= set(running)
            assert sorted(latents) == [d for d in running if plan.reads_latent[d] and d != host]
            assert step.emit() == Emit("forward", host)
        elif step.phase == "reuse":
            assert not step.forwards()
            assert not latents
            if reuse == "component":
                assert sorted((x.unit, x.src, x.dst) for x in sends) == [("c", n - 1, host)]
                assert step.emit() == Emit("cache", host)
            else:
                assert not sends
                assert step.emit().source == "previous"


@pytest.mark.parametrize(
    "k,w,s,expected",
    [
        (50, 1, 1, 50),
        (50, 3, 1, 50),
        (8, 8, 1, 8),
        (50, 1, 2, 26),  # warm-up 0, compute 1, 3, ..., 49
        (50, 3, 2, 27),  # warm-up 0-2, compute 3, 5, ..., 49
        (50, 2, 2, 26),  # warm-up 0-1, compute 2, 4, ..., 48
        (7, 2, 2, 5),  # warm-up 0-1, compute 2, 4, 6
        (8, 2, 2, 5),  # warm-up 0-1, compute 2, 4, 6; 7 reuses
        (6, 6, 2, 6),
        (6, 5, 2, 6),  # warm-up 0-4, compute 5
    ],
)
def test_critical_path_steps(k, w, s, expected):
    assert critical_path_steps(k, w, s) == expected


@pytest.mark.parametrize("n,s,w,shift,k,reuse", list(_program_cases()))
def test_critical_path_counts_steps_with_forwards(n, s, w, shift, k, reuse):
    program = build_program(k, w, s, n, transfers_for(n, s), time_shift=shift, stride_reuse=reuse)
    assert critical_path_steps(k, w, s) == sum(1 for st in program.steps if st.forwards())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_steps=6, warmup=0, stride=1), "warmup"),
        (dict(num_steps=6, warmup=-1, stride=1), "warmup"),
        (dict(num_steps=6, warmup=7, stride=1), "warmup"),
        (dict(num_steps=6, warmup=2, stride=3), "stride"),
        (dict(num_steps=6, warmup=2, stride=0), "stride"),
        (dict(num_steps=6, warmup=2, stride=2, stride_reuse="cache"), "stride_reuse"),
    ],
)
def test_invalid_settings_raise(kwargs, match):
    n = 2
    s = kwargs["stride"] if kwargs["stride"] in (1, 2) else 1
    plan = transfers_for(n, s)
    with pytest.raises(ValueError, match=match):
        build_program(kwargs["num_steps"], kwargs["warmup"], kwargs["stride"], n, plan,
                      stride_reuse=kwargs.get("stride_reuse", "component"))
    with pytest.raises(ValueError, match=match):
        validate_settings(kwargs["num_steps"], kwargs["warmup"], kwargs["stride"], n,
                          stride_reuse=kwargs.get("stride_reuse", "component"))
    if "stride_reuse" not in kwargs:
        with pytest.raises(ValueError, match=match):
            critical_path_steps(kwargs["num_steps"], kwargs["warmup"], kwargs["stride"])


def test_warmup_equal_to_steps_is_valid_and_unknown_steps_skip_the_bound():
    validate_settings(6, 6, 2, 2)
    validate_settings(None, 9, 1, 2)  # make_plan validates before the step count is known


def test_transfer_plan_must_cover_every_device():
    with pytest.raises(ValueError):
        build_program(6, 1, 2, 2, transfers_for(2, 1))


@pytest.mark.parametrize("n,s,w,shift,k,reuse", [(2, 1, 2, True, 6, "component"), (3, 2, 1, False, 7, "component"),
                                                   (3, 2, 3, True, 6, "previous")])
def test_program_str_is_printable_and_mentions_every_step(n, s, w, shift, k, reuse):
    program = build_program(k, w, s, n, transfers_for(n, s), time_shift=shift, stride_reuse=reuse)
    text = str(program)
    assert text.isprintable() or all(line.isprintable() for line in text.splitlines())
    lines = text.splitlines()
    for step in program.steps:
        hits = [line for line in lines if re.search(rf"\bstep\s+{step.index}\b", line)]
        assert len(hits) == 1, (step.index, text)
        assert step.phase in hits[0]
    assert f"K={k}" in lines[0] and f"W={w}" in lines[0]
