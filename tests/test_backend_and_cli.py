"""Backend dispatch (argument > AXPO_BACKEND > device default) and the `axpo` command line."""
import subprocess
import sys

import pytest
import torch

from axpo.cli import main as axpo_main
from axpo.ops import _backend, available_backends, token_logprob_entropy


def test_built_backends_are_available():
    """CI builds the extension and runs Triton's interpreter: both must really be in use."""
    assert available_backends("cpu") == {
        "torch": None, "cpu": None, "triton": None,
        "cuda": "the cuda backend takes cuda tensors, not cpu",
    }


def test_resolution_order(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(_backend.ENV_BACKEND, raising=False)
    assert _backend.resolve("token_logprob_entropy", cpu, None) == "cpu"
    monkeypatch.setenv(_backend.ENV_BACKEND, "torch")
    assert _backend.resolve("token_logprob_entropy", cpu, None) == "torch"
    assert _backend.resolve("token_logprob_entropy", cpu, "triton") == "triton"  # argument wins
    monkeypatch.setenv(_backend.ENV_BACKEND, "fast")
    with pytest.raises(ValueError, match="environment variable AXPO_BACKEND must be one of"):
        _backend.resolve("token_logprob_entropy", cpu, None)
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run on cpu"):
        _backend.resolve("token_logprob_entropy", cpu, "cuda")


def test_forced_backend_is_the_one_that_runs(monkeypatch):
    """AXPO_BACKEND reaches the kernels: a backend whose kernels fail makes the call fail."""
    calls = []
    real = _backend.lpe_kernels

    def spy(backend):
        calls.append(backend)
        return real(backend)

    monkeypatch.setattr(_backend, "lpe_kernels", spy)
    x, y = torch.randn(3, 20), torch.randint(0, 20, (3,))
    monkeypatch.setenv(_backend.ENV_BACKEND, "triton")
    token_logprob_entropy(x, y)
    monkeypatch.delenv(_backend.ENV_BACKEND)
    token_logprob_entropy(x, y)
    assert calls == ["triton", "cpu"]


def test_triton_on_cpu_needs_the_interpreter():
    code = ("import os; os.environ.pop('TRITON_INTERPRET', None); import axpo.ops as o; "
            "print(o.available_backends('cpu')['triton'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "TRITON_INTERPRET=1" in out


def test_axpo_info(capsys):
    assert axpo_main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch   " in out and "axpo._C built" in out
    assert "cpu     available" in out and "default for token_logprob_entropy: cpu" in out


def test_axpo_info_when_extension_missing():
    """Without axpo._C, `axpo info` says why, and the ops fall back to the reference."""
    code = (
        "import sys; sys.modules['axpo._C'] = None\n"  # makes `from axpo import _C` raise ImportError
        "import torch; from axpo.cli import main; import axpo.ops as o\n"
        "main(['info'])\n"
        "print('lp', o.token_logprob_entropy(torch.zeros(1, 4), torch.zeros(1, dtype=torch.long))[0].item())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "axpo._C did not import" in out and "pip install -e ." in out
    assert "default for token_logprob_entropy: torch" in out
    assert "lp -1.386" in out


def test_the_family_table_matches_the_files():
    """Every backend the table gives a family has its files; every op resolves."""
    import importlib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for fam in _backend.FAMILIES:
        assert (root / "csrc" / f"{fam.name}.h").exists() == ("cpu" in fam.backends or "cuda" in fam.backends)
        assert (root / "csrc" / "cpu" / f"{fam.name}.cpp").exists() == ("cpu" in fam.backends), fam.name
        assert (root / "csrc" / "cuda" / f"{fam.name}.cu").exists() == ("cuda" in fam.backends), fam.name
        if "triton" in fam.backends:
            importlib.import_module(f"axpo.kernels.{fam.name}")
        assert (root / "benchmarks" / f"bench_{fam.name}.py").exists()
        for op in fam.ops:
            assert _backend.family(op) is fam and _backend.resolve(op, torch.device("cpu"), "torch") == "torch"
            assert callable(getattr(__import__("axpo.ops", fromlist=[op]), op))


def test_a_backend_an_op_lacks_is_a_clear_error(monkeypatch):
    fam = _backend.OpFamily("policy_loss", ("policy_loss",), ("torch", "cpu", "triton"), {"cpu": "cpu"})
    monkeypatch.setitem(_backend.FAMILY_OF_OP, "policy_loss", fam)
    monkeypatch.setattr(_backend, "FAMILIES", tuple(fam if f.name == "policy_loss" else f for f in _backend.FAMILIES))
    with pytest.raises(ValueError, match=r"policy_loss has no 'cuda' backend; it has \('torch', 'cpu', 'triton'\)"):
        _backend.resolve("policy_loss", torch.device("cpu"), "cuda")
    assert list(available_backends("cpu", "policy_loss")) == ["torch", "cpu", "triton"]
    with pytest.raises(ValueError, match="default for cuda"):
        _backend.OpFamily("x", ("x",), ("torch", "cpu"), {"cuda": "cuda"})


def test_axpo_bench_passes_the_scripts_short_options_through(monkeypatch):
    """`--h 256` is the benchmark's hidden size, not an abbreviation of axpo bench's --help."""
    import axpo.benchmarks.bench_logprob_entropy as bench

    seen = []
    monkeypatch.setattr(bench, "main", lambda rest: seen.append(rest) or 0)
    assert axpo_main(["bench", "logprob_entropy", "--op", "linear", "--h", "256", "--n", "8"]) == 0
    assert seen == [["--op", "linear", "--h", "256", "--n", "8"]]


def test_axpo_bench_rejects_unknown_family(capsys):
    with pytest.raises(SystemExit):
        axpo_main(["bench", "nosuchop"])
