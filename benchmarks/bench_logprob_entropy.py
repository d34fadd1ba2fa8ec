"""Benchmark: per-token log-prob + entropy (axpo.ops.token_logprob_entropy, linear_logprob_entropy).

Measures every usable axpo backend against the plain PyTorch reference (axpo.ops.reference), plus
Liger-Kernel's and verl's implementations where those packages import and the device is CUDA, and
TRL's fused LM head (op "linear", any device: its torch path on CPU, its Triton path on CUDA).
Writes ``<out>/logprob_entropy_<device-kind>.json|md|png`` and prints the markdown table.

    python -m axpo.benchmarks.bench_logprob_entropy --quick        # ~1 min on a 2-core CPU
    axpo bench logprob_entropy                                     # default grid for the device

Shapes. GPU default: op "token": N in {1024, 4096, 16384} x V in {32000, 151936}, fp32 and bf16;
op "linear": the same N and V with H = 4096, bf16 and fp32. CPU default (~6-7 min on 2 cores):
op "token" on the same grid, where the reference is skipped from N x V = 4096 x 151936 up and
N = 16384 x V = 151936 altogether (estimated memory > 60% of free RAM: the reference's fwd+bwd
holds ~7 fp32 [N, V] tensors); op "linear" at H = 1024 (a [4096, 4096] x [4096, 151936] CPU
matmul takes minutes per call), N in {1024, 4096}, V = 32000, fp32 and bf16. On CPU any
(impl, mode) estimated slower than --max-call-s per call (default 10 s; estimated from a small
calibration shape) is skipped and recorded as such. Where the reference is skipped, outputs and
gradients are checked against the reference evaluated on a subset of rows.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

if __package__ in (None, ""):  # run as a script: python benchmarks/bench_logprob_entropy.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import _harness as H  # type: ignore[no-redef]
else:
    from . import _harness as H

FAMILY = "logprob_entropy"
IGNORE_INDEX = -100
IGNORE_FRACTION = 0.05      # share of labels set to ignore_index (exercises the masking)
LOGIT_STD = 2.0
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

GPU_GRID = {
    "token": {"n": [1024, 4096, 16384], "v": [32000, 151936], "h": [None],
              "dtype": ["float32", "bfloat16"]},
    "linear": {"n": [1024, 4096, 16384], "v": [32000, 151936], "h": [4096],
               "dtype": ["bfloat16", "float32"]},
}
CPU_GRID = {
    "token": {"n": [1024, 4096, 16384], "v": [32000, 151936], "h": [None],
              "dtype": ["float32", "bfloat16"]},
    "linear": {"n": [1024, 4096], "v": [32000], "h": [1024], "dtype": ["float32", "bfloat16"]},
}
QUICK_GRID = {  # the headline configuration + one small linear shape
    "token": {"n": [4096], "v": [32000], "h": [None], "dtype": ["float32"]},
    "linear": {"n": [1024], "v": [32000], "h": [256], "dtype": ["float32"]},
}
HEADLINE = {"op": "token", "dtype": "fp32", "N": 4096, "V": 32000, "mode": "fwd+bwd"}
TARGET_SPEEDUP = 2.0
TARGET_MEM_RATIO = 0.25

# correctness tolerances (atol, rtol) on the fp32 outputs, and the gradient tolerance relative to
# max|reference grad|. bf16 "linear": the reference rounds the logits to bf16, fused kernels
# need not; fp32 "linear" on GPU: fused GEMMs may use TF32.
TOLERANCES = {
    ("token", torch.float32): (1e-3, 1e-3, 1e-2),
    ("token", torch.bfloat16): (1e-2, 1e-2, 3e-2),
    ("token", torch.float16): (1e-2, 1e-2, 3e-2),
    ("linear", torch.float32): (3e-2, 1e-2, 3e-2),
    ("linear", torch.bfloat16): (1.5e-1, 5e-2, 1e-1),
    ("linear", torch.float16): (1e-1, 3e-2, 1e-1),
}


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------
def _randn(shape: tuple[int, int], dtype: torch.dtype, device: torch.device, gen: torch.Generator,
           scale: float) -> torch.Tensor:
    """randn * scale built in row chunks straight into `dtype` (no full-size fp32 temporary)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    rows = max(1, (64 << 20) // (4 * max(shape[1], 1)))
    for r0 in range(0, shape[0], rows):
        r1 = min(shape[0], r0 + rows)
        chunk = torch.randn((r1 - r0, shape[1]), generator=gen, device=device, dtype=torch.float32)
        out[r0:r1].copy_(chunk.mul_(scale))
    return out


def _labels(n: int, v: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    labels = torch.randint(0, v, (n,), generator=gen, device=device, dtype=torch.int64)
    drop = torch.rand((n,), generator=gen, device=device) < IGNORE_FRACTION
    return torch.where(drop, torch.full_like(labels, IGNORE_INDEX), labels)


def _generator(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def make_token_inputs(n: int, v: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    g = _generator(device, seed)
    logits = _randn((n, v), dtype, device, g, LOGIT_STD).requires_grad_(True)
    return {"logits": logits, "labels": _labels(n, v, device, g)}


def make_linear_inputs(n: int, h: int, v: int, dtype: torch.dtype, device: torch.device,
                       seed: int = 0):
    g = _generator(device, seed)
    hidden = _randn((n, h), dtype, device, g, 1.0).requires_grad_(True)
    weight = _randn((v, h), dtype, device, g, LOGIT_STD / math.sqrt(h)).requires_grad_(True)
    return {"hidden": hidden, "weight": weight, "labels": _labels(n, v, device, g)}


def make_upstream(n: int, device: torch.device, seed: int = 1) -> tuple:
    g = _generator(device, seed)
    return (torch.randn((n,), generator=g, device=device), torch.randn((n,), generator=g, device=device))


# --------------------------------------------------------------------------------------------
# memory-bounded oracle: the reference on a subset of rows (token: rows are independent; linear:
# outputs and grad_hidden per row, grad_weight only when every row is checked)
# --------------------------------------------------------------------------------------------
ORACLE_ELEMS = 1 << 25  # rows x V elements the oracle evaluates at most


def _oracle(op: str, temperature: float):
    from axpo.ops import reference  # noqa: PLC0415

    def oracle(inputs: dict, upstream: tuple):
        labels = inputs["labels"]
        n = labels.shape[0]
        v = inputs["logits"].shape[1] if op == "token" else inputs["weight"].shape[0]
        rows = min(n, max(16, ORACLE_ELEMS // v))
        step = max(1, min(rows, (1 << 23) // v))
        nan = float("nan")
        lp_all = torch.full((n,), nan, device=labels.device)
        ent_all = torch.full((n,), nan, device=labels.device)
        grads: dict[str, torch.Tensor | None] = {}
        if op == "token":
            x_full = inputs["logits"]
            g_x = torch.full_like(x_full, nan, requires_grad=False)
        else:
            hid_full, w_full = inputs["hidden"], inputs["weight"]
            g_h = torch.full_like(hid_full, nan, requires_grad=False)
            g_w = torch.zeros(w_full.shape, dtype=torch.float32, device=w_full.device)
            w = w_full.detach().requires_grad_(True)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            if op == "token":
                x = x_full.detach()[r0:r1].requires_grad_(True)
                lp, ent = reference.token_logprob_entropy(
                    x, labels[r0:r1], temperature=temperature, ignore_index=IGNORE_INDEX)
                loss = (lp * upstream[0][r0:r1]).sum() + (ent * upstream[1][r0:r1]).sum()
                (gx,) = torch.autograd.grad(loss, [x])
                g_x[r0:r1] = gx
            else:
                hh = hid_full.detach()[r0:r1].requires_grad_(True)
                lp, ent = reference.linear_logprob_entropy(
                    hh, w, labels[r0:r1], temperature=temperature, ignore_index=IGNORE_INDEX)
                loss = (lp * upstream[0][r0:r1]).sum() + (ent * upstream[1][r0:r1]).sum()
                gh, gw = torch.autograd.grad(loss, [hh, w])
                g_h[r0:r1] = gh
                g_w += gw.float()
            lp_all[r0:r1] = lp.detach().float()
            ent_all[r0:r1] = ent.detach().float()
        if op == "token":
            grads["logits"] = g_x
        else:
            grads["hidden"] = g_h
            grads["weight"] = g_w.to(w_full.dtype) if rows == n else None
        return (lp_all, ent_all), grads

    return oracle


# --------------------------------------------------------------------------------------------
# implementations
# --------------------------------------------------------------------------------------------
def _call_by_names(fn: Callable, signature_of: Callable, values: dict[str, Any]) -> Any:
    """Call an autograd ``apply`` positionally, mapping parameter names of ``signature_of``."""
    params = list(inspect.signature(signature_of).parameters.values())[1:]  # drop ctx
    names = [p.name for p in params]
    last = max(i for i, p in enumerate(names) if p in values)
    args = []
    for p in params[: last + 1]:
        if p.name in values:
            args.append(values[p.name])
        elif p.default is not inspect.Parameter.empty:
            args.append(p.default)
        else:
            raise TypeError(f"cannot map required parameter {p.name!r} of {signature_of}")
    return fn(*args)


def _mask(valid: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.where(valid, x, torch.zeros_like(x))


def liger_linear_impl(temperature: float, device: torch.device) -> H.Impl:
    note = ("Liger FLCE (reduction='none'): logprobs only, no entropy; computes the gradients "
            "inside the forward; its backward scales them by the upstream grad (per-token "
            "upstream grads not supported by all versions), so grads are not compared")
    if device.type != "cuda":
        return H.Impl("liger", None, unavailable="Liger-Kernel runs on CUDA only", note=note)
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import (  # noqa: PLC0415
            LigerFusedLinearCrossEntropyFunction as F,
        )
    except Exception as e:  # noqa: BLE001
        return H.Impl("liger", None, unavailable=f"not installed ({type(e).__name__}: {e})", note=note)

    def fn(inputs):
        hidden, weight, labels = inputs["hidden"], inputs["weight"], inputs["labels"]
        if temperature != 1.0:
            hidden = hidden / temperature  # logits / T == (hidden / T) @ W.T
        out = _call_by_names(F.apply, F.forward, {
            "_input": hidden, "weight": weight, "target": labels, "bias": inputs.get("bias"),
            "ignore_index": IGNORE_INDEX, "reduction": "none"})
        loss = out[0] if isinstance(out, (tuple, list)) else out
        return (-loss.float(), None)

    return H.Impl("liger", fn, note=note, compare_outputs=(True, False), check_grads=False)


def verl_linear_impl(temperature: float, device: torch.device) -> H.Impl:
    note = ("verl fused linear_cross_entropy: labels at ignore_index replaced by 0 and the "
            "logprobs masked afterwards (no ignore_index support); no bias")
    if device.type != "cuda":
        return H.Impl("verl", None, unavailable="verl's fused kernel runs on CUDA only", note=note)
    try:
        from verl.utils.kernel import linear_cross_entropy as mod  # noqa: PLC0415
        lce = mod.linear_cross_entropy
    except Exception as e:  # noqa: BLE001
        return H.Impl("verl", None, unavailable=f"not installed ({type(e).__name__}: {e})", note=note)

    def call(hidden, weight, labels):
        values = {"hidden": hidden, "weight": weight, "labels": labels,
                  "temperature": float(temperature), "reduction": "none"}
        if inspect.isfunction(lce) and "temperature" in inspect.signature(lce).parameters:
            return lce(hidden, weight, labels, temperature=float(temperature), reduction="none")
        # older verl: linear_cross_entropy = LinearCrossEntropy.apply (positional only; the
        # order of reduction/temperature changed between versions)
        return _call_by_names(lce, mod.LinearCrossEntropy.forward, values)

    def fn(inputs):
        labels = inputs["labels"]
        valid = labels != IGNORE_INDEX
        lp, ent = call(inputs["hidden"], inputs["weight"], _mask(valid, labels))
        return (_mask(valid, lp.float()), ent.float())

    return H.Impl("verl", fn, note=note)


def verl_token_impl(temperature: float, device: torch.device) -> H.Impl:
    note = ("verl logprobs_from_logits (flash-attn CE if installed, inplace_backward=False) + "
            "entropy_from_logits (computed in the logits' dtype); ignore_index emulated by masking")
    if device.type != "cuda":
        return H.Impl("verl", None, unavailable="benchmarked on CUDA only", note=note)
    try:
        from verl.utils import torch_functional as vf  # noqa: PLC0415
        lp_fn, ent_fn = vf.logprobs_from_logits, vf.entropy_from_logits
    except Exception as e:  # noqa: BLE001
        return H.Impl("verl", None, unavailable=f"not installed ({type(e).__name__}: {e})", note=note)
    kw = ({"inplace_backward": False}
          if "inplace_backward" in inspect.signature(lp_fn).parameters else {})

    def fn(inputs):
        logits, labels = inputs["logits"], inputs["labels"]
        if temperature != 1.0:
            logits = logits / temperature
        valid = labels != IGNORE_INDEX
        lp = lp_fn(logits, _mask(valid, labels), **kw)
        return (_mask(valid, lp.float()), ent_fn(logits).float())

    return H.Impl("verl", fn, note=note)


def _axpo_ops():
    try:
        import axpo.ops as ops  # noqa: PLC0415
        return ops, None
    except Exception as e:  # noqa: BLE001
        return None, f"axpo.ops did not import ({type(e).__name__}: {e})"


def trl_linear_impl(temperature: float, device: torch.device) -> H.Impl:
    """TRL's fused LM head (`trl.kernels.ChunkedLogProbFunction`, what `add_fused_lm_head` patches
    into its trainers), called as TRL calls it: vocab tiles of TRL's width, labels at ignore_index
    clamped to 0 and the outputs masked after (TRL's non-compact path; on Triton devices TRL scores
    only the valid rows); torch ops on CPU, Triton folds on CUDA."""
    note = ("TRL 1.16 ChunkedLogProbFunction, vocab chunk as trl.trainer.utils (32768), labels at "
            "ignore_index clamped and masked after; gradient GEMMs accumulated in fp32")
    try:
        from trl.kernels import ChunkedLogProbFunction as F  # noqa: PLC0415
        from trl.trainer import utils as trl_utils  # noqa: PLC0415
        chunk = int(getattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", 32768))
    except Exception as e:  # noqa: BLE001
        return H.Impl("trl", None, unavailable=f"not installed ({type(e).__name__}: {e})", note=note)

    def fn(inputs):
        labels = inputs["labels"]
        valid = labels != IGNORE_INDEX
        lp, ent, *_ = F.apply(inputs["hidden"], inputs["weight"], inputs.get("bias"), labels.clamp(min=0),
                              float(temperature), chunk, None, 1.0, ("entropy",))
        return (_mask(valid, lp.float()), ent.float())  # entropy is defined on every row, as axpo's

    return H.Impl("trl", fn, note=note)


def axpo_backends(device: torch.device) -> dict[str, str | None]:
    ops, err = _axpo_ops()
    if ops is None:
        return {"torch": err}
    fn = getattr(ops, "available_backends", None)
    if fn is None:
        return {"torch": None}
    return dict(fn(device, "logprob_entropy"))


def build_impls(op: str, device: torch.device, temperature: float,
                selected: list[str] | None) -> list[H.Impl]:
    """Reference first, then axpo backends, then third-party implementations."""
    from axpo.ops import reference  # noqa: PLC0415
    ops, err = _axpo_ops()
    if op == "token":
        impls = [H.Impl("reference", lambda i: reference.token_logprob_entropy(
            i["logits"], i["labels"], temperature=temperature, ignore_index=IGNORE_INDEX),
            reference=True, note="")]
    else:
        impls = [H.Impl("reference", lambda i: reference.linear_logprob_entropy(
            i["hidden"], i["weight"], i["labels"], temperature=temperature,
            ignore_index=IGNORE_INDEX), reference=True)]
    for backend, reason in axpo_backends(device).items():
        name = f"axpo:{backend}"
        if selected is not None and backend not in selected and name not in selected:
            continue
        if reason is None and backend == "triton" and device.type == "cpu":
            reason = "Triton's CPU interpreter is not a speed path"
        if reason is None and backend == "torch" and device.type == "cpu" and selected is None:
            reason = ("backend 'torch' runs axpo.ops.reference itself (same code as the reference "
                      "row); skipped on CPU by default to save time, pass --backends torch to time it")
        if reason is None and ops is None:
            reason = err
        fn = None
        if reason is None:
            if op == "token":
                def fn(i, b=backend):
                    return ops.token_logprob_entropy(
                        i["logits"], i["labels"], temperature=temperature,
                        ignore_index=IGNORE_INDEX, backend=b)
            else:
                def fn(i, b=backend):
                    return ops.linear_logprob_entropy(
                        i["hidden"], i["weight"], i["labels"], temperature=temperature,
                        ignore_index=IGNORE_INDEX, backend=b)
        impls.append(H.Impl(name, fn, backend=backend, unavailable=reason))
    third = ([verl_token_impl(temperature, device)] if op == "token" else
             [liger_linear_impl(temperature, device), verl_linear_impl(temperature, device),
              trl_linear_impl(temperature, device)])
    for impl in third:
        if selected is None or impl.name in selected:
            impls.append(impl)
    return impls


# --------------------------------------------------------------------------------------------
# estimates
# --------------------------------------------------------------------------------------------
def est_bytes(op: str, impl: H.Impl, n: int, v: int, h: int | None, esize: int, mode: str) -> float:
    nv = float(n) * v
    reference_like = impl.reference or impl.backend == "torch" or impl.name == "verl" and op == "token"
    if op == "token":
        if reference_like:  # fp32 upcast (non-fp32), /T, log_softmax, exp, where, products, grads
            return nv * 4 * (7 + (esize < 4)) + (nv * esize if mode == "fwd+bwd" else 0)
        return nv * esize * 1.2 + 64e6
    assert h is not None
    grads = (n * h + v * h) * (esize + 4) if mode == "fwd+bwd" else 0.0
    if impl.reference:
        return nv * esize * 2 + nv * 4 * (7 + (esize < 4)) + grads
    return grads + 4 * 256 * 2**20 + n * h * 4.0  # chunked: a few [N, C] chunks of 256 MiB


class Calibrator:
    """Seconds per element of each (impl, mode), timed on a small shape (CPU time-cap estimates)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cache: dict[tuple, dict[str, float] | None] = {}

    def per_elem(self, op: str, impl: H.Impl, dtype: torch.dtype, h: int | None,
                 modes: list[str], upstream_n: int = 256) -> dict[str, float] | None:
        key = (op, impl.name, dtype, h)
        if key in self.cache:
            return self.cache[key]
        n, v = upstream_n, (32000 if op == "token" else 8192)
        try:
            inputs = (make_token_inputs(n, v, dtype, self.device, seed=7) if op == "token"
                      else make_linear_inputs(n, h, v, dtype, self.device, seed=7))
            up = make_upstream(n, self.device)
            res = {}
            for mode in modes:
                times = []
                for _ in range(2):
                    for t in inputs.values():
                        if t.requires_grad:
                            t.grad = None
                    t0 = time.perf_counter()
                    H.forward_backward(lambda: impl.fn(inputs), up, mode)
                    H.synchronize(self.device)
                    times.append(time.perf_counter() - t0)
                res[mode] = min(times) / (n * v)
            self.cache[key] = res
        except Exception as e:  # noqa: BLE001 -- the real run records the error
            H.log(f"  calibration of {impl.name} failed: {type(e).__name__}: {e}")
            self.cache[key] = None
        return self.cache[key]


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------
def _parse_list(text: str | None, conv=int) -> list | None:
    if text is None:
        return None
    return [conv(x) for x in text.replace(",", " ").split()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="axpo bench logprob_entropy",
        description="Benchmark token_logprob_entropy / linear_logprob_entropy against the reference.")
    p.add_argument("--op", choices=["token", "linear", "all"], default="all")
    p.add_argument("--dtype", help="comma list: float32,bfloat16,float16 (default: per grid)")
    p.add_argument("--n", help="comma list of token counts N")
    p.add_argument("--v", help="comma list of vocab sizes V")
    p.add_argument("--h", help="comma list of hidden sizes H (op linear)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--mode", choices=["fwd", "fwd+bwd", "all"], default="all")
    p.add_argument("--backends", help="comma list of axpo backends / third-party impls to time "
                   "(e.g. cpu,torch,triton,cuda,liger,verl,trl); default: every usable one")
    p.add_argument("--repeats", type=int, help="timed calls (default: cuda 30, cpu 3; --quick 2)")
    p.add_argument("--warmup", type=int, help="warm-up calls incl. the checked one (default: cuda 5, cpu 1)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-call-s", type=float, default=None,
                   help="skip (impl, mode) estimated slower than this per call "
                        "(default: 10 on CPU, no limit on CUDA; 0 disables)")
    p.add_argument("--mem-fraction", type=float, default=H.DEFAULT_MEM_FRACTION,
                   help="skip configurations estimated to need more than this share of free memory")
    p.add_argument("--no-l2-flush", action="store_true", help="CUDA: do not flush L2 between calls")
    p.add_argument("--quick", action="store_true", help="small set (~1 min on a 2-core CPU)")
    p.add_argument("--out", default="benchmarks/results", help="output directory")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-mkldnn", action="store_true",
                   help="CPU: turn oneDNN off. torch's bf16 / fp16 GEMMs then take the generic "
                        "fallback an AVX2-only CPU runs, and axpo's head its fp32 GEMMs "
                        "(axpo.ops._dtypes.gemm_dtype): such a CPU's comparison, measured here")
    p.add_argument("--mem-probe", help=argparse.SUPPRESS)  # internal: subprocess memory fallback
    return p


def _grid(args, device: torch.device) -> list[tuple[str, torch.dtype, int, int | None, int]]:
    base = QUICK_GRID if args.quick else (GPU_GRID if device.type == "cuda" else CPU_GRID)
    ops = ["token", "linear"] if args.op == "all" else [args.op]
    configs = []
    for op in ops:
        g = base[op]
        dtypes = _parse_list(args.dtype, str) or g["dtype"]
        ns = _parse_list(args.n) or g["n"]
        vs = _parse_list(args.v) or g["v"]
        hs = ([None] if op == "token" else (_parse_list(args.h) or g["h"]))
        for dname in dtypes:
            if dname not in DTYPES:
                raise SystemExit(f"unknown dtype {dname!r}; choose from {sorted(DTYPES)}")
            for hh in hs:
                for v in vs:
                    for n in ns:
                        configs.append((op, DTYPES[dname], n, hh, v))
    return configs


def make_case(op: str, dtype: torch.dtype, n: int, h: int | None, v: int,
              device: torch.device, temperature: float) -> H.Case:
    atol, rtol, gtol = TOLERANCES[(op, dtype)]
    esize = torch.empty((), dtype=dtype).element_size()
    if op == "token":
        shape = {"N": n, "V": v}
        make_inputs = lambda: make_token_inputs(n, v, dtype, device)  # noqa: E731
        input_bytes = 2 * n * v * esize  # logits + the reference gradient kept for the check
    else:
        shape = {"N": n, "H": h, "V": v}
        make_inputs = lambda: make_linear_inputs(n, h, v, dtype, device)  # noqa: E731
        input_bytes = 2 * (n * h + v * h) * esize
    return H.Case(op=op, dtype=SHORT[dtype], shape=shape, make_inputs=make_inputs,
                  make_upstream=lambda inputs: make_upstream(n, device),
                  output_names=("logprobs", "entropy"), atol=atol, rtol=rtol, grad_tol=gtol,
                  input_bytes=input_bytes, oracle=_oracle(op, temperature),
                  extra={"temperature": temperature})


def _mem_probe_main(spec: dict) -> int:
    """Child side of the subprocess memory fallback: one call in a fresh process."""
    torch.backends.mkldnn.enabled = spec["mkldnn"]
    device = torch.device(spec["device"])
    dtype = DTYPES[spec["dtype"]]
    impls = build_impls(spec["op"], device, spec["temperature"], spec.get("backends"))
    impl = next(i for i in impls if i.name == spec["impl"])
    # warm up on a tiny shape first (library loads, thread pools), so VmHWM -- which covers the
    # whole process lifetime here -- is not dominated by one-time costs
    tiny = make_case(spec["op"], dtype, 8, spec.get("H") and min(spec["H"], 64), min(spec["V"], 512),
                     device, spec["temperature"])
    tiny_inputs = tiny.make_inputs()
    H.forward_backward(lambda: impl.fn(tiny_inputs), tiny.make_upstream(tiny_inputs), spec["mode"])
    del tiny_inputs
    case = make_case(spec["op"], dtype, spec["N"], spec.get("H"), spec["V"], device, spec["temperature"])
    inputs = case.make_inputs()
    upstream = case.make_upstream(inputs)
    import gc  # noqa: PLC0415
    gc.collect()
    H._malloc_trim()
    base = H._proc_status_bytes("VmRSS")["VmRSS"]
    out = H.forward_backward(lambda: impl.fn(inputs), upstream, spec["mode"])
    peak = H._proc_status_bytes("VmHWM")["VmHWM"]
    del out
    print(json.dumps({"peak_extra_bytes": max(peak - base, 0)}))
    return 0


def _subprocess_probe(device: torch.device, temperature: float, backends):
    def probe(case: H.Case, impl: H.Impl, mode: str) -> int | None:
        spec = {"device": str(device), "dtype": case.dtype, "op": case.op, "impl": impl.name,
                "mode": mode, "temperature": temperature, "backends": backends,
                "mkldnn": torch.backends.mkldnn.enabled, **case.shape}
        module = __spec__.name if __spec__ is not None else None  # noqa: F821
        if module and module != "__main__":
            cmd = [sys.executable, "-m", module, "--mem-probe", json.dumps(spec)]
        else:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--mem-probe", json.dumps(spec)]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            return int(json.loads(res.stdout.strip().splitlines()[-1])["peak_extra_bytes"])
        except Exception as e:  # noqa: BLE001
            H.log(f"    memory probe subprocess failed: {type(e).__name__}: {e}")
            return None
    return probe


def headline_lines(rows: list[dict]) -> list[str]:
    h = HEADLINE
    sel = [r for r in rows if r["op"] == h["op"] and r["dtype"] == h["dtype"]
           and r.get("N") == h["N"] and r.get("V") == h["V"] and r["mode"] == h["mode"]]
    title = (f"Headline: CPU {h['dtype']} logits [{h['N']}, {h['V']}] {h['mode']} "
             f"(targets: >= {TARGET_SPEEDUP:g}x faster, <= {TARGET_MEM_RATIO:g} of the reference's "
             "extra peak memory)")
    ref = next((r for r in sel if r.get("is_reference") and r.get("median_ms")), None)
    if not sel or ref is None or not any(r.get("device_type") == "cpu" for r in sel):
        return [title, "- not measured in this run (needs --device cpu, op token, fp32, N=4096, V=32000)"]
    lines = [title, f"- reference: {ref['median_ms']:.1f} ms, extra peak "
             f"{(ref['peak_extra_bytes'] or 0) / 2**20:.1f} MiB"]
    unavailable = {r["impl"] for r in sel if r["status"] == "skipped"
                   and ("cuda" in (r.get("reason") or "").lower() or "triton" in (r.get("reason") or "").lower())}
    for r in sel:
        if r.get("is_reference") or r["impl"] in unavailable:
            continue
        if not r.get("median_ms"):
            lines.append(f"- {r['impl']}: not timed ({r['status']}: {r.get('reason')})")
            continue
        sp, mr = r.get("speedup_vs_ref"), r.get("mem_ratio_vs_ref")
        sp_ok = sp is not None and sp >= TARGET_SPEEDUP
        mr_ok = mr is not None and mr <= TARGET_MEM_RATIO
        flag = "" if r.get("correct") is not False else "  [OUTPUT MISMATCH]"
        lines.append(
            f"- {r['impl']}: {r['median_ms']:.1f} ms, speedup {sp:.2f}x ({'PASS' if sp_ok else 'MISS'}); "
            f"extra peak {(r['peak_extra_bytes'] or 0) / 2**20:.1f} MiB, ratio "
            f"{'n/a' if mr is None else f'{mr:.3f}'} ({'PASS' if mr_ok else 'MISS'}){flag}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.mem_probe:
        return _mem_probe_main(json.loads(args.mem_probe))
    device = H.resolve_device(args.device)
    cuda = device.type == "cuda"
    if args.no_mkldnn:
        torch.backends.mkldnn.enabled = False
    repeats = args.repeats or (30 if cuda else (2 if args.quick else 3))
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    max_call_s = args.max_call_s if args.max_call_s is not None else (None if cuda else 10.0)
    if max_call_s is not None and max_call_s <= 0:
        max_call_s = None
    modes = list(H.MODES) if args.mode == "all" else [args.mode]
    selected = _parse_list(args.backends, str)
    cfg = H.RunConfig(device=device, repeats=repeats, warmup=warmup, flush_l2=not args.no_l2_flush,
                      mem_fraction=args.mem_fraction, max_call_s=max_call_s,
                      mem_probe=_subprocess_probe(device, args.temperature, selected))
    env = H.collect_env(device)
    env["memory_method"] = cfg.cpu_mem_method()
    H.log(f"[{FAMILY}] device {env['device_name']}; repeats {repeats}, warmup {warmup}, "
          f"max call {max_call_s} s; memory: {env['memory_method']}")
    if not cuda and cfg.cpu_mem_method() == H.CPU_MEM_METHOD:
        chk = H.self_check_cpu_memory(64 * 2**20)
        env["memory_self_check"] = chk
        H.log(f"  memory self-check: 64 MiB allocated inside a call -> measured "
              f"{chk['measured_bytes'] / 2**20:.1f} MiB")

    calib = Calibrator(device) if max_call_s is not None else None
    rows: list[dict] = []
    t_start = time.perf_counter()
    for op, dtype, n, h, v in _grid(args, device):
        case = make_case(op, dtype, n, h, v, device, args.temperature)
        impls = build_impls(op, device, args.temperature, selected)
        esize = torch.empty((), dtype=dtype).element_size()
        for impl in impls:
            impl.est_bytes = (lambda mode, impl=impl: est_bytes(op, impl, n, v, h, esize, mode))
            if calib is not None and impl.fn is not None and impl.unavailable is None:
                per = calib.per_elem(op, impl, dtype, h, modes)
                if per is not None:
                    impl.est_seconds = (lambda mode, per=per: per[mode] * n * v)
        H.log(f"{op} {SHORT[dtype]} {case.shape}")
        for r in H.run_case(case, impls, modes, cfg):
            r["device_type"] = device.type
            rows.append(r)
    elapsed = time.perf_counter() - t_start
    H.add_ratios(rows, ["op", "dtype", "shape", "mode", "temperature"])

    headline = headline_lines(rows) if not cuda else []
    preamble = [
        f"Reference: axpo.ops.reference (plain PyTorch). Modes: fwd = forward with inputs requiring "
        f"grad; fwd+bwd = forward + backward of sum(logprobs*g1) + sum(entropy*g2). Median of "
        f"{repeats} timed calls after {warmup} warm-up call(s) (the first is checked against the "
        f"reference). Peak extra = peak memory of one call above what was allocated before it "
        f"(inputs excluded). Labels: {IGNORE_FRACTION:.0%} ignore_index; logits ~ N(0, {LOGIT_STD:g}^2); "
        f"temperature {args.temperature:g}. Total run time {elapsed:.0f} s.",
    ]
    if not cuda:
        preamble.append(
            "CPU grid: op linear at small H because a [4096, 4096] x [4096, 151936] CPU matmul takes "
            "minutes; any (impl, mode) estimated above --max-call-s per call is skipped.")
    payload = {"modes": modes, "repeats": repeats, "warmup": warmup, "max_call_s": max_call_s,
               "headline": headline}
    return H.publish(args, FAMILY, device, env, rows, payload, preamble, headline, modes, elapsed)


if __name__ == "__main__":
    sys.exit(main())
