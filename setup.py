"""Builds axpo._C: the C++ CPU kernels always, the CUDA kernels when torch has CUDA.

Install torch first, then `pip install -e .`: the extension is compiled against the torch in
the environment (build_backend/axpo_build.py lets pip's isolated build see it;
`--no-build-isolation` works too). AXPO_NO_CUDA=1 skips the CUDA part.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup


def _die(msg: str):
    sys.stderr.write(f"\naxpo: {msg}\n\n")
    sys.exit(1)


try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    _die(
        "building axpo._C needs PyTorch installed first, e.g.\n"
        "  pip install torch==2.13.0   # or the CUDA build matching your driver\n"
        "  pip install -e ."
    )

cxx = os.environ.get("CXX", "c++")
if shutil.which(cxx) is None:
    _die(f"no C++ compiler found (looked for '{cxx}'; set CXX or install g++, e.g. apt-get install g++)")

with_cuda = (
    torch.version.cuda is not None
    and CUDA_HOME is not None
    and os.environ.get("AXPO_NO_CUDA", "0") != "1"
)
if torch.version.cuda is not None and CUDA_HOME is None:
    sys.stderr.write("axpo: torch has CUDA but no CUDA toolkit was found (CUDA_HOME): building CPU kernels only\n")

sources = ["csrc/bindings.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
define_macros = []
if with_cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    define_macros.append(("AXPO_WITH_CUDA", None))
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    ext = CUDAExtension(
        "axpo._C", sources, define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]},
        extra_link_args=["-fopenmp"],
    )
else:
    ext = CppExtension(
        "axpo._C", sources, define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"],
    )

setup(
    # every subpackage of axpo/ (found, so a new one cannot be left out of a wheel), plus the two
    # top-level folders installed under axpo
    packages=["axpo"] + [f"axpo.{p}" for p in find_packages("axpo")] + ["axpo.kernels", "axpo.benchmarks"],
    package_dir={"axpo": "axpo", "axpo.kernels": "kernels", "axpo.benchmarks": "benchmarks"},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
)
