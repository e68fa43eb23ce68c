"""asyncdiff_rt: asynchronous denoising (AsyncDiff) runtime for diffusion models.

The public names are imported on first use, so that `import asyncdiff_rt` (and the
command line's `--help`) does not pay for torch and diffusers.
"""
import importlib
import importlib.util

__version__ = "0.1.0"
__all__ = ["parallelize", "parallelize_denoiser", "AsyncDiffHandle", "Plan", "make_plan", "backend_info",
           "StepCache", "__version__"]

_LAZY = {
    "backend_info": ".backend",
    "AsyncDiffHandle": ".integrations.diffusers",
    "parallelize": ".integrations.diffusers",
    "parallelize_denoiser": ".integrations.steps",
    "Plan": ".plan",
    "make_plan": ".plan",
    "StepCache": ".step_cache",
}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    # Submodules the eager package used to import along (asyncdiff_rt.trace, ...).
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
