"""Smoke test of the logprob_entropy benchmark: a tiny shape, one repeat, CPU, into tmp_path."""
from __future__ import annotations

import json

import pytest

from tests._bench import bench_module

ROW_FIELDS = {
    "op", "impl", "backend", "dtype", "shape", "mode", "median_ms", "p10_ms", "p90_ms",
    "peak_extra_bytes", "speedup_vs_ref", "mem_ratio_vs_ref", "max_abs_err", "correct", "status",
    "reason",
}


def test_logprob_entropy_bench_smoke(tmp_path, capsys):
    bench = bench_module("bench_logprob_entropy")
    rc = bench.main(["--device", "cpu", "--n", "64", "--v", "1000", "--h", "64",
                     "--dtype", "float32", "--repeats", "1", "--warmup", "1",
                     "--out", str(tmp_path), "--no-plot"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| op | dtype | shape | mode | impl |" in out

    js, md = tmp_path / "logprob_entropy_cpu.json", tmp_path / "logprob_entropy_cpu.md"
    assert js.is_file() and md.is_file()
    assert not (tmp_path / "logprob_entropy_cpu.png").exists()
    data = json.loads(js.read_text())
    for key in ("device_name", "torch", "python", "date", "memory_method"):
        assert key in data["env"]

    rows = data["rows"]
    assert rows
    for r in rows:
        assert ROW_FIELDS <= set(r), ROW_FIELDS - set(r)
    timed = [r for r in rows if r["median_ms"] is not None]
    # the reference and at least one axpo backend ran, for both ops and both modes
    for op in ("token", "linear"):
        for mode in ("fwd", "fwd+bwd"):
            sel = [r for r in timed if r["op"] == op and r["mode"] == mode]
            assert any(r["impl"] == "reference" for r in sel), (op, mode)
            assert any(r["impl"].startswith("axpo:") for r in sel), (op, mode)
    # the correctness guard passed for every timed row, and every row is either timed or skipped
    for r in rows:
        assert r["status"] in ("ok", "skipped"), (r["impl"], r["op"], r["mode"], r["status"], r["reason"])
    for r in timed:
        assert r["correct"] is True, (r["impl"], r["op"], r["mode"], r["reason"])
        assert r["max_abs_err"] is not None and r["max_abs_err"] < 1e-2
        assert r["peak_extra_bytes"] is not None and r["peak_extra_bytes"] >= 0
        assert r["speedup_vs_ref"] is not None and r["speedup_vs_ref"] > 0

    text = md.read_text()
    assert "| reference |" in text and "axpo:" in text


def test_no_mkldnn_emulates_a_cpu_without_fast_bf16_gemms(tmp_path):
    """--no-mkldnn emulates a CPU without fast bf16 GEMMs: the results say so, the bf16 head
    rows are timed and checked (axpo's fp32 GEMMs, the reference's bf16 fallback)."""
    import torch  # noqa: PLC0415
    bench = bench_module("bench_logprob_entropy")
    before = torch.backends.mkldnn.enabled
    try:
        rc = bench.main(["--device", "cpu", "--op", "linear", "--n", "32", "--v", "700", "--h", "32",
                         "--dtype", "bfloat16", "--backends", "cpu", "--repeats", "1", "--warmup", "1",
                         "--no-mkldnn", "--out", str(tmp_path), "--no-plot"])
    finally:
        torch.backends.mkldnn.enabled = before
    assert rc == 0
    data = json.loads((tmp_path / "logprob_entropy_cpu.json").read_text())
    assert data["env"]["mkldnn_enabled"] is False and data["env"]["bf16_gemm_dtype"] == "float32"
    ours = [r for r in data["rows"] if r["impl"] == "axpo:cpu"]
    assert {r["mode"] for r in ours} == {"fwd", "fwd+bwd"}
    assert all(r["status"] == "ok" and r["correct"] for r in ours), ours


def test_cpu_memory_measurement_sees_an_allocation():
    bench = bench_module("bench_logprob_entropy")
    H = bench.H
    ok, reason = H.cpu_clear_refs_usable()
    if not ok:
        pytest.skip(reason)
    chk = H.self_check_cpu_memory(64 * 2**20)
    assert 0.9 < chk["ratio"] < 1.2, chk
