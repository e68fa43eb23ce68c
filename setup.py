"""Build of asyncdiff_rt: the Python package, its Triton kernels, profiling tools
and the optional C++/CUDA extension `asyncdiff_rt._C` (csrc/, built by CMake).

The extension is built when a CUDA toolkit (nvcc) is found and skipped, with
the reason printed, when none is. ASYNCDIFF_RT_BUILD_EXT=1 requires it (no
toolkit is then an error), ASYNCDIFF_RT_BUILD_EXT=0 skips it.
ASYNCDIFF_RT_CUDA_ARCHS overrides the GPU architectures (CMake syntax, e.g. "86;90").
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
EXT_ENV = "ASYNCDIFF_RT_BUILD_EXT"


def find_nvcc():
    """nvcc from CUDACXX, CUDA_HOME/CUDA_PATH, PATH, or the default install."""
    candidates = [os.environ.get("CUDACXX")]
    candidates += [os.path.join(os.environ[v], "bin", "nvcc") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def extension_plan():
    """(build?, nvcc, reason). Raises when the build is forced but impossible."""
    mode = os.environ.get(EXT_ENV, "").strip()
    if mode not in ("", "0", "1"):
        raise SystemExit(f"{EXT_ENV} must be 0 or 1, got {mode!r}")
    if mode == "0":
        return False, None, f"{EXT_ENV}=0"
    nvcc, cmake = find_nvcc(), shutil.which("cmake")
    missing = [name for name, found in (("a CUDA toolkit (nvcc)", nvcc), ("cmake", cmake)) if not found]
    if missing:
        reason = " and ".join(missing) + " not found"
        if mode == "1":
            raise SystemExit(f"{EXT_ENV}=1 but {reason}: install the CUDA toolkit / cmake, "
                             "or set CUDA_HOME (or CUDACXX) to the toolkit")
        return False, None, reason
    return True, nvcc, f"building with {nvcc}"


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configures and builds CMakeLists.txt; the module lands where build_ext
    expects it (and is copied into the source tree for editable installs)."""

    def build_extension(self, ext):
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        # A stable build folder (not pip's temporary one) keeps rebuilds incremental.
        build_dir = ROOT / "build" / f"cmake-{sys.implementation.cache_tag}"
        cache = build_dir / "CMakeCache.txt"
        if cache.exists() and f"CMAKE_HOME_DIRECTORY:INTERNAL={ROOT}\n" not in cache.read_text():
            shutil.rmtree(build_dir)  # configured for another checkout: start afresh
        build_dir.mkdir(parents=True, exist_ok=True)
        import pybind11

        args = [
            f"-DADRT_OUTPUT_DIR={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_CUDA_COMPILER={NVCC}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if os.environ.get("ASYNCDIFF_RT_CUDA_ARCHS"):
            args.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ['ASYNCDIFF_RT_CUDA_ARCHS']}")
        if shutil.which("ninja") and not cache.exists():
            args.append("-GNinja")
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 1)
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True)


BUILD_EXT, NVCC, REASON = extension_plan()
print(f"asyncdiff_rt._C: {REASON}" + ("" if BUILD_EXT else "; skipping the extension (torch/cupy/cpu transfer "
      "backends stay available)"), file=sys.stderr)

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
    package_data={
        "asyncdiff_rt.models": [f"weights/**/*.{ext}" for ext in ("safetensors", "json", "txt")],
    },
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "diffusers>=0.30", "transformers>=4.40", "safetensors", "numpy"],
    entry_points={"console_scripts": ["asyncdiff-rt=asyncdiff_rt.cli:main"]},
    ext_modules=[CMakeExtension("asyncdiff_rt._C")] if BUILD_EXT else [],
    cmdclass={"build_ext": CMakeBuild} if BUILD_EXT else {},
)
