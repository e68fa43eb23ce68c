"""Kernel tests run on the CPU through the Triton interpreter when no GPU is present.

The interpreter is switched on per test module and switched off again after it, so
other tests in the session keep seeing a plain CPU process (where `apply` is a no-op).
The kernels read the mode when they launch (see kernels/_runtime.py), so setting it
here, after the package was imported, is enough.
"""
import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def triton_interpreter_without_gpu():
    if torch.cuda.is_available() or "TRITON_INTERPRET" in os.environ:
        yield
        return
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        os.environ.pop("TRITON_INTERPRET", None)
