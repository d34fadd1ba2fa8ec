"""The two ceilings of a device, and every benchmark row as a fraction of its ceiling.

    python benchmarks/gpu_summary.py ceilings --out DIR    # measure: DIR/ceilings.json
    python benchmarks/gpu_summary.py summarize DIR         # DIR/*_<device>.json -> DIR/summary_ceilings.md

Ceilings (measured in the same run as the benchmarks, METHOD.md): the device copy bandwidth
(bytes read + bytes written over the median time of a large copy) and the bf16 matrix rate (an
[n, n] x [n, n] product on random data). Each row's floor is the fewest bytes its op must move
(every input read once, every output written once) over the bandwidth, or its useful floating-
point work over the matrix rate for the GEMM-bound linear head; the row's fraction of ceiling is
floor / measured time (1.0 = at the ceiling).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

try:
    from . import _harness as H
except ImportError:  # run as a script
    import _harness as H  # type: ignore[no-redef]

ELEM = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}


def _elem(row: dict) -> int:
    return ELEM.get(str(row.get("dtype", "fp32")).split()[0], 4)


def floor_work(family: str, row: dict) -> tuple[str, float] | None:
    """("bytes", n) or ("flops", n): the least the row's op must do; None when not modelled."""
    e, mode = _elem(row), row.get("mode", "fwd")
    bwd = mode == "fwd+bwd"
    if family == "fork_kv" and row.get("bytes_moved"):
        return "bytes", float(row["bytes_moved"])
    if family == "policy_loss" and row.get("op") == "policy_loss":
        bt = row["B"] * row["T"]
        # logp, old (fp32), adv (fp32 per token), mask (1 B), ref (fp32); backward: the same reads + grad
        per_token = e + 4 + 4 + 1 + 4
        return "bytes", float(bt * (per_token * (2 if bwd else 1) + (e if bwd else 0)))
    if family == "logprob_entropy" and row.get("op") == "token":
        nv = row["N"] * row["V"]
        return "bytes", float(nv * e * (3 if bwd else 1))  # bwd: read logits again, write the gradient
    if family == "logprob_entropy" and row.get("op") == "linear":
        nhv = row["N"] * row["H"] * row["V"]
        return "flops", float(2 * nhv * (3 if bwd else 1))  # logits; + grad hidden + grad weight
    if family == "group_advantages" and row.get("R"):
        return "bytes", float(row["R"] * (e + 8 + 4))  # rewards, int64 ids, fp32 advantages
    return None


def measure(out: Path, copy_mib: int, matmul_n: int, repeats: int) -> dict:
    device = H.resolve_device("auto")
    result = {"device": H.device_kind(device), "env": H.collect_env(device),
              "copy": H.measure_copy_bandwidth(device, copy_mib, repeats)}
    if device.type == "cuda":
        result["matmul_bf16"] = H.measure_matmul_rate(device, matmul_n, torch.bfloat16, repeats)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ceilings.json").write_text(json.dumps(result, indent=2))
    print(f"copy {result['copy']['bandwidth_GBps']:.0f} GB/s"
          + (f", bf16 matmul {result['matmul_bf16']['tflops']:.0f} TFLOP/s" if "matmul_bf16" in result else ""))
    return result


def summarize(out: Path) -> str:
    ceilings = json.loads((out / "ceilings.json").read_text())
    bw = ceilings["copy"]["bandwidth_GBps"] * 1e9
    rate = ceilings.get("matmul_bf16", {}).get("tflops")
    lines = [f"# Benchmarks as fractions of the device's ceilings ({ceilings['device']})", "",
             f"- copy bandwidth: {bw / 1e9:.0f} GB/s ({ceilings['copy']['method']})"]
    if rate:
        lines.append(f"- bf16 matmul: {rate:.0f} TFLOP/s ({ceilings['matmul_bf16']['method']})")
    lines += ["", "| family | op | dtype | shape | mode | impl | median ms | bound | floor ms | fraction of ceiling |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for path in sorted(out.glob("*.json")):
        if path.name == "ceilings.json":
            continue
        payload = json.loads(path.read_text())
        family = payload.get("family")
        for row in payload.get("rows", []):
            if row.get("status") not in ("ok", None) or not row.get("median_ms"):
                continue
            work = floor_work(family, row)
            if work is None:
                continue
            kind, amount = work
            if kind == "flops" and not rate:
                continue
            floor_ms = amount / (bw if kind == "bytes" else rate * 1e12) * 1e3
            lines.append(f"| {family} | {row.get('op')} | {row.get('dtype')} | {row.get('shape')} | "
                         f"{row.get('mode')} | {row.get('impl')} | {row['median_ms']:.3f} | "
                         f"{'memory' if kind == 'bytes' else 'bf16 matmul'} | {floor_ms:.3f} | "
                         f"{floor_ms / row['median_ms']:.2f} |")
    text = "\n".join(lines) + "\n"
    (out / "summary_ceilings.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("ceilings")
    c.add_argument("--out", required=True)
    c.add_argument("--copy-mib", type=int, default=4096)
    c.add_argument("--matmul-n", type=int, default=8192)
    c.add_argument("--repeats", type=int, default=10)
    s = sub.add_parser("summarize")
    s.add_argument("dir")
    args = p.parse_args(argv)
    if args.cmd == "ceilings":
        measure(Path(args.out), args.copy_mib, args.matmul_n, args.repeats)
    else:
        print(summarize(Path(args.dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
