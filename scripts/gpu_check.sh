#!/usr/bin/env bash
# The GPU check, one prepared command (issue 17). On a lent GPU machine (one H200, bare image:
# torch 2.11 cu130, triton 3.6, nvcc, compute-sanitizer; no registry), from the repository root:
#
#   bash scripts/gpu_check.sh [OUT_DIR]        # default: $OUT if set, else benchmarks/results/gpu
#
# Steps, each under its own time limit and all under one deadline (GPU_CHECK_BUDGET_S, default
# 540 s = 9 min), in order of what matters most, so a slow step costs the later ones, not the run:
#   1. build axpo with the CUDA kernels (pip install -e . --no-build-isolation --no-deps, sm_90)
#   2. the op test suite on the GPU: cuda and triton backends against the float64 reference
#   3. compute-sanitizer --tool memcheck on the CUDA kernels with edge-case inputs
#      (scripts/gpu_edge_cases.py: vocab 151936 / 129920, -inf and peaked logits, one token,
#      empty batches, non-contiguous inputs, bf16; each also checked against the reference)
#   4. the two ceilings (device copy bandwidth counting read + write; bf16 matmul rate), then
#      `axpo bench` for every op family at the GPU shapes (fp32 and bf16, Qwen vocab 151936, the
#      fork_kv Qwen3-VL-8B cache shape), then every row as a fraction of its ceiling
# Everything goes under OUT_DIR: summary.md (read it first), the logs, the tests' junit XML, the
# benchmarks' JSON / markdown, ceilings.json and summary_ceilings.md.
#
# Without a GPU it runs what a CPU can check (shell syntax, the CPU build imports, the test and
# benchmark selections exist and parse, the edge-case script and the ceilings summary on the
# CPU) and says what it skipped; tests/test_gpu_check.py runs it that way in CI.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-benchmarks/results/gpu}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-$(command -v python3 || command -v python)}
BUDGET=${GPU_CHECK_BUDGET_S:-540}
SUMMARY="$OUT_DIR/summary.md"
START=$SECONDS
FAILED=0
: > "$SUMMARY"

say() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $((BUDGET - (SECONDS - START))); }
# step NAME LIMIT_S LOG CMD...: runs CMD with min(LIMIT, time left) seconds, logs, records the outcome
step() {
  local name=$1 limit=$2 log=$3; shift 3
  local t=$(left)
  if [ "$t" -lt 20 ]; then say "- $name: SKIPPED (deadline: ${t} s left)"; return 0; fi
  [ "$limit" -gt "$t" ] && limit=$t
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$OUT_DIR/$log" 2>&1
  local rc=$?
  local took=$((SECONDS - t0))
  if [ $rc -eq 0 ]; then say "- $name: ok (${took} s; $log)"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then say "- $name: TIMED OUT after ${limit} s ($log)"; FAILED=1
  else say "- $name: FAILED rc=$rc (${took} s; $log)"; tail -n 15 "$OUT_DIR/$log" | sed 's/^/    /' | tee -a "$SUMMARY"; FAILED=1
  fi
  return 0
}

say "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
say ""
bash -n "$0" && say "- shell syntax: ok"
HAVE_GPU=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
FAMILIES=$("$PY" -c "from axpo.ops._backend import FAMILY_NAMES; print(' '.join(FAMILY_NAMES))" 2>/dev/null \
  || echo "logprob_entropy group_advantages policy_loss fork_kv")

if [ "$HAVE_GPU" = "1" ]; then
  say "- device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)"
  nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
  step "build with CUDA" 240 build.log "$PY" -m pip install -e . --no-build-isolation --no-deps -v
  step "axpo info" 30 info.txt "$PY" -c "from axpo.cli import main; main(['info'])"
  # Triton compiles for the GPU here (conftest would switch its CPU interpreter on otherwise)
  step "op tests on the GPU (cuda, triton)" 150 tests.log env TRITON_INTERPRET=0 "$PY" -m pytest tests/ops \
    -q -k cuda -p no:cacheprovider -n 8 --junitxml="$OUT_DIR/tests.xml"
  step "compute-sanitizer memcheck (CUDA kernels, edge cases)" 100 memcheck.log \
    compute-sanitizer --tool memcheck --error-exitcode 3 "$PY" scripts/gpu_edge_cases.py --backend cuda
  step "ceilings (copy bandwidth, bf16 matmul)" 30 ceilings.log "$PY" benchmarks/gpu_summary.py ceilings --out "$OUT_DIR"
  step "bench logprob_entropy (fp32 + bf16, V 151936)" 110 bench_logprob_entropy.log \
    "$PY" -c "import sys; from axpo.cli import main; sys.exit(main())" bench logprob_entropy --device cuda --v 151936 --repeats 10 --out "$OUT_DIR"
  step "bench policy_loss" 50 bench_policy_loss.log \
    "$PY" -c "import sys; from axpo.cli import main; sys.exit(main())" bench policy_loss --device cuda --repeats 10 --out "$OUT_DIR"
  step "bench group_advantages" 40 bench_group_advantages.log \
    "$PY" -c "import sys; from axpo.cli import main; sys.exit(main())" bench group_advantages --device cuda --repeats 10 --out "$OUT_DIR"
  step "bench fork_kv (Qwen3-VL-8B cache)" 50 bench_fork_kv.log \
    "$PY" -c "import sys; from axpo.cli import main; sys.exit(main())" bench fork_kv --device cuda --repeats 10 --out "$OUT_DIR"
  step "fractions of the ceilings" 20 summary_ceilings.log "$PY" benchmarks/gpu_summary.py summarize "$OUT_DIR"
else
  say "- device: no GPU visible to torch: the CPU-checkable parts only"
  step "CPU build imports (axpo._C)" 60 cpu_build.log "$PY" -c \
    "from axpo import _ext; m, why = _ext.load(); assert m is not None, why; print('axpo._C built; with_cuda =', m.with_cuda)"
  step "op test selection collects" 120 tests_collect.log "$PY" -m pytest tests/ops -q --collect-only -p no:cacheprovider
  benches=()
  for f in $FAMILIES; do benches+=("benchmarks/bench_$f.py"); done
  step "benchmark scripts parse (${FAMILIES// /, })" 120 bench_help.log bash -c \
    "for b in ${benches[*]}; do \"$PY\" \$b --help > /dev/null || { echo \"\$b --help failed\"; exit 1; }; done; echo ok"
  step "edge-case script (CPU kernels, self-check)" 240 edge_cases_cpu.log "$PY" scripts/gpu_edge_cases.py --backend cpu --device cpu
  step "ceilings + summary on the CPU (committed CPU results)" 120 ceilings_cpu.log bash -c \
    "\"$PY\" benchmarks/gpu_summary.py ceilings --out \"$OUT_DIR\" --copy-mib 64 --repeats 3 && cp benchmarks/results/*_cpu.json \"$OUT_DIR\"/ && \"$PY\" benchmarks/gpu_summary.py summarize \"$OUT_DIR\""
  say "- SKIPPED without a GPU: build with CUDA, op tests on the GPU, compute-sanitizer memcheck, GPU benchmarks and their ceilings"
fi
say ""
say "total $((SECONDS - START)) s of a ${BUDGET} s budget; $([ $FAILED -eq 0 ] && echo 'all steps passed' || echo 'SOME STEPS FAILED')"
exit $FAILED
