"""Which transfer path is live and why: `_C`, `cupy`, `torch` or `cpu`.

Preference order: the extension `asyncdiff_rt._C` when it is built and sees a
GPU; `cupy` copies when CuPy is installed and `_C` is not usable; `torch`
copies on streams; plain `cpu` copies. Probing never raises: a missing build,
a missing GPU or a driver too old for the toolkit each become a reason string.
Results are cached for the process (devices do not come and go).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util

BACKENDS = ("_C", "cupy", "torch", "cpu")


def _version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}" if v else "none"


@functools.lru_cache(maxsize=None)
def _torch_cuda() -> tuple[bool, str, int]:
    import torch

    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return False, f"torch {torch.__version__} ({build}) sees no CUDA device", 0
    n = torch.cuda.device_count()
    return True, f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees {n} GPU(s)", n


@functools.lru_cache(maxsize=None)
def _extension() -> dict:
    """Facts about asyncdiff_rt._C: built?, usable?, versions, the error if not."""
    info = {"built": False, "usable": False, "path": None, "devices": 0, "error": None}
    try:
        C = importlib.import_module("asyncdiff_rt._C")
    except ImportError as e:
        info["error"] = (f"extension not built ({e}); it is built by `pip install -e .` when a CUDA "
                         "toolkit (nvcc) is found, or forced with ASYNCDIFF_RT_BUILD_EXT=1")
        return info
    info.update(built=True, path=C.__file__, build=C.build_info(),
                cuda_runtime=C.runtime_version(), cuda_driver=C.driver_version())
    try:
        info["devices"] = C.device_count()
    except C.CudaError as e:
        drv = info["cuda_driver"]
        info["error"] = (f"extension built but no usable GPU: {e} (driver: "
                         f"{'CUDA ' + _version(drv) if drv else 'none found'}; extension runtime: CUDA "
                         f"{_version(info['cuda_runtime'])})")
        return info
    if info["devices"] == 0:
        info["error"] = "extension built but no CUDA device is visible (check CUDA_VISIBLE_DEVICES)"
        return info
    info["usable"] = True
    return info


@functools.lru_cache(maxsize=None)
def _cupy() -> tuple[bool, str]:
    if importlib.util.find_spec("cupy") is None:
        return False, "cupy is not installed"
    try:
        import cupy

        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # import errors, CUDA errors: all mean "not usable"
        return False, f"cupy installed but unusable: {e}"
    return (n > 0), f"cupy {cupy.__version__} sees {n} GPU(s)"


def availability(name: str) -> tuple[bool, str]:
    """(usable, reason) for one backend; `name` is one of BACKENDS."""
    if name not in BACKENDS:
        raise ValueError(f"unknown transfer backend {name!r}; choose one of {BACKENDS}")
    if name == "cpu":
        return True, "plain synchronous copies"
    cuda_ok, cuda_reason, _ = _torch_cuda()
    if name == "torch":
        return cuda_ok, cuda_reason
    if name == "_C":
        ext = _extension()
        if not ext["usable"]:
            return False, ext["error"]
        if not cuda_ok:
            return False, f"_C sees {ext['devices']} GPU(s) but {cuda_reason}, so tensors cannot live there"
        return True, f"extension sees {ext['devices']} GPU(s) (CUDA runtime {_version(ext['cuda_runtime'])})"
    ok, reason = _cupy()
    if ok and not cuda_ok:
        return False, f"{reason} but {cuda_reason}"
    return ok, reason


def choose_backend(requested: str | None = None) -> tuple[str, str]:
    """(backend, reason). With `requested`, that backend or a RuntimeError saying why not."""
    if requested is not None:
        ok, reason = availability(requested)
        if not ok:
            raise RuntimeError(f"transfer backend {requested!r} is not available: {reason}")
        return requested, f"requested; {reason}"
    skipped = []
    for name in BACKENDS:
        if name == "cupy" and availability("_C")[0]:
            continue
        ok, reason = availability(name)
        if ok:
            return name, "; ".join(skipped + [f"so {name}: {reason}" if skipped else reason])
        skipped.append(f"{name} unusable: {reason}")
    raise AssertionError("unreachable: cpu is always available")


def backend_info() -> dict:
    """The live transfer path and why, plus what each candidate reported."""
    name, reason = choose_backend()
    import torch

    return {
        "backend": name,
        "reason": reason,
        "candidates": {b: dict(zip(("available", "reason"), availability(b))) for b in BACKENDS
                       if not (b == "cupy" and name == "_C")},
        "extension": dict(_extension()),
        "torch": {"version": torch.__version__, "cuda": torch.version.cuda,
                  "devices": _torch_cuda()[2]},
    }
