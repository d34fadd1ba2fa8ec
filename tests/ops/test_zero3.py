"""linear_logprob_entropy under DeepSpeed ZeRO-3, where the LM head's weight is partitioned."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_lm_head_module_under_zero3(tmp_path):
    env = dict(os.environ, DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "axpo_torch_ext")))
    worker = Path(__file__).with_name("zero3_worker.py")
    proc = subprocess.run([sys.executable, str(worker)], env=env, capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["partitioned"], "ZeRO-3 did not partition the LM head: the test would prove nothing"
    assert abs(result["loss"] - result["loss_plain"]) < 1e-6
    for name, err in result["max_grad_err"].items():
        assert err < 1e-6, (name, err)
    assert "ZeRO-3" in (result["outside_forward_error"] or "")
