"""The examples run (small settings) and print what they promise."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_axpo_step_example_runs_one_step_and_prints_the_diagnostics():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "axpo_step.py"), "--sft-steps", "30",
                          "--questions", "2", "--group-size", "4", "--ratio", "1.0", "--k", "2"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    for key in ("tool_call_rate", "triggered_frac", "prefixes_selected", "prefix_budget",
                "pass1", "extra_rollout_tokens", "prefill_tokens_saved"):
        assert f"  {key} " in out.stdout, key
    assert "budget P=4" in out.stdout  # floor(1.0 * 2 * 4 / 2)
