"""scripts/gpu_check.sh without a GPU: the CPU-checkable parts run and pass, and the script says
what it skipped (on a GPU machine the same script builds, tests, sanitizes and benchmarks)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the script runs the GPU check itself")
def test_gpu_check_runs_its_cpu_parts(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    summary = (tmp_path / "summary.md").read_text()
    assert proc.returncode == 0, summary + proc.stderr[-3000:]
    for step in ("shell syntax: ok", "CPU build imports (axpo._C): ok", "op test selection collects: ok",
                 "benchmark scripts parse", "edge-case script (CPU kernels, self-check): ok",
                 "ceilings + summary on the CPU (committed CPU results): ok", "all steps passed"):
        assert step in summary, step
    assert "SKIPPED without a GPU: build with CUDA, op tests on the GPU, compute-sanitizer memcheck" in summary
    fractions = (tmp_path / "summary_ceilings.md").read_text()
    assert "| policy_loss | policy_loss |" in fractions and "| memory |" in fractions


def test_gpu_check_reports_a_failing_step(tmp_path):
    """A step that fails is reported as FAILED and fails the run (here: a Python without axpo)."""
    fake = tmp_path / "python3"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "out")], cwd=ROOT,
                          env={**os.environ, "PYTHON": str(fake)}, capture_output=True, text=True, timeout=300)
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert proc.returncode == 1 and "FAILED rc=1" in summary and "SOME STEPS FAILED" in summary
