"""The kernels compile for the GPUs we target, with the specialisations the launchers produce.

The interpreter runs kernels as Python, so it never sees what Triton's compiler
sees: integer arguments equal to 1 become compile-time constants, and aligned
pointers and multiples of 16 get divisibility hints. Here the launchers run on
small CPU tensors with the launch intercepted, and each captured launch is
compiled (no GPU needed) for sm_86 (A5000) and sm_90 (H100). At SD shapes the
GroupNorm passes must use vector loads and stores.
"""
import importlib
import inspect
import re

import pytest
import torch

import asyncdiff_rt.kernels  # noqa: F401  (binds the submodules)

triton = pytest.importorskip("triton")
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:  # pragma: no cover - other Triton versions
    pytest.skip("this Triton has no ASTSource/GPUTarget API", allow_module_level=True)

gn = importlib.import_module("asyncdiff_rt.kernels.group_norm")
ss = importlib.import_module("asyncdiff_rt.kernels.scheduler_step")
_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
TARGETS = [GPUTarget("cuda", 86, 32), GPUTarget("cuda", 90, 32)]


class _Capture:
    def __init__(self, lazy):
        self.fn, self.calls = lazy.fn, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def _captured(monkeypatch, module, names, launch):
    caps = {name: _Capture(getattr(module, name)) for name in names}
    for name, cap in caps.items():
        monkeypatch.setattr(module, name, cap)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # pass the launchers' device check on the CPU
    launch()
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # and compile for real below
    return [(cap.fn, args, kwargs) for cap in caps.values() for args, kwargs in cap.calls]


def _compile(fn, args, kwargs, target):
    """Specialise like Triton's JIT does, then compile to a cubin."""
    names = list(inspect.signature(fn).parameters)
    kwargs = dict(kwargs)
    warps = kwargs.pop("num_warps", 4)
    sig, consts, attrs = {}, dict(kwargs), {}
    for i, (name, value) in enumerate(zip(names, args)):
        if isinstance(value, torch.Tensor):
            sig[name] = _PTR[value.dtype]
            hint = value.data_ptr() % 16 == 0
        elif isinstance(value, bool) or value == 1 and isinstance(value, int):
            sig[name], consts[name], hint = "constexpr", value, False
        elif isinstance(value, int):
            sig[name], hint = ("i32" if -2**31 <= value < 2**31 else "i64"), value % 16 == 0
        else:
            sig[name], hint = "fp32", False
        if hint:
            attrs[(i,)] = [["tt.divisibility", 16]]
    for name in kwargs:
        sig[name] = "constexpr"
    try:
        return triton.compile(ASTSource(triton.jit(fn), sig, consts, attrs), target=target,
                              options={"num_warps": warps})
    except RuntimeError as exc:  # only the toolchain missing is a skip; compile errors fail
        if "ptxas" in str(exc) and "not found" in str(exc).lower():
            pytest.skip(f"no ptxas in this Triton install: {exc}")
        raise


def _vectorised(kernel):
    ptx = kernel.asm["ptx"]
    return bool(re.search(r"ld\.global[\w.]*\.v[248]", ptx)) and bool(re.search(r"st\.global[\w.]*\.v[248]", ptx))


CASES = [  # (name, shape, groups, layout): SD 1.5 at 512 px, in each layout the launcher sees
    ("nchw", (2, 320, 64, 64), 32, None),
    ("channels_last", (2, 640, 32, 32), 32, torch.channels_last),
    ("video", (1, 320, 3, 8, 16), 32, "video"),
    ("odd", (3, 30, 3, 5), 5, None),
]


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: f"sm{t.arch}")
@pytest.mark.parametrize("name,shape,groups,layout", CASES, ids=[c[0] for c in CASES])
def test_group_norm_compiles(monkeypatch, name, shape, groups, layout, target):
    if layout == "video":
        b, c, f, h, w = shape
        x = torch.empty(b, f, c, h, w, dtype=torch.float16).permute(0, 2, 1, 3, 4)
    else:
        x = torch.empty(shape, dtype=torch.float16)
        if layout is not None:
            x = x.contiguous(memory_format=layout)
    w = torch.ones(shape[1], dtype=torch.float16)
    launches = _captured(monkeypatch, gn, ["_stats", "_combine", "_apply"],
                         lambda: gn.group_norm(x, groups, w, w, 1e-5, silu=True))
    assert len(launches) == 3
    for fn, args, kwargs in launches:
        kernel = _compile(fn, args, kwargs, target)
        if fn is gn._apply_kernel and name != "odd":
            assert _vectorised(kernel), f"{name}: the apply pass lost its vector loads/stores"


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: f"sm{t.arch}")
def test_scheduler_step_compiles(monkeypatch, target):
    sample = torch.empty(2, 4, 64, 64, dtype=torch.float16)
    coef = ss.StepCoefficients(1.0, -0.5, 0.9, 0.1, 0.0, 0.3, clip=1.0)
    launches = _captured(monkeypatch, ss, ["_step"], lambda: (
        ss.scheduler_step(torch.empty(4, 4, 64, 64, dtype=torch.float16), sample, coef, 7.5, sample),
        ss.scheduler_step(sample, sample, ss.StepCoefficients(1.0, -0.5, 0.9, 0.1))))
    assert len(launches) == 2
    for fn, args, kwargs in launches:
        assert _vectorised(_compile(fn, args, kwargs, target))
