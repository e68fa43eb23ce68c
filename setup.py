"""Build of asyncdiff_rt: the Python package, its Triton kernels and profiling tools.

The C++/CUDA extension (`asyncdiff_rt._C`) is added by the transfer-engine work.
"""
from setuptools import find_packages, setup

setup(
    name="asyncdiff_rt",
    version="0.1.0",
    description="Asynchronous denoising (AsyncDiff) runtime for multi-GPU diffusion",
    packages=find_packages(include=["asyncdiff_rt", "asyncdiff_rt.*"])
    + ["asyncdiff_rt.kernels", "asyncdiff_rt.profiling"],
    package_dir={
        "asyncdiff_rt.kernels": "kernels",
        "asyncdiff_rt.profiling": "profiling",
    },
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "diffusers>=0.30", "numpy"],
    entry_points={"console_scripts": ["asyncdiff-rt=asyncdiff_rt.cli:main"]},
)
