"""Run `asyncdiff-rt plan` and keep what it traced: shared by the plan tests."""
import contextlib
import io

import pytest

import asyncdiff_rt.plan as plan_module
from asyncdiff_rt.cli import main


def plan_and_keep(runs):
    """{key: (printed text, denoiser, UnitGraph)} for `runs` {key: plan argv}; each
    command's trace is recorded (the trace cache makes a later plan of it cheap)."""
    real, seen, out = plan_module.traced_units, [], {}

    def recording(denoiser, make_inputs):
        seen.append((denoiser, real(denoiser, make_inputs)))
        return seen[-1][1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plan_module, "traced_units", recording)
        for key, argv in runs.items():
            text = io.StringIO()
            with contextlib.redirect_stdout(text):
                assert main(["plan", *argv]) == 0
            out[key] = (text.getvalue(), *seen.pop())
    return out
