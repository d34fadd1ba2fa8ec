"""Benchmark: GRPO group-normalized advantages (axpo.ops.group_advantages).

R rewards (default 65536) in groups of random sizes in [4, 16] with shuffled, non-contiguous
int64 labels; rewards 0/1 (the headline case) and continuous. Timed: every usable axpo backend
(the public function, finiteness check included), the fp64 torch reference (the correctness
oracle of every row), and the baselines
  (a) loop       a Python loop over the groups (axpo.ops.reference_group_advantages),
  (b) index_add  torch.unique + index_add_ in the rewards' dtype (same module),
  (c) verl       verl's compute_grpo_outcome_advantage, if verl imports.
Targets, REPORTED not asserted: >= 20x faster than (a) and >= 2x faster than (b).

    python -m axpo.benchmarks.bench_group_advantages            # CPU here, GPU where present
    axpo bench group_advantages --device cpu

Writes ``<out>/group_advantages_<device-kind>.json|md|png`` (benchmarks/_harness.py).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: python benchmarks/bench_group_advantages.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import _harness as H  # type: ignore[no-redef]
else:
    from . import _harness as H

FAMILY = "group_advantages"
TARGET_VS_LOOP = 20.0
TARGET_VS_INDEX_ADD = 2.0
BASELINES = ("loop", "index_add", "verl")


def make_inputs(n: int, min_size: int, max_size: int, rewards: str, device: torch.device,
                seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(min_size, max_size + 1, (n // min_size + 1,), generator=g)
    sizes = sizes[: int((sizes.cumsum(0) < n).sum()) + 1]
    sizes[-1] -= int(sizes.sum()) - n  # exactly n rollouts (the last group may be smaller)
    labels = torch.randperm(100 * sizes.numel(), generator=g)[: sizes.numel()] * 1_000_003 - 10**9
    ids = torch.repeat_interleave(labels, sizes)
    if rewards == "binary":
        r = torch.randint(0, 2, (n,), generator=g).float()
    else:
        r = torch.randn(n, generator=g)
    perm = torch.randperm(n, generator=g)
    ids, r = ids[perm], r[perm]
    return {"rewards": r.to(device), "group_ids": ids.to(device), "index_np": ids.numpy(),
            "n_groups": sizes.numel()}


def build_impls(device: torch.device, scale: str, selected: list[str] | None) -> list[H.Impl]:
    from axpo.ops import available_backends
    from axpo.ops import reference_group_advantages as ref
    from axpo.ops.group_advantages import group_advantages

    impls = [H.Impl("reference", lambda x: (ref.group_advantages(x["rewards"], x["group_ids"], scale=scale),),
                    backend="torch", reference=True, note="fp64 vectorized torch reference (oracle)"),
             H.Impl("loop", lambda x: (ref.group_advantages_loop(x["rewards"], x["group_ids"], scale=scale),),
                    note="baseline (a): Python loop over the groups (sorted layout, torch.split)"),
             H.Impl("index_add", lambda x: (ref.group_advantages_index_add(x["rewards"], x["group_ids"], scale=scale),),
                    note="baseline (b): torch.unique(return_inverse) + index_add_, rewards' dtype")]
    try:
        from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage  # noqa: PLC0415

        def verl_fn(x):
            r = x["rewards"]
            adv, _ = compute_grpo_outcome_advantage(
                r[:, None], torch.ones_like(r)[:, None], x["index_np"],
                norm_adv_by_std_in_grpo=scale == "std")
            return (adv[:, 0],)
        impls.append(H.Impl("verl", verl_fn, note="baseline (c): verl compute_grpo_outcome_advantage "
                            "(groups of one get the reward itself: none in this benchmark)"))
    except Exception as e:  # noqa: BLE001
        impls.append(H.Impl("verl", None, unavailable=f"verl does not import ({type(e).__name__})"))
    avail = available_backends(device, "group_advantages")
    for b in (b for b in avail if b != "torch"):
        if selected and b not in selected and f"axpo:{b}" not in selected:
            continue
        if b == "cpu" and device.type != "cpu" or b == "cuda" and device.type != "cuda":
            continue
        impls.append(H.Impl(
            f"axpo:{b}", lambda x, b=b: (group_advantages(x["rewards"], x["group_ids"], scale=scale, backend=b),),
            backend=b, unavailable=avail[b],
            note="" if b != "triton" else "Triton; on CPU only through its (slow) interpreter"))
    if selected:
        impls = [i for i in impls if i.reference or i.name in selected or i.name.startswith("axpo:")]
    return impls


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_group_advantages", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--n", type=int, default=65536, help="number of rewards R")
    p.add_argument("--min-size", type=int, default=4)
    p.add_argument("--max-size", type=int, default=16)
    p.add_argument("--rewards", choices=["binary", "continuous", "all"], default="all")
    p.add_argument("--scale", choices=["std", "none"], default="std")
    p.add_argument("--backends", help="comma list of impls to time besides the reference "
                   "(cpu,cuda,triton,loop,index_add,verl); default all usable")
    p.add_argument("--repeats", type=int, help="timed calls (default: cuda 50, cpu 10)")
    p.add_argument("--warmup", type=int, help="warm-up calls incl. the checked one (default 3)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"),
                   help="output directory")
    p.add_argument("--threads", type=int, help="CPU: torch.set_num_threads for the run (default: "
                   "torch's; 1 gives stable numbers on a machine shared with other jobs)")
    p.add_argument("--no-plot", action="store_true")
    return p


def ratios_for(rows: list[dict]) -> dict[str, dict[str, float | None]]:
    """{axpo impl: {vs_loop, vs_index_add, vs_verl}}: baseline median / impl median."""
    ms = {r["impl"]: r["median_ms"] for r in rows if r.get("median_ms")}
    out = {}
    for impl, t in ms.items():
        if not impl.startswith("axpo:"):
            continue
        out[impl] = {f"vs_{b}": (ms[b] / t if b in ms else None) for b in BASELINES}
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = H.resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    repeats = args.repeats or (50 if cuda else 10)
    warmup = args.warmup if args.warmup is not None else 3
    selected = [s.strip() for s in args.backends.split(",")] if args.backends else None
    cfg = H.RunConfig(device=device, repeats=repeats, warmup=warmup, max_call_s=None)
    env = H.collect_env(device)
    env["memory_method"] = cfg.cpu_mem_method()
    H.log(f"[{FAMILY}] device {env['device_name']}; R={args.n}, group sizes "
          f"{args.min_size}..{args.max_size}; repeats {repeats}, warmup {warmup}")
    kinds = ["binary", "continuous"] if args.rewards == "all" else [args.rewards]
    rows: list[dict] = []
    ratios_by_case: dict[str, dict] = {}
    t_start = time.perf_counter()
    for kind in kinds:
        probe = make_inputs(args.n, args.min_size, args.max_size, kind, torch.device("cpu"))
        shape = {"R": args.n, "groups": probe["n_groups"]}
        case = H.Case(
            op=f"grpo-{args.scale}", dtype=f"fp32 {kind}", shape=shape,
            make_inputs=lambda kind=kind: make_inputs(args.n, args.min_size, args.max_size, kind, device),
            make_upstream=lambda inputs: (None,), output_names=("advantages",),
            atol=1e-4, rtol=1e-4, grad_tol=0.0, input_bytes=args.n * 12,
            extra={"group_sizes": f"{args.min_size}..{args.max_size}", "rewards": kind})
        case_rows = H.run_case(case, build_impls(device, args.scale, selected), ["fwd"], cfg)
        r = ratios_for(case_rows)
        for row in case_rows:
            row["device_type"] = device.type
            for k, v in r.get(row["impl"], {}).items():
                row[f"speedup_{k}"] = v
        ratios_by_case[kind] = r
        rows += case_rows
    elapsed = time.perf_counter() - t_start
    H.add_ratios(rows, ["op", "dtype", "shape", "mode"])

    headline_kind = kinds[0]
    lines = [f"Speedups of the axpo backends ({headline_kind} rewards headline; targets, reported "
             f"not asserted: >= {TARGET_VS_LOOP:g}x vs loop, >= {TARGET_VS_INDEX_ADD:g}x vs index_add):",
             "", "| rewards | impl | median ms | speedup vs loop | speedup vs index_add | speedup vs verl |",
             "|---|---|---|---|---|---|"]
    def fmt(v, target=None):
        if v is None:
            return "-"
        return f"{v:.1f}x" + ("" if target is None else (" (PASS)" if v >= target else " (MISS)"))
    for kind in kinds:
        for impl, rr in ratios_by_case[kind].items():
            med = next(r["median_ms"] for r in rows if r["impl"] == impl and r["rewards"] == kind)
            lines.append(f"| {kind} | {impl} | {med:.3f} | {fmt(rr['vs_loop'], TARGET_VS_LOOP)} | "
                         f"{fmt(rr['vs_index_add'], TARGET_VS_INDEX_ADD)} | {fmt(rr['vs_verl'])} |")
    preamble = [
        f"R = {args.n} rewards in groups of random sizes {args.min_size}..{args.max_size}, shuffled "
        f"non-contiguous int64 labels, scale={args.scale!r}. Median of {repeats} calls after "
        f"{warmup} warm-up call(s) (the first checked against the fp64 reference, atol 1e-4); "
        f"torch threads {torch.get_num_threads()}. "
        "axpo rows time the public function, the finiteness check of the rewards (one sync) "
        f"included. speedup vs ref = vs the fp64 torch reference. Total run time {elapsed:.0f} s.",
    ]
    payload = {"repeats": repeats, "warmup": warmup,
               "targets": {"vs_loop": TARGET_VS_LOOP, "vs_index_add": TARGET_VS_INDEX_ADD},
               "ratios": ratios_by_case[headline_kind], "ratios_by_case": ratios_by_case,
               "headline": lines}
    return H.publish(args, FAMILY, device, env, rows, payload, preamble, lines, ["fwd"], elapsed)


if __name__ == "__main__":
    sys.exit(main())
