"""Benchmark: the clipped policy loss (axpo.ops.policy_loss), and its composition with
linear_logprob_entropy (hidden states -> GRPO / AXPO loss + per-token entropy, no [N, V] tensor).

op "policy_loss": logprobs [B, T] fp32 (requires grad), old / ref logprobs [B, T], advantages [B],
a bool mask with ragged lengths; DAPO-style clip (0.2, 0.28), dual clip 3.0, k3 KL with coef 1e-3,
token-mean. Outputs compared: the loss and every metric; gradient: d loss / d logprobs. Impls: the
eager reference (axpo/ops/reference_policy_loss.py, written like verl), each axpo backend, and
verl's compute_policy_loss + kl_penalty + agg_loss side by side where verl imports.

op "composition": hidden [N, H] and an LM head weight [V, H] -> logprobs + entropy ->
policy_loss. Reference: materialized logits (F.linear, log_softmax, gather, entropy) + the eager
policy loss. axpo: linear_logprob_entropy + policy_loss. Outputs: the loss and the per-token
entropy (for logging); gradients to hidden and weight. Liger-Kernel's chunked GRPO loss (CUDA,
where it imports) is timed too: it gives the loss but no per-token entropy.

    python -m axpo.benchmarks.bench_policy_loss            # default grid for the device
    axpo bench policy_loss --quick                         # one shape of each op

Targets (reported, not asserted): >= 3x faster than the reference, <= 1/3 of its extra peak
memory, for op policy_loss fwd+bwd.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: python benchmarks/bench_policy_loss.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import _harness as H  # type: ignore[no-redef]
else:
    from . import _harness as H

FAMILY = "policy_loss"
TARGET_SPEEDUP = 3.0
TARGET_MEM_RATIO = 1 / 3
LOSS_KW = dict(clip_low=0.2, clip_high=0.28, clip_ratio_c=3.0, kl_coef=1e-3, kl_estimator="k3",
               agg="token-mean")
METRICS = ("clipfrac", "clipfrac_low", "clipfrac_high", "clipfrac_dual", "approx_kl", "ratio_mean",
           "kl_mean")

GPU_GRID = {"bt": [(64, 2048), (64, 8192), (128, 4096), (256, 2048), (256, 8192)],
            "comp": [(8, 2048, 4096, 151936), (4, 4096, 4096, 151936)]}
CPU_GRID = {"bt": [(64, 2048), (128, 4096), (256, 8192)],
            "comp": [(4, 512, 512, 32000)]}
QUICK_GRID = {"bt": [(128, 4096)], "comp": [(4, 256, 256, 32000)]}


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------
def _gen(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _ragged_mask(b: int, t: int, device, g) -> torch.Tensor:
    """Each response has a random length in [T/8, T] (a few rows full length)."""
    lengths = torch.randint(max(1, t // 8), t + 1, (b,), generator=g, device=device)
    lengths[: max(1, b // 8)] = t
    return torch.arange(t, device=device)[None, :] < lengths[:, None]


def make_pl_inputs(b: int, t: int, device: torch.device, seed: int = 0) -> dict:
    g = _gen(device, seed)
    lp = -torch.rand((b, t), generator=g, device=device) * 3 - 0.01
    old = lp + torch.randn((b, t), generator=g, device=device) * 0.2
    ref = lp + torch.randn((b, t), generator=g, device=device) * 0.1
    adv = torch.randn((b,), generator=g, device=device)
    return {"logprobs": lp.requires_grad_(True), "old_logprobs": old, "ref_logprobs": ref,
            "advantages": adv, "mask": _ragged_mask(b, t, device, g)}


def make_comp_inputs(b: int, t: int, h: int, v: int, device: torch.device, seed: int = 0) -> dict:
    g = _gen(device, seed)
    n = b * t
    hidden = torch.randn((n, h), generator=g, device=device).requires_grad_(True)
    weight = (torch.randn((v, h), generator=g, device=device) * (2.0 / math.sqrt(h))).requires_grad_(True)
    labels = torch.randint(0, v, (n,), generator=g, device=device)
    mask = _ragged_mask(b, t, device, g)
    # old / ref log-probs near the current policy's (the inputs' scale matters only for clipping)
    base = -torch.rand((b, t), generator=g, device=device) * 8 - 2
    return {"hidden": hidden, "weight": weight, "labels": labels, "mask": mask,
            "old_logprobs": base + torch.randn((b, t), generator=g, device=device) * 0.2,
            "ref_logprobs": base + torch.randn((b, t), generator=g, device=device) * 0.1,
            "advantages": torch.randn((b,), generator=g, device=device), "bt": (b, t)}


# --------------------------------------------------------------------------------------------
# implementations
# --------------------------------------------------------------------------------------------
def _pl_outputs(loss, metrics) -> tuple:
    return (loss,) + tuple(metrics.get(k) for k in METRICS)


def _axpo_ops():
    try:
        import importlib  # noqa: PLC0415

        import axpo.ops as ops  # noqa: PLC0415
        # the module (axpo.ops may re-export the function under the same name)
        pl = importlib.import_module("axpo.ops.policy_loss")
        return ops, pl, None
    except Exception as e:  # noqa: BLE001
        return None, None, f"axpo.ops did not import ({type(e).__name__}: {e})"


def _backend_reasons(device: torch.device, selected) -> dict[str, str | None]:
    ops, _, err = _axpo_ops()
    if ops is None:
        return {"cpu": err}
    out = {}
    for b, reason in ops.available_backends(device, "policy_loss").items():
        if selected is not None and b not in selected and f"axpo:{b}" not in selected:
            continue
        if reason is None and b == "triton" and device.type == "cpu":
            reason = "Triton's CPU interpreter is not a speed path"
        if reason is None and b == "torch" and selected is None:
            reason = ("backend 'torch' runs the reference itself (same code as the reference row); "
                      "pass --backends torch to time it")
        out[b] = reason
    return out


def verl_impl(device: torch.device) -> H.Impl:
    note = ("verl compute_policy_loss (deprecated API, dual clip always on) + kl_penalty('low_var_kl', "
            "which clamps k3 to [-10, 10]) + agg_loss; metrics: pg_clipfrac, ppo_kl, pg_clipfrac_lower")
    try:
        from verl.trainer.ppo import core_algos as ca  # noqa: PLC0415
    except Exception as e:  # noqa: BLE001
        return H.Impl("verl", None, unavailable=f"verl not importable ({type(e).__name__}: {e})", note=note)

    def fn(i):
        lp, mask = i["logprobs"], i["mask"].float()
        adv = i["advantages"][:, None].expand_as(lp)
        pg_loss, clipfrac, ppo_kl, clipfrac_lower = ca.compute_policy_loss(
            old_log_prob=i["old_logprobs"], log_prob=lp, advantages=adv, response_mask=mask,
            cliprange=LOSS_KW["clip_low"], cliprange_low=LOSS_KW["clip_low"],
            cliprange_high=LOSS_KW["clip_high"], clip_ratio_c=LOSS_KW["clip_ratio_c"],
            loss_agg_mode=LOSS_KW["agg"])
        kld = ca.kl_penalty(lp, i["ref_logprobs"], kl_penalty="low_var_kl")
        kl_loss = ca.agg_loss(loss_mat=kld, loss_mask=mask, loss_agg_mode=LOSS_KW["agg"])
        loss = pg_loss + LOSS_KW["kl_coef"] * kl_loss
        return (loss, clipfrac, None, None, clipfrac_lower, ppo_kl, None, None)

    # loss, clipfrac, clipfrac_dual, approx_kl have verl counterparts
    return H.Impl("verl", fn, note=note,
                  compare_outputs=(True, True, False, False, True, True, False, False))


def build_pl_impls(device: torch.device, selected) -> list[H.Impl]:
    from axpo.ops import reference_policy_loss as R  # noqa: PLC0415
    _, pl, _ = _axpo_ops()

    def ref_fn(i):
        return _pl_outputs(*R.policy_loss(i["logprobs"], i["old_logprobs"], i["advantages"], i["mask"],
                                          ref_logprobs=i["ref_logprobs"], **LOSS_KW))

    impls = [H.Impl("reference", ref_fn, reference=True)]
    for backend, reason in _backend_reasons(device, selected).items():
        fn = None
        if reason is None:
            def fn(i, b=backend):
                return _pl_outputs(*pl.policy_loss(i["logprobs"], i["old_logprobs"], i["advantages"],
                                                   i["mask"], ref_logprobs=i["ref_logprobs"], backend=b,
                                                   **LOSS_KW))
        impls.append(H.Impl(f"axpo:{backend}", fn, backend=backend, unavailable=reason))
    if selected is None or "verl" in selected:
        impls.append(verl_impl(device))
    return impls


def _comp_reference(i):
    from axpo.ops import reference_policy_loss as R  # noqa: PLC0415
    b, t = i["bt"]
    logits = torch.nn.functional.linear(i["hidden"], i["weight"])  # [N, V] materialized
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    lp = logp_all.gather(-1, i["labels"][:, None])[:, 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    loss, _ = R.policy_loss(lp.view(b, t), i["old_logprobs"], i["advantages"], i["mask"],
                            ref_logprobs=i["ref_logprobs"], **LOSS_KW)
    return (loss, entropy)


def liger_comp_impl(device: torch.device) -> H.Impl:
    note = ("Liger-Kernel LigerFusedLinearGRPOLoss (chunked), loss_type='dapo', no dual clip "
            "(the loss is not compared: its clip / aggregation options differ by version); it "
            "returns no per-token entropy")
    if device.type != "cuda":
        return H.Impl("liger-grpo", None, unavailable="Liger-Kernel runs on CUDA only", note=note)
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss  # noqa: PLC0415
    except Exception as e:  # noqa: BLE001
        return H.Impl("liger-grpo", None, unavailable=f"not installed ({type(e).__name__}: {e})", note=note)
    try:
        mod = LigerFusedLinearGRPOLoss(beta=LOSS_KW["kl_coef"], epsilon_low=LOSS_KW["clip_low"],
                                       epsilon_high=LOSS_KW["clip_high"], loss_type="dapo",
                                       use_ref_model=True)
    except Exception as e:  # noqa: BLE001
        return H.Impl("liger-grpo", None, unavailable=f"constructor failed ({type(e).__name__}: {e})", note=note)

    def fn(i):
        b, t = i["bt"]
        h = i["hidden"].view(b, t, -1)
        out = mod(h, i["weight"], i["labels"].view(b, t), i["mask"].long(), i["advantages"],
                  ref_per_token_logps=i["ref_logprobs"], old_per_token_logps=i["old_logprobs"])
        loss = out[0] if isinstance(out, (tuple, list)) else out
        return (loss, None)

    return H.Impl("liger-grpo", fn, note=note, compare_outputs=(False, False), check_grads=False)


def build_comp_impls(device: torch.device, selected) -> list[H.Impl]:
    ops, pl, _ = _axpo_ops()
    impls = [H.Impl("reference", _comp_reference, reference=True,
                    note="materialized [N, V] logits (F.linear, log_softmax, gather, entropy) + eager policy loss")]
    for backend, reason in _backend_reasons(device, selected).items():
        fn = None
        if reason is None:
            def fn(i, b=backend):
                bb, t = i["bt"]
                lp, ent = ops.linear_logprob_entropy(i["hidden"], i["weight"], i["labels"], backend=b)
                loss, _ = pl.policy_loss(lp.view(bb, t), i["old_logprobs"], i["advantages"], i["mask"],
                                         ref_logprobs=i["ref_logprobs"], backend=b, **LOSS_KW)
                return (loss, ent)
        impls.append(H.Impl(f"axpo:{backend}", fn, backend=backend, unavailable=reason,
                            note="linear_logprob_entropy + policy_loss"))
    if selected is None or "liger-grpo" in selected:
        impls.append(liger_comp_impl(device))
    return impls


# --------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------
def pl_case(b: int, t: int, device: torch.device) -> H.Case:
    def upstream(inputs):
        return (torch.ones((), device=device),) + (None,) * len(METRICS)

    return H.Case(op="policy_loss", dtype="fp32", shape={"B": b, "T": t},
                  make_inputs=lambda: make_pl_inputs(b, t, device),
                  make_upstream=upstream, output_names=("loss",) + METRICS,
                  atol=1e-5, rtol=1e-4, grad_tol=1e-4, input_bytes=b * t * 17)


def comp_case(b: int, t: int, h: int, v: int, device: torch.device) -> H.Case:
    n = b * t

    def upstream(inputs):
        return (torch.ones((), device=device), None)

    # fp32 on GPU may use TF32 in either matmul: looser there
    tol = (3e-3, 3e-3, 3e-2) if device.type == "cuda" else (1e-4, 1e-4, 2e-3)
    return H.Case(op="composition", dtype="fp32", shape={"B": b, "T": t, "H": h, "V": v},
                  make_inputs=lambda: make_comp_inputs(b, t, h, v, device),
                  make_upstream=upstream, output_names=("loss", "entropy"),
                  atol=tol[0], rtol=tol[1], grad_tol=tol[2], input_bytes=(n * h + v * h) * 8 + n * 20)


def _est_pl_bytes(impl: H.Impl, b: int, t: int, mode: str) -> float:
    return b * t * 4.0 * (40 if impl.reference or impl.name == "verl" else 3)


def _est_comp_bytes(impl: H.Impl, n: int, h: int, v: int, mode: str) -> float:
    grads = (n * h + v * h) * 8.0
    if impl.reference:
        return n * v * 4.0 * 6 + grads
    return grads + 4 * 256 * 2**20


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------
def _parse_list(text: str | None, conv=int) -> list | None:
    if text is None:
        return None
    return [conv(x) for x in text.replace(",", " ").split()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="axpo bench policy_loss",
                                description="Benchmark policy_loss (and its composition with "
                                            "linear_logprob_entropy) against the eager reference.")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    p.add_argument("--b", help="comma list of batch sizes B (with --t: their cross product)")
    p.add_argument("--t", help="comma list of response lengths T")
    p.add_argument("--comp-n", type=int, help="composition: tokens N = B * T (B = 4)")
    p.add_argument("--comp-h", type=int, help="composition: hidden size H")
    p.add_argument("--comp-v", type=int, help="composition: vocab size V")
    p.add_argument("--no-composition", action="store_true", help="skip the composition op")
    p.add_argument("--quick", action="store_true", help="one shape of each op")
    p.add_argument("--mode", choices=["fwd", "fwd+bwd", "all"], default="all")
    p.add_argument("--backends", help="comma list of impls to run besides the reference "
                                      "(cpu, triton, torch, verl, liger-grpo); default: all usable")
    p.add_argument("--repeats", type=int, help="timed calls (default 30 CUDA, 5 CPU)")
    p.add_argument("--warmup", type=int, help="warm-up calls (default 5 CUDA, 1 CPU)")
    p.add_argument("--no-l2-flush", action="store_true")
    p.add_argument("--mem-fraction", type=float, default=H.DEFAULT_MEM_FRACTION)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--threads", type=int, help="torch.set_num_threads before measuring (CPU; "
                                                  "1 avoids OpenMP spin contention on a busy machine)")
    return p


def _grid(args, device: torch.device):
    base = QUICK_GRID if args.quick else (GPU_GRID if device.type == "cuda" else CPU_GRID)
    bs, ts = _parse_list(args.b), _parse_list(args.t)
    if bs or ts:
        bt = [(b, t) for b in (bs or [64]) for t in (ts or [2048])]
    else:
        bt = list(base["bt"])
    comp = [] if args.no_composition else list(base["comp"])
    if args.comp_n or args.comp_h or args.comp_v:
        b0, t0, h0, v0 = base["comp"][0]
        n = args.comp_n or b0 * t0
        b = 4 if n % 4 == 0 else 1
        comp = [] if args.no_composition else [(b, n // b, args.comp_h or h0, args.comp_v or v0)]
    return bt, comp


def _headline(rows: list[dict], bt: list[tuple[int, int]]) -> list[str]:
    if not bt:
        return []
    b, t = max(bt, key=lambda x: x[0] * x[1])
    sel = [r for r in rows if r["op"] == "policy_loss" and r.get("B") == b and r.get("T") == t
           and r["mode"] == "fwd+bwd"]
    lines = [f"Headline: policy_loss fp32 B={b} T={t} fwd+bwd (targets, reported not asserted: "
             f">= {TARGET_SPEEDUP:g}x faster, <= {TARGET_MEM_RATIO:.2f} of the reference's extra peak memory)"]
    ref = next((r for r in sel if r.get("is_reference") and r.get("median_ms")), None)
    if ref is None:
        return lines + ["- reference not measured"]
    lines.append(f"- reference: {ref['median_ms']:.2f} ms, extra peak {(ref['peak_extra_bytes'] or 0) / 2**20:.1f} MiB")
    for r in sel:
        if r.get("is_reference") or not r.get("median_ms"):
            continue
        sp, mr = r.get("speedup_vs_ref"), r.get("mem_ratio_vs_ref")
        lines.append(
            f"- {r['impl']}: {r['median_ms']:.2f} ms, speedup {sp:.2f}x "
            f"({'PASS' if sp is not None and sp >= TARGET_SPEEDUP else 'MISS'}); extra peak "
            f"{(r['peak_extra_bytes'] or 0) / 2**20:.1f} MiB, ratio {'n/a' if mr is None else f'{mr:.3f}'} "
            f"({'PASS' if mr is not None and mr <= TARGET_MEM_RATIO else 'MISS'})"
            + ("" if r.get("correct") is not False else "  [OUTPUT MISMATCH]"))
    return lines


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = H.resolve_device(args.device)
    cuda = device.type == "cuda"
    repeats = args.repeats or (30 if cuda else 5)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    modes = list(H.MODES) if args.mode == "all" else [args.mode]
    selected = _parse_list(args.backends, str)
    cfg = H.RunConfig(device=device, repeats=repeats, warmup=warmup, flush_l2=not args.no_l2_flush,
                      mem_fraction=args.mem_fraction)
    env = H.collect_env(device)
    env["memory_method"] = cfg.cpu_mem_method()
    H.log(f"[{FAMILY}] device {env['device_name']}; repeats {repeats}, warmup {warmup}")
    bt, comp = _grid(args, device)
    rows: list[dict] = []
    t_start = time.perf_counter()
    for b, t in bt:
        case = pl_case(b, t, device)
        impls = build_pl_impls(device, selected)
        for impl in impls:
            impl.est_bytes = (lambda mode, impl=impl, b=b, t=t: _est_pl_bytes(impl, b, t, mode))
        H.log(f"policy_loss B={b} T={t}")
        rows += H.run_case(case, impls, modes, cfg)
    for b, t, h, v in comp:
        case = comp_case(b, t, h, v, device)
        impls = build_comp_impls(device, selected)
        for impl in impls:
            impl.est_bytes = (lambda mode, impl=impl, n=b * t, h=h, v=v: _est_comp_bytes(impl, n, h, v, mode))
        H.log(f"composition B={b} T={t} H={h} V={v}")
        rows += H.run_case(case, impls, modes, cfg)
    for r in rows:
        r["device_type"] = device.type
    elapsed = time.perf_counter() - t_start
    H.add_ratios(rows, ["op", "dtype", "shape", "mode"])

    headline = _headline(rows, bt)
    preamble = [
        "op policy_loss: logprobs [B, T] fp32, advantages [B], ragged bool mask (lengths in [T/8, T]), "
        f"options {LOSS_KW}; outputs compared: the loss and every metric; gradient d loss / d logprobs. "
        "op composition: hidden [N, H] @ weight[V, H].T -> logprobs + per-token entropy -> the same "
        "loss; reference materializes the [N, V] logits; outputs compared: loss, entropy; gradients "
        f"to hidden and weight. Median of {repeats} timed calls after {warmup} warm-up call(s). "
        "Peak extra = peak memory of one call above what was allocated before it (inputs excluded). "
        f"Total run time {elapsed:.0f} s.",
    ]
    payload = {"modes": modes, "repeats": repeats, "warmup": warmup, "headline": headline}
    return H.publish(args, FAMILY, device, env, rows, payload, preamble, headline, modes, elapsed)


if __name__ == "__main__":
    sys.exit(main())
