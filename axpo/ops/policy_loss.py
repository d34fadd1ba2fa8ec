"""Clipped policy-gradient loss (PPO / GRPO / DAPO / AXPO) with KL penalty: custom ops, autograd,
public function.

Kernels: csrc/cpu/policy_loss.cpp, kernels/policy_loss.py (contract in csrc/policy_loss.h),
reference: axpo/ops/reference_policy_loss.py (verl's compute_policy_loss + agg_loss + kl_penalty).

Forward: one elementwise pass over the [B, T] tokens that produces per-row sums (loss terms,
token count, clip counts, metric sums); the aggregation weights and the scalar loss are then
a few [B]-sized torch ops, with no host sync. Backward: the token terms are recomputed from the
inputs (nothing [B, T] is saved) and scaled by the per-row weight, so the only [B, T] tensor the
op ever allocates is the gradient itself.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ._dtypes import acc_dtype

from . import _backend, _validate
from . import reference_policy_loss as reference

_OP = "policy_loss"
_FAMILY = "policy_loss"
AGG_MODES = reference.AGG_MODES
KL_ESTIMATORS = reference.KL_ESTIMATORS
_KL_CODE = {"k1": 1, "k2": 2, "k3": 3, "k3_ratio": 4}
# rows of the per-row sums (csrc/policy_loss.h)
PG, KL, COUNT, CLIP_LOW, CLIP_HIGH, CLIP_DUAL, NEG_KL, RATIO, WEIGHT, TRUNCATED, ROLL_LR = range(11)
N_METRIC_SUMS = 9  # rows COUNT.. of the kernels' output
ROLLOUT_CORRECTIONS = reference.ROLLOUT_CORRECTIONS


def _kernels(backend: str):
    return _backend.kernels(backend, _FAMILY, ("pl_fwd", "pl_bwd"))


def _placeholder(ref: Optional[Tensor], like: Tensor) -> Tensor:
    return like if ref is None else ref


@torch.library.custom_op("axpo::policy_loss_fwd", mutates_args=())
def _fwd(
    logp: Tensor, old: Tensor, adv: Tensor, mask: Tensor, ref: Optional[Tensor], roll: Optional[Tensor],
    lo: float, hi: float, dual_c: float, kl_estimator: int, kl_in_loss: bool, corr: int, cap: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """[B, T] inputs (prepared by _prepare) -> (loss sums [2, B], metric sums [9, B]), acc dtype.

    Loss sums: pg_sum, kl_sum. Metric sums: count, clip_low, clip_high, clip_dual, neg_kl_sum,
    ratio_sum, weight_sum, truncated, roll_lr_sum (csrc/policy_loss.h). kl_in_loss: whether
    kl_sum enters the loss (kl_coef != 0); the backward skips the KL term otherwise. corr / cap:
    the rollout correction (0 none, 1 statistics of roll only, 2 token TIS with cap).
    """
    k = kl_estimator if ref is not None else 0
    c = corr if roll is not None else 0
    stats = _kernels(backend).pl_fwd(logp, old, adv, mask, _placeholder(ref, old), lo, hi, dual_c, k,
                                     _placeholder(roll, old), c, cap)
    return stats[:2].clone(), stats[2:].clone()


@_fwd.register_fake
def _(logp, old, adv, mask, ref, roll, lo, hi, dual_c, kl_estimator, kl_in_loss, corr, cap, backend):
    acc = acc_dtype(logp.dtype)
    n = logp.shape[0]
    return logp.new_empty((2, n), dtype=acc), logp.new_empty((N_METRIC_SUMS, n), dtype=acc)


@torch.library.custom_op("axpo::policy_loss_bwd", mutates_args=())
def _bwd(
    g: Tensor, logp: Tensor, old: Tensor, adv: Tensor, mask: Tensor, ref: Optional[Tensor],
    roll: Optional[Tensor], lo: float, hi: float, dual_c: float, kl_estimator: int, corr: int, cap: float,
    backend: str,
) -> Tensor:
    """g [2, B] (d out / d pg_sum_b, d out / d kl_sum_b) -> grad_logp [B, T] in logp's dtype.
    kl_estimator 0 (or ref None) drops the KL term; corr 2 weighs the pg term as the forward."""
    grad = torch.empty(logp.shape, dtype=logp.dtype, device=logp.device)
    k = kl_estimator if ref is not None else 0
    c = corr if roll is not None else 0
    _kernels(backend).pl_bwd(logp, old, adv, mask, _placeholder(ref, old), lo, hi, dual_c, k,
                             _placeholder(roll, old), c, cap, g.contiguous(), grad)
    return grad


@_bwd.register_fake
def _(g, logp, old, adv, mask, ref, roll, lo, hi, dual_c, kl_estimator, corr, cap, backend):
    return torch.empty(logp.shape, dtype=logp.dtype, device=logp.device)


def _setup_context(ctx, inputs, output):
    logp, old, adv, mask, ref, roll, lo, hi, dual_c, kl_estimator, kl_in_loss, corr, cap, backend = inputs
    ctx.save_for_backward(logp, old, adv, mask, ref, roll)
    ctx.args = (lo, hi, dual_c, kl_estimator if kl_in_loss else 0, corr, cap, backend)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, g_loss, g_metrics):
    logp, old, adv, mask, ref, roll = ctx.saved_tensors
    lo, hi, dual_c, kl_estimator, corr, cap, backend = ctx.args
    if g_loss is None:
        return (None,) * 14
    grad = _bwd(g_loss, logp, old, adv, mask, ref, roll, lo, hi, dual_c, kl_estimator, corr, cap, backend)
    return (grad,) + (None,) * 13


_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------
def _finite_number(x, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise ValueError(f"{name} must be a finite number, got {x!r}")
    return float(x)


def _validate_args(logprobs, old_logprobs, advantages, mask, ref_logprobs, clip_low, clip_high,
                   clip_ratio_c, kl_coef, kl_estimator, agg, num_tokens, num_seqs, norm_tokens,
                   rollout_logprobs, rollout_correction, rollout_cap):
    _validate.tensor(logprobs, "logprobs", dtypes=_validate.FLOAT_DTYPES, dim=2)
    shape = tuple(logprobs.shape)
    if shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"logprobs must be a non-empty [B, T] tensor, got shape {shape}")
    _validate.tensor(old_logprobs, "old_logprobs", dtypes=_validate.FLOAT_DTYPES)
    if tuple(old_logprobs.shape) != shape:
        raise ValueError(f"old_logprobs must have logprobs' shape {shape}, got {tuple(old_logprobs.shape)}")
    _validate.tensor(advantages, "advantages", dtypes=_validate.FLOAT_DTYPES)
    if tuple(advantages.shape) not in (shape, shape[:1]):
        raise ValueError(f"advantages must have shape [B] = {shape[:1]} or [B, T] = {shape}, "
                         f"got {tuple(advantages.shape)}")
    _validate.tensor(mask, "mask")
    if tuple(mask.shape) != shape:
        raise ValueError(f"mask must have logprobs' shape {shape}, got {tuple(mask.shape)}")
    if mask.dtype.is_complex:
        raise TypeError(f"mask must be bool or a 0/1 integer / float tensor, got {mask.dtype}")
    named = [("logprobs", logprobs), ("old_logprobs", old_logprobs), ("advantages", advantages),
             ("mask", mask)]
    if ref_logprobs is not None:
        _validate.tensor(ref_logprobs, "ref_logprobs", dtypes=_validate.FLOAT_DTYPES)
        if tuple(ref_logprobs.shape) != shape:
            raise ValueError(f"ref_logprobs must have logprobs' shape {shape}, got {tuple(ref_logprobs.shape)}")
        named.append(("ref_logprobs", ref_logprobs))
    if rollout_logprobs is not None:
        _validate.tensor(rollout_logprobs, "rollout_logprobs", dtypes=_validate.FLOAT_DTYPES)
        if tuple(rollout_logprobs.shape) != shape:
            raise ValueError(f"rollout_logprobs must have logprobs' shape {shape}, "
                             f"got {tuple(rollout_logprobs.shape)}")
        named.append(("rollout_logprobs", rollout_logprobs))
    if rollout_correction is not None:
        if rollout_correction not in ROLLOUT_CORRECTIONS:
            raise ValueError(f"rollout_correction must be None or one of {ROLLOUT_CORRECTIONS}, "
                             f"got {rollout_correction!r}")
        if rollout_logprobs is None:
            raise ValueError(f"rollout_correction={rollout_correction!r} needs rollout_logprobs "
                             "(the rollout engine's log-probs of the sampled tokens)")
    cap = _finite_number(rollout_cap, "rollout_cap")
    if rollout_correction is not None and not cap > (0 if rollout_correction == "tis" else 1):
        raise ValueError(f"rollout_cap must be > {0 if rollout_correction == 'tis' else 1} for "
                         f"rollout_correction={rollout_correction!r}, got {rollout_cap!r}")
    for name, count in (("num_tokens", num_tokens), ("num_seqs", num_seqs)):
        if isinstance(count, Tensor):
            if count.numel() != 1:
                raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(count.shape)}")
            named.append((name, count))
    _validate.same_device(*named)

    lo_clip = _finite_number(clip_low, "clip_low")
    hi_clip = _finite_number(clip_high, "clip_high")
    if not 0 <= lo_clip <= 1:
        raise ValueError(f"clip_low must be in [0, 1] (the ratio is clipped to [1 - clip_low, 1 + clip_high]), got {clip_low!r}")
    if hi_clip < 0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high!r}")
    if clip_ratio_c is not None:
        c = _finite_number(clip_ratio_c, "clip_ratio_c")
        if not c > 1:
            raise ValueError(f"clip_ratio_c (the dual-clip bound) must be > 1 or None, got {clip_ratio_c!r}")
    _finite_number(kl_coef, "kl_coef")
    if not isinstance(kl_estimator, str) or kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    if kl_coef != 0 and ref_logprobs is None:
        raise ValueError(f"kl_coef = {kl_coef!r} needs ref_logprobs (the reference policy's log-probs)")
    if not isinstance(agg, str) or agg not in AGG_MODES:
        raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")
    for name, value, modes in (("num_tokens", num_tokens, ("token-mean",)),
                               ("num_seqs", num_seqs, AGG_MODES[1:]),
                               ("norm_tokens", norm_tokens, ("seq-mean-token-sum-norm",))):
        if value is None:
            continue
        if agg not in modes:
            raise ValueError(f"{name} is only used with agg={' or '.join(repr(m) for m in modes)}, got agg={agg!r}")
        if name == "norm_tokens" and isinstance(value, Tensor):
            raise TypeError("norm_tokens must be a number (the constant length L), got a tensor")
        if not isinstance(value, Tensor):
            n = _finite_number(value, name)
            if n <= 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")

    if mask.dtype != torch.bool and _validate._value_checks_enabled():
        bad = (mask != 0) & (mask != 1)
        if bool(bad.any()):
            idx = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(f"mask must hold only 0 and 1 (or be bool); mask{list(idx)} = {mask[idx].item()}")


def _as_u8(mask: Tensor) -> Tensor:
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8)  # free, keeps the strides
    if mask.dtype == torch.uint8:
        return mask
    return (mask != 0).view(torch.uint8)


def _prepare(backend, logprobs, old_logprobs, advantages, mask, ref_logprobs, rollout_logprobs=None):
    """The kernels' [B, T] operands: no copy unless the backend needs one."""
    B, T = logprobs.shape
    adv = advantages.unsqueeze(-1).expand(B, T) if advantages.dim() == 1 else advantages
    m = _as_u8(mask)
    lp, old, ref, roll = logprobs, old_logprobs, ref_logprobs, rollout_logprobs
    if backend == "triton":
        return lp, old, adv, m, ref, roll
    # C++: old / adv / ref in the accumulation dtype, unit column stride (adv: or 0).
    acc = acc_dtype(lp.dtype)

    def cols(x: Tensor, allow0: bool = False) -> Tensor:
        if T > 1 and x.stride(1) != 1 and not (allow0 and x.stride(1) == 0):
            return x.contiguous()
        return x

    lp = cols(lp)
    old = cols(old.to(acc))
    adv = cols(adv.to(acc), allow0=True)
    m = cols(m)
    ref = None if ref is None else cols(ref.to(acc))
    roll = None if roll is None else cols(roll.to(acc))
    return lp, old, adv, m, ref, roll


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    clip_ratio_c: float | None = None,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    agg: str = "token-mean",
    num_tokens: int | float | Tensor | None = None,
    num_seqs: int | float | Tensor | None = None,
    norm_tokens: int | float | None = None,
    rollout_logprobs: Tensor | None = None,
    rollout_correction: str | None = None,
    rollout_cap: float = 2.0,
    backend: str | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped policy-gradient loss with an optional KL penalty, fused forward and backward.

    Per token: ratio = exp(clamp(logp - old, -20, 20));
    pg = max(-A ratio, -A clamp(ratio, 1 - clip_low, 1 + clip_high)); with clip_ratio_c (dual
    clip, > 1), where A < 0: pg = min(pg, -A clip_ratio_c); plus kl_coef * KL(logp, ref) with
    k1 = logp - ref, k2 = (logp - ref)^2 / 2, k3 = exp(ref - logp) - (ref - logp) - 1, or
    k3_ratio = k3 * ratio (k3 importance-weighted from the old to the current policy; TRL's
    use_bias_correction_kl), whose gradient includes that of the ratio.
    Same numbers as verl's compute_policy_loss + agg_loss (verl/trainer/ppo/core_algos.py).

    Args:
        logprobs: [B, T] fp32 / bf16 / fp16 (computed in fp32) or fp64; the only input that
            receives a gradient.
        old_logprobs: [B, T] float. advantages: [B] (one per sequence) or [B, T] float.
        mask: [B, T] bool, or integer / float holding 0 and 1.
        ref_logprobs: [B, T] float or None; needed when kl_coef != 0.
        agg: "token-mean": sum(mask l) / num_tokens;
            "seq-mean-token-mean": the sum over the rows of each row's token mean, / num_seqs;
            "seq-mean-token-sum": the sum over the rows of each row's token sum, / num_seqs;
            "seq-mean-token-sum-norm": the sum over the rows of each row's token sum, /
            (num_seqs * norm_tokens) (Dr. GRPO's constant normalizer; verl 0.9's agg_loss).
            Empty mask rows contribute 0 (still counted in num_seqs); an all-masked batch gives
            loss 0 (not NaN) and a zero gradient.
        num_tokens: token-mean's denominator; default this batch's masked token count. Give the
            global count across data-parallel ranks / micro-batches (a number or a one-element
            tensor: no host sync).
        num_seqs: the seq-means' number of sequences; default B. Give the global count likewise.
        norm_tokens: seq-mean-token-sum-norm's constant length L; default T (the padded width,
            which changes with the batch: give the trainer's constant).
        rollout_logprobs: [B, T] float or None: the rollout engine's log-probs of the sampled
            tokens, when old_logprobs are the trainer's own (recomputed). Alone it only adds the
            rollout metrics; with rollout_correction it corrects the sampler / trainer mismatch.
        rollout_correction: None, "tis" (each token's pg term times min(exp(old - rollout),
            rollout_cap): truncated importance sampling) or "seq_mask" (a sequence's pg terms
            dropped when prod_t exp(old - rollout) over its masked tokens leaves
            [1 / rollout_cap, rollout_cap]). The weights are constants (no gradient) and leave
            the KL term and the aggregation's counts as they are; fused in the same pass.
        rollout_cap: the cap (> 0 for tis, > 1 for seq_mask); default 2.
        backend: "cpu" | "triton" | "torch" | None (auto; see axpo.ops._backend).

    Returns:
        loss: 0-d, fp32 (fp64 for fp64 logprobs).
        metrics: dict of 0-d fp32 tensors (no host sync), masked means over the tokens (0 when
            none): clipfrac (verl's pg_clipfrac: the clipped branch is active), clipfrac_low /
            clipfrac_high (its parts with A < 0, ratio < 1 - clip_low / A > 0, ratio > 1 +
            clip_high), clipfrac_dual (verl's pg_clipfrac_lower; 0 without dual clip), approx_kl
            (verl's ppo_kl: mean of clamp(old - logp, -20, 20)), ratio_mean, and kl_mean when
            ref_logprobs is given; with rollout_logprobs also rollout_weight_mean (the mean
            correction weight, 1 without correction), rollout_corrected_frac (the tokens truncated
            by tis, or in sequences masked by seq_mask) and rollout_kl (mean of rollout - old:
            KL(pi_rollout || pi_old) estimated on the sampled tokens).
    """
    _validate_args(logprobs, old_logprobs, advantages, mask, ref_logprobs, clip_low, clip_high,
                   clip_ratio_c, kl_coef, kl_estimator, agg, num_tokens, num_seqs, norm_tokens,
                   rollout_logprobs, rollout_correction, rollout_cap)
    chosen = _backend.resolve(_OP, logprobs.device, backend)
    if chosen == "torch":
        return reference.policy_loss(
            logprobs, old_logprobs, advantages, mask, clip_low=clip_low, clip_high=clip_high,
            clip_ratio_c=clip_ratio_c, ref_logprobs=ref_logprobs, kl_coef=kl_coef,
            kl_estimator=kl_estimator, agg=agg, num_tokens=num_tokens, num_seqs=num_seqs,
            norm_tokens=norm_tokens, rollout_logprobs=rollout_logprobs,
            rollout_correction=rollout_correction, rollout_cap=rollout_cap,
        )
    lp, old, adv, m, ref, roll = _prepare(chosen, logprobs, old_logprobs, advantages, mask, ref_logprobs,
                                          rollout_logprobs)
    lo, hi = 1.0 - float(clip_low), 1.0 + float(clip_high)
    dual_c = float(clip_ratio_c) if clip_ratio_c is not None else 0.0
    kl_code = _KL_CODE[kl_estimator] if ref is not None else 0
    kl_in_loss = ref is not None and kl_coef != 0
    corr = 0 if roll is None else (2 if rollout_correction == "tis" else 1)
    cap = float(rollout_cap)
    sums, msums = _fwd(lp, old, adv, m, ref, roll, lo, hi, dual_c, kl_code, kl_in_loss, corr, cap, chosen)

    acc = sums.dtype
    B, T = logprobs.shape
    count = msums[0]  # [B] tokens per row

    def denominator(x):
        return x.to(acc).reshape(()) if isinstance(x, Tensor) else float(x)

    seqs = B if num_seqs is None else denominator(num_seqs)
    if agg == "token-mean":
        if num_tokens is not None:
            w = torch.full((B,), 1.0, dtype=acc, device=count.device) / denominator(num_tokens)
        else:
            total = count.sum()
            w = torch.where(total > 0, 1.0 / total.clamp(min=1), torch.zeros_like(total)).expand(B)
    elif agg == "seq-mean-token-mean":
        w = torch.where(count > 0, 1.0 / count.clamp(min=1), torch.zeros_like(count)) / seqs
    elif agg == "seq-mean-token-sum":
        w = torch.full((B,), 1.0, dtype=acc, device=count.device) / seqs
    else:  # seq-mean-token-sum-norm
        length = float(T if norm_tokens is None else norm_tokens)
        w = torch.full((B,), 1.0 / length, dtype=acc, device=count.device) / seqs
    pg_rows = sums[0]
    keep = None
    if rollout_correction == "seq_mask":  # per row: the forward's sum of old - rollout
        keep = msums[ROLL_LR - COUNT].abs() <= math.log(cap)
        pg_rows = torch.where(keep, pg_rows, torch.zeros_like(pg_rows))
    row_loss = pg_rows + float(kl_coef) * sums[1] if kl_in_loss else pg_rows
    loss = (w * row_loss).sum()

    tot = msums.sum(-1)  # count, clip_low, clip_high, clip_dual, neg_kl, ratio
    inv = torch.where(tot[0] > 0, 1.0 / tot[0].clamp(min=1), torch.zeros_like(tot[0]))
    metrics = {
        "clipfrac": (tot[1] + tot[2]) * inv,
        "clipfrac_low": tot[1] * inv,
        "clipfrac_high": tot[2] * inv,
        "clipfrac_dual": tot[3] * inv,
        "approx_kl": tot[4] * inv,
        "ratio_mean": tot[5] * inv,
    }
    if roll is not None:
        if keep is not None:
            kept = torch.where(keep, msums[0], torch.zeros_like(msums[0])).sum()
            metrics["rollout_weight_mean"] = kept * inv
            metrics["rollout_corrected_frac"] = (tot[0] - kept) * inv
        else:
            metrics["rollout_weight_mean"] = tot[WEIGHT - COUNT] * inv
            metrics["rollout_corrected_frac"] = tot[TRUNCATED - COUNT] * inv
        metrics["rollout_kl"] = -tot[ROLL_LR - COUNT] * inv
    if ref is not None:
        metrics["kl_mean"] = sums[1].detach().sum() * inv
    return loss, {k: v.detach().float() for k, v in metrics.items()}
