"""Kernel tests on CPU tensors run through the Triton interpreter.

The interpreter is switched on per test module and off again after it, so other
tests in the session keep seeing a plain process (where `apply` is a no-op without
a GPU). Modules marked `gpu` run compiled kernels on CUDA tensors and keep the
environment as it is. The kernels read the mode when they launch (see
kernels/_runtime.py), so setting it here, after the package was imported, works.
"""
import os

import pytest


@pytest.fixture(autouse=True, scope="module")
def triton_interpreter_for_cpu_tests(request):
    marks = getattr(request.module, "pytestmark", [])
    marks = marks if isinstance(marks, list) else [marks]
    if any(m.name == "gpu" for m in marks) or "TRITON_INTERPRET" in os.environ:
        yield
        return
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        os.environ.pop("TRITON_INTERPRET", None)
