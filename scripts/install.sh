#!/usr/bin/env bash
# Creates .venv and installs axpo with everything its tests and benchmarks use, from the
# package registries only. torch is pinned to the CPU build on a machine without CUDA: an
# unpinned torch (or anything pulling torchvision) resolves to a multi-GB CUDA build.
# On a GPU machine, install your CUDA torch first and run: pip install -e .
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip "setuptools>=70" wheel
python -m pip install -q "torch==${AXPO_TORCH_VERSION:-2.13.0}" numpy "triton==3.9.0" ninja \
    pytest hypothesis matplotlib pyyaml tqdm deepspeed "transformers==5.23.0" pillow datasets
# The extension is compiled against the torch just installed (build_backend/axpo_build.py).
python -m pip install -q -e . --no-deps
python -c "import torch, axpo._C" || { echo "axpo: the C++ extension did not build" >&2; exit 1; }
