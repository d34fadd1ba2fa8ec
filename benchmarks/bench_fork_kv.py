"""Benchmark of axpo.ops.fork_kv: forking a prefix KV cache into branch rows.

GPU default: a Qwen3-VL-8B-shaped cache (36 layers -> 72 key/value tensors, 8 KV heads, head dim
128, bf16), 32 source rows holding a 2048-token prefix (+ a 256-token tail that is not forked),
each forked into 4 branches (M = 128 rows of 2048 tokens: 38.6 GB written). CPU default: the
same structure scaled down (12 layers, prefix 512, 8 sources x 4) to run in about a minute.

Cases:
  uniform  every branch takes its source's whole prefix [0, prefix): what transformers can do
           too, with DynamicCache.batch_repeat_interleave(K) + crop (the baseline "hf_repeat_crop",
           which copies the tail as well and then drops it).
  ragged   left-padded sources with prefix lengths drawn from [prefix / 2, prefix]: each branch
           takes its source's real tokens, left padded to out_len = prefix (no transformers
           equivalent).

Reported per impl: median time, bandwidth = (bytes read + bytes written by the fork) / time, and
that bandwidth as a fraction of a device copy bandwidth measured in the same run (a large
``dst.copy_(src)``, counting read + write). Every impl's output is checked bit-exactly against
the reference (per tensor, so the check needs no second full output). Results go through
benchmarks/_harness.py to benchmarks/results/fork_kv_<device>.{json,md,png}.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

try:
    from . import _harness as H
except ImportError:  # run as a script
    import _harness as H  # type: ignore[no-redef]

from axpo.ops import _backend
from axpo.ops import reference_fork_kv as reference
from axpo.ops.fork_kv import fork_kv

FAMILY = "fork_kv"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SHORT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
GPU_DEFAULT = dict(layers=36, heads=8, head_dim=128, prefix=2048, sources=32, branches=4, copy_mib=4096)
CPU_DEFAULT = dict(layers=12, heads=8, head_dim=128, prefix=512, sources=8, branches=4, copy_mib=512)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="axpo bench fork_kv", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--layers", type=int, help="decoder layers (2 tensors each); GPU 36, CPU 12")
    p.add_argument("--heads", type=int, help="KV heads; default 8")
    p.add_argument("--head-dim", type=int, help="default 128")
    p.add_argument("--prefix", type=int, help="prefix tokens forked; GPU 2048, CPU 512")
    p.add_argument("--tail", type=int, help="source tokens after the prefix (not forked); default prefix/8")
    p.add_argument("--sources", type=int, help="source rows; GPU 32, CPU 8")
    p.add_argument("--branches", type=int, help="branches per source; default 4")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--cases", default="uniform,ragged", help="comma list of uniform, ragged")
    p.add_argument("--backends", help="comma list among torch,cpu,cuda,triton,hf (default: every usable "
                   "one; triton only on CUDA: its CPU interpreter is no performance backend)")
    p.add_argument("--repeats", type=int, help="timed calls (default: cuda 20, cpu 5)")
    p.add_argument("--warmup", type=int, help="warm-up calls incl. the checked one (default: cuda 3, cpu 1)")
    p.add_argument("--copy-mib", type=int, help="size of the copy-bandwidth probe (GPU 4096, CPU 512)")
    p.add_argument("--mem-fraction", type=float, default=H.DEFAULT_MEM_FRACTION)
    p.add_argument("--no-l2-flush", action="store_true")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--no-plot", action="store_true")
    return p


def make_case(kind: str, cfg: dict, dtype: torch.dtype, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s, k, prefix, tail = cfg["sources"], cfg["branches"], cfg["prefix"], cfg["tail"]
    t_src = prefix + tail
    shape = (s, cfg["heads"], t_src, cfg["head_dim"])
    tensors = [torch.empty(shape, dtype=dtype, device=device).normal_() for _ in range(2 * cfg["layers"])]
    rows = torch.arange(s).repeat_interleave(k)
    if kind == "uniform":
        length_s = torch.full((s,), prefix)
        start_s = torch.zeros(s, dtype=torch.long)
    else:  # left-padded sources: real tokens from column prefix - length_s
        length_s = torch.randint(prefix // 2, prefix + 1, (s,), generator=g)
        start_s = prefix - length_s
    start, length = start_s[rows], length_s[rows]
    return tensors, rows, start, length, prefix


def fork_bytes(tensors, length, out_len) -> int:
    per_tok = sum(t.shape[1] * t.shape[3] * t.element_size() for t in tensors)
    return int(length.sum()) * per_tok + length.shape[0] * out_len * per_tok


def check_outputs(outs, tensors, rows, start, length, out_len) -> tuple[bool, str | None]:
    """Bitwise comparison with the reference, one tensor at a time (memory-bounded)."""
    if len(outs) != len(tensors):
        return False, f"{len(outs)} outputs for {len(tensors)} tensors"
    for j, (o, t) in enumerate(zip(outs, tensors)):
        (e,) = reference.fork_kv([t], rows, start, length, out_len)
        if o.shape != e.shape or o.dtype != e.dtype or not torch.equal(o, e):
            return False, f"tensor {j} differs (shape {tuple(o.shape)} vs {tuple(e.shape)})"
        del e
    return True, None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = H.resolve_device(args.device)
    cuda = device.type == "cuda"
    d = GPU_DEFAULT if cuda else CPU_DEFAULT
    cfg = {k: (getattr(args, k) if getattr(args, k, None) is not None else v) for k, v in d.items()}
    cfg["tail"] = args.tail if args.tail is not None else cfg["prefix"] // 8
    dtype = DTYPES[args.dtype]
    repeats = args.repeats or (20 if cuda else 5)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    env = H.collect_env(device)
    H.log(f"[{FAMILY}] device {env['device_name']}; {cfg}; repeats {repeats}, warmup {warmup}")

    copy = H.measure_copy_bandwidth(device, cfg["copy_mib"], repeats)
    env["copy_bandwidth"] = copy
    H.log(f"  device copy bandwidth: {copy['bandwidth_GBps']:.1f} GB/s ({copy['method']})")

    selected = [x.strip() for x in args.backends.split(",")] if args.backends else None
    impls = [("reference", "torch", True)]
    for b in _backend.family("fork_kv").backends:
        if b != "torch":
            impls.append((f"axpo_{b}", b, False))
    impls.append(("hf_repeat_crop", "hf", False))

    rows_out: list[dict] = []
    t_start = time.perf_counter()
    for kind in [c.strip() for c in args.cases.split(",") if c.strip()]:
        if kind not in ("uniform", "ragged"):
            raise SystemExit(f"unknown case {kind!r}: choose uniform, ragged")
        s, k = cfg["sources"], cfg["branches"]
        shape = {"L": 2 * cfg["layers"], "S": s, "K": k, "H": cfg["heads"], "D": cfg["head_dim"],
                 "prefix": cfg["prefix"], "T": cfg["prefix"] + cfg["tail"]}
        per_tok = 2 * cfg["layers"] * cfg["heads"] * cfg["head_dim"] * torch.empty((), dtype=dtype).element_size()
        in_bytes = s * shape["T"] * per_tok
        out_bytes = s * k * cfg["prefix"] * per_tok
        base = {"op": f"fork_kv/{kind}", "dtype": SHORT[dtype], **shape,
                "shape": " ".join(f"{a}={b}" for a, b in shape.items()), "mode": "fwd"}
        free = H.free_memory_bytes(device)
        if in_bytes + out_bytes > args.mem_fraction * free:
            reason = f"inputs + one output need {(in_bytes + out_bytes) / 2**30:.1f} GiB > {args.mem_fraction:.0%} of free"
            for name, b, is_ref in impls:
                rows_out.append({**base, "impl": name, "backend": b, "is_reference": is_ref, "status": "skipped",
                                 "reason": reason, "note": ""})
            H.log(f"  skip {kind}: {reason}")
            continue
        tensors, src_rows, src_start, length, out_len = make_case(kind, cfg, dtype, device)
        moved = fork_bytes(tensors, length, out_len)
        H.log(f"{base['op']} {base['dtype']} {base['shape']}: {moved / 2**30:.2f} GiB read + written")
        for name, b, is_ref in impls:
            r = {**base, "impl": name, "backend": b, "is_reference": is_ref, "status": "ok", "reason": None,
                 "note": "", "median_ms": None, "p10_ms": None, "p90_ms": None, "peak_extra_bytes": None,
                 "max_abs_err": None, "correct": None, "bytes_moved": moved}
            tag = f"  {kind:8s} {name:16s}"
            if b == "hf":
                r["note"] = ("transformers DynamicCache.batch_repeat_interleave(K) + crop: copies all T "
                             "source tokens of every branch, one common prefix, no per-row spans")
                if kind != "uniform":
                    r.update(status="skipped", reason="no per-row spans / left padding in transformers")
            elif b == "triton" and not cuda:
                r.update(status="skipped", reason="Triton's CPU interpreter is not a performance backend")
            elif b != "torch" and _backend.unavailable_reason(b, device) is not None:
                r.update(status="skipped", reason=_backend.unavailable_reason(b, device))
            elif b == "torch":
                r["note"] = "axpo.ops.reference_fork_kv.fork_kv: Python loop over rows, slice assignment"
            elif b == "triton":
                r["note"] = "one Triton launch per tensor"
            elif b == "cuda":
                r["note"] = "one CUDA launch for all tensors (device descriptor table)"
            if selected is not None and b not in selected and not is_ref:
                r.update(status="skipped", reason="not selected (--backends)")
            if r["status"] == "skipped":
                rows_out.append(r)
                H.log(f"{tag} skipped: {r['reason']}")
                continue
            if b == "torch":
                fn = lambda: reference.fork_kv(tensors, src_rows, src_start, length, out_len)  # noqa: E731
            elif b == "hf":
                fn = lambda: reference.repeat_interleave_crop(tensors, k, out_len)  # noqa: E731
            else:
                fn = lambda b=b: fork_kv(tensors, src_rows, src_start, length, out_len, backend=b)  # noqa: E731
            try:
                outs = fn()
                H.synchronize(device)
                ok, msg = check_outputs(outs, tensors, src_rows, src_start, length, out_len)
                del outs
                r.update(correct=ok, max_abs_err=0.0 if ok else None)
                if not ok:
                    r.update(status="MISMATCH", reason=msg)
                    H.log(f"{tag} !!! MISMATCH: {msg}")
                timing = H.time_fn(fn, device, repeats=repeats, warmup=max(warmup - 1, 0),
                                   flush_l2=not args.no_l2_flush)
                r.update(median_ms=timing.median_ms, p10_ms=timing.p10_ms, p90_ms=timing.p90_ms,
                         repeats=repeats, times_ms=timing.times_ms)
                if cuda or H.cpu_clear_refs_usable()[0]:
                    r["peak_extra_bytes"] = H.measure_peak_extra(fn, device)
                bw = moved / (timing.median_ms * 1e-3)
                r["bandwidth_GBps"] = bw / 1e9
                r["frac_of_copy_bw"] = bw / (copy["bandwidth_GBps"] * 1e9)
                H.log(f"{tag} {timing.median_ms:10.3f} ms  {bw / 1e9:8.1f} GB/s  "
                      f"({r['frac_of_copy_bw']:.0%} of copy)" + ("" if ok else "  [MISMATCH]"))
            except Exception as e:  # noqa: BLE001
                r.update(status="oom" if H._is_oom(e) else "error", reason=f"{type(e).__name__}: {str(e)[:300]}")
                H.log(f"{tag} {r['status'].upper()}: {r['reason']}")
                if cuda:
                    torch.cuda.empty_cache()
            rows_out.append(r)
        del tensors
        if cuda:
            torch.cuda.empty_cache()
    elapsed = time.perf_counter() - t_start
    H.add_ratios(rows_out, ["op", "dtype", "shape", "mode"])

    bw_lines = ["Bandwidth (bytes read + written by the fork / median time; fraction of the measured "
                f"device copy bandwidth {copy['bandwidth_GBps']:.1f} GB/s):", "",
                "| case | impl | median ms | GB/s | of copy bw | speedup vs ref |", "|---|---|---|---|---|---|"]
    for r in rows_out:
        if r.get("median_ms"):
            sp = r.get("speedup_vs_ref")
            bw_lines.append(f"| {r['op']} | {r['impl']} | {r['median_ms']:.3f} | {r['bandwidth_GBps']:.1f} | "
                            f"{r['frac_of_copy_bw']:.1%} | {'-' if sp is None else f'{sp:.2f}x'} |")
    preamble = [
        f"Qwen3-VL-8B-like KV cache shape scaled per device: {cfg}. Median of {repeats} timed calls "
        f"after {warmup} warm-up call(s) (the first is checked bit-exactly against the reference, "
        f"tensor by tensor). Peak extra = peak memory of one call above what was allocated before "
        f"(the output included). Total run time {elapsed:.0f} s.",
    ]
    payload = {"config": cfg, "repeats": repeats, "warmup": warmup, "copy_bandwidth": copy}
    return H.publish(args, FAMILY, device, env, rows_out, payload, preamble, bw_lines, ["fwd"], elapsed)


if __name__ == "__main__":
    sys.exit(main())
