"""Compile-only check of the CUDA sources: every csrc/cuda/*.cu must build with nvcc for sm_90
against the installed torch headers, even on a machine without a GPU (no linking, no run).

One nvcc invocation per file, parametrized so that pytest-xdist (``-n``) can spread them over
workers: the tests only shell out and share no state.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension as cpp_extension

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


def find_nvcc() -> str | None:
    fallback = "/usr/local/cuda/bin/nvcc"
    return shutil.which("nvcc") or (fallback if os.access(fallback, os.X_OK) else None)


def nvcc_compile_command(nvcc: str, source: Path, output: Path) -> list[str]:
    """The compile-only command of one .cu file: sm_90, C++20, torch's headers and C++ ABI."""
    includes = cpp_extension.include_paths() + [sysconfig.get_paths()["include"]]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [
        nvcc, "-std=c++20", "-c", str(source), "-o", str(output),
        "-DAXPO_WITH_CUDA", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DTORCH_EXTENSION_NAME=_C",
        "--expt-relaxed-constexpr", "-gencode", "arch=compute_90,code=sm_90",
        *(f"-I{p}" for p in includes),
    ]


@pytest.mark.parametrize("source", CUDA_SOURCES, ids=[p.name for p in CUDA_SOURCES])
def test_cuda_source_compiles(source: Path, tmp_path: Path):
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found on PATH nor at /usr/local/cuda/bin/nvcc")
    cmd = nvcc_compile_command(nvcc, source, tmp_path / (source.stem + ".o"))
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, (
        f"nvcc failed on {source.relative_to(ROOT)} (rc={proc.returncode})\n"
        f"command: {' '.join(cmd)}\nstderr:\n{proc.stderr}\nstdout:\n{proc.stdout}"
    )
