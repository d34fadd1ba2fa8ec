#!/usr/bin/env bash
# The whole test suite, after scripts/install.sh (README's test command runs it in .venv):
#   1. starts building the environments of their own in the background (scripts/vllm_images_env.sh:
#      vLLM with images; scripts/verl_env.sh: verl), which take minutes of downloads;
#   2. runs the main test suite (`python -m pytest -q`, arguments passed on);
#   3. waits for those environments and runs their tests.
# AXPO_SKIP_VLLM=1 / AXPO_SKIP_VERL=1 skip an environment (its script says so and exits 0).
set -euo pipefail
cd "$(dirname "$0")/.."
ENVS=()
for script in scripts/vllm_images_env.sh scripts/verl_env.sh; do
    [ -f "$script" ] && ENVS+=("$script")
done
declare -A PIDS
for script in "${ENVS[@]}"; do
    log="$(basename "$script" .sh).install.log"
    AXPO_ENV_INSTALL_ONLY=1 bash "$script" > "$log" 2>&1 &
    PIDS[$script]=$!
done
status=0
python -m pytest -q "$@" || status=$?
for script in "${ENVS[@]}"; do
    if ! wait "${PIDS[$script]}"; then
        echo "test.sh: building the environment of $script failed:" >&2
        tail -n 40 "$(basename "$script" .sh).install.log" >&2
        exit 1
    fi
done
[ "$status" = 0 ] || exit "$status"
for script in "${ENVS[@]}"; do
    AXPO_VLLM_IMAGES_SKIP_INSTALL=1 AXPO_VERL_SKIP_INSTALL=1 bash "$script"
done
