"""Compile-only check of the CUDA sources: every csrc/cuda/*.cu must build with nvcc for sm_90
against the installed torch headers, even on a machine without a GPU (no linking, no run).

All files compile at once (one nvcc process each, started together in a module fixture: the
machine's cores work in parallel, which cut this module's time to about one file's worth of
wall clock), then one test per file reports its own result.
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


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """source -> (command, returncode, stdout, stderr), every file compiled concurrently."""
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found on PATH nor at /usr/local/cuda/bin/nvcc")
    out = tmp_path_factory.mktemp("nvcc")
    procs = {}
    for source in CUDA_SOURCES:
        cmd = nvcc_compile_command(nvcc, source, out / (source.stem + ".o"))
        procs[source] = (cmd, subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                               text=True))
    results = {}
    for source, (cmd, proc) in procs.items():
        stdout, stderr = proc.communicate()
        results[source] = (cmd, proc.returncode, stdout, stderr)
    return results


@pytest.mark.parametrize("source", CUDA_SOURCES, ids=[p.name for p in CUDA_SOURCES])
def test_cuda_source_compiles(source: Path, compiled):
    cmd, rc, stdout, stderr = compiled[source]
    assert rc == 0, (
        f"nvcc failed on {source.relative_to(ROOT)} (rc={rc})\n"
        f"command: {' '.join(cmd)}\nstderr:\n{stderr}\nstdout:\n{stdout}"
    )
