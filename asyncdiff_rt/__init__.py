"""asyncdiff_rt: asynchronous denoising (AsyncDiff) runtime for diffusion models."""
from .backend import backend_info
from .integrations.diffusers import AsyncDiffHandle, parallelize
from .plan import Plan, make_plan

__version__ = "0.1.0"
__all__ = ["parallelize", "AsyncDiffHandle", "Plan", "make_plan", "backend_info", "__version__"]
