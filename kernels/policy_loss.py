"""Triton kernels for the policy-loss ("pl") op family (axpo.ops.policy_loss).

Contract: csrc/policy_loss.h (same semantics as the CPU backend), oracle:
axpo/ops/reference_policy_loss.py. Per token, in the accumulation dtype (fp64 for fp64 logprobs,
else fp32):

    d = logp - old,  dc = clamp(d, -20, 20),  r = exp(dc)
    pg1 = -A r,  pg2 = -A clamp(r, lo, hi),  c1 = max(pg1, pg2)
    pg = min(c1, -A c) where A < 0 and the dual clip is on, else c1
    kl = k1 | k2 | k3 of (logp, ref), or k3 * r

The forward is one elementwise pass over a [B, T] grid of tiles that writes per-tile sums
(pg, kl, count, clip counts, -dc, r over the masked tokens), reduced to per-row sums on the host.
The backward recomputes the token terms (nothing [B, T] is saved) and writes
d/dlogp of sum_b g_pg[b] pg_sum_b + g_kl[b] kl_sum_b with autograd's tie rules: clamp passes the
gradient on [min, max] inclusive; max / min give half to each side of a tie.
All inputs may have any strides (the advantage's column stride may be 0: one value per row).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, interpreting, num_warps, tl_acc_dtype

__all__ = ["pl_fwd", "pl_bwd", "N_STATS"]

N_STATS = 11  # rows of pl_fwd's output, see csrc/policy_loss.h


def _block_t(n_cols: int) -> int:
    # Small tiles under the interpreter keep the CPU checks fast and still exercise several tiles
    # per row and a ragged last tile; on a GPU 2048 tokens per program keep ~5 loads in flight.
    cap = 64 if interpreting() else 2048
    return max(16, min(triton.next_power_of_2(max(n_cols, 1)), cap))



@triton.jit
def _token_terms(lp, old, a, lo, hi, c, DUAL: tl.constexpr):
    """Loss pieces of a tile of tokens (all in the accumulation dtype)."""
    d = lp - old
    in_clamp = (d >= -20.0) & (d <= 20.0)
    dc = tl.where(d < -20.0, -20.0, tl.where(d > 20.0, 20.0, d))  # NaN stays NaN
    r = tl.exp(dc)
    na = -a
    pg1 = na * r
    rc = tl.where(r < lo, lo, tl.where(r > hi, hi, r))
    pg2 = na * rc
    c1 = tl.where((pg1 > pg2) | (pg1 != pg1), pg1, pg2)  # torch.maximum: NaN propagates
    neg = a < 0.0
    if DUAL:
        pg3 = na * c
        c2 = tl.where((c1 < pg3) | (c1 != c1), c1, pg3)  # torch.min(pg3, c1)
        pg = tl.where(neg, c2, c1)
    else:
        pg3 = c1
        pg = c1
    return d, dc, in_clamp, r, na, pg1, pg2, c1, pg3, neg, pg


@triton.jit
def _kl_value(lp, ref, r, KL: tl.constexpr):
    if KL == 1:
        out = lp - ref
    elif KL == 2:
        x = lp - ref
        out = 0.5 * (x * x)
    elif KL == 3:
        x = ref - lp
        out = tl.exp(x) - x - 1.0
    else:  # k3 * r (r: the clamped ratio)
        x = ref - lp
        out = (tl.exp(x) - x - 1.0) * r
    return out


@triton.jit
def _kl_grad(lp, ref, r, in_clamp, KL: tl.constexpr):
    if KL == 1:
        out = tl.full(lp.shape, 1.0, lp.dtype)
    elif KL == 2:
        out = lp - ref
    elif KL == 3:
        out = 1.0 - tl.exp(ref - lp)
    else:  # d(k3 r): dr / dlogp = r inside the ratio clamp, 0 outside
        x = ref - lp
        e = tl.exp(x)
        out = (1.0 - e) * r + tl.where(in_clamp, (e - x - 1.0) * r, 0.0 * r)
    return out


@triton.jit
def _rollout_weight(old, roll_ptr, row, offs, valid, s_roll_b, s_roll_t, cap, ACC: tl.constexpr,
                    CORR: tl.constexpr):
    """(w, lr, truncated): the correction weight of each token (min(exp(old - roll), cap) for
    CORR 2, else 1), the log-ratio old - roll, and whether exp(old - roll) > cap (CORR 2)."""
    roll = tl.load(roll_ptr + row * s_roll_b + offs * s_roll_t, mask=valid, other=0.0).to(ACC)
    lr = old - roll
    rr = tl.exp(lr)
    if CORR == 2:
        w = tl.where(rr > cap, cap, rr)  # NaN stays NaN
        trunc = rr > cap
    else:
        w = tl.full(lr.shape, 1.0, ACC)
        trunc = tl.full(lr.shape, 0, tl.int1)
    return w, lr, trunc


@triton.jit
def _load_tile(logp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, row, offs, valid,
               s_lp_b, s_lp_t, s_old_b, s_old_t, s_adv_b, s_adv_t, s_m_b, s_m_t, s_ref_b, s_ref_t,
               ACC: tl.constexpr, KL: tl.constexpr):
    lp = tl.load(logp_ptr + row * s_lp_b + offs * s_lp_t, mask=valid, other=0.0).to(ACC)
    old = tl.load(old_ptr + row * s_old_b + offs * s_old_t, mask=valid, other=0.0).to(ACC)
    a = tl.load(adv_ptr + row * s_adv_b + offs * s_adv_t, mask=valid, other=0.0).to(ACC)
    m = tl.load(mask_ptr + row * s_m_b + offs * s_m_t, mask=valid, other=0) != 0
    m = m & valid
    if KL != 0:
        ref = tl.load(ref_ptr + row * s_ref_b + offs * s_ref_t, mask=valid, other=0.0).to(ACC)
    else:
        ref = lp
    return lp, old, a, m, ref


@triton.jit
def _pl_fwd_kernel(
    # data pointers
    logp_ptr,  # [B, T] fp16 / bf16 / fp32 / fp64
    old_ptr,  # [B, T] any float
    adv_ptr,  # [B, T] any float (column stride 0: one value per row)
    mask_ptr,  # [B, T] uint8
    ref_ptr,  # [B, T] any float; read only if KL != 0
    roll_ptr,  # [B, T] any float: the rollout log-probs; read only if CORR != 0
    out_ptr,  # [N_STATS, B, n_tiles] acc dtype, contiguous
    # shapes
    n_rows,
    n_cols,
    n_tiles,
    # strides (elements)
    s_lp_b, s_lp_t, s_old_b, s_old_t, s_adv_b, s_adv_t, s_m_b, s_m_t, s_ref_b, s_ref_t,
    s_roll_b, s_roll_t,
    # constants
    lo_in: tl.float64,
    hi_in: tl.float64,
    c_in: tl.float64,
    cap_in: tl.float64,
    ACC: tl.constexpr,
    KL: tl.constexpr,  # 0: no ref, 1 / 2 / 3 / 4: k1 / k2 / k3 / k3 * ratio
    DUAL: tl.constexpr,
    CORR: tl.constexpr,  # 0: none, 1: rollout statistics only, 2: + token TIS weights
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    # The clip constants in the accumulation dtype. Written as an add, not tl.cast: the
    # interpreter would round the Python float through fp32 on the way.
    lo = (lo_in + tl.zeros((), ACC)).to(ACC)
    hi = (hi_in + tl.zeros((), ACC)).to(ACC)
    c = (c_in + tl.zeros((), ACC)).to(ACC)
    offs = (tile * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    valid = offs < n_cols
    lp, old, a, m, ref = _load_tile(logp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, row, offs, valid,
                                    s_lp_b, s_lp_t, s_old_b, s_old_t, s_adv_b, s_adv_t, s_m_b, s_m_t,
                                    s_ref_b, s_ref_t, ACC, KL)
    d, dc, in_clamp, r, na, pg1, pg2, c1, pg3, neg, pg = _token_terms(lp, old, a, lo, hi, c, DUAL)
    zero = tl.zeros((BLOCK_T,), ACC)
    one = zero + 1.0
    clipped = pg2 > pg1
    if CORR != 0:
        cap = (cap_in + tl.zeros((), ACC)).to(ACC)
        w, lr, trunc = _rollout_weight(old, roll_ptr, row, offs, valid, s_roll_b, s_roll_t, cap, ACC, CORR)
        if CORR == 2:
            pg = pg * w
    s_pg = tl.sum(tl.where(m, pg, zero), axis=0)
    s_n = tl.sum(tl.where(m, one, zero), axis=0)
    s_lo = tl.sum(tl.where(m & clipped & neg, one, zero), axis=0)
    s_hi = tl.sum(tl.where(m & clipped & (a > 0.0), one, zero), axis=0)
    if DUAL:
        s_dual = tl.sum(tl.where(m & (c1 > pg3) & neg, one, zero), axis=0)
    else:
        s_dual = tl.sum(zero, axis=0)
    s_nk = tl.sum(tl.where(m, -dc, zero), axis=0)
    s_r = tl.sum(tl.where(m, r, zero), axis=0)
    if KL != 0:
        s_kl = tl.sum(tl.where(m, _kl_value(lp, ref, r, KL), zero), axis=0)
    else:
        s_kl = tl.sum(zero, axis=0)
    stride_stat = n_rows * n_tiles
    base = out_ptr + row * n_tiles + tile
    tl.store(base + 0 * stride_stat, s_pg)
    tl.store(base + 1 * stride_stat, s_kl)
    tl.store(base + 2 * stride_stat, s_n)
    tl.store(base + 3 * stride_stat, s_lo)
    tl.store(base + 4 * stride_stat, s_hi)
    tl.store(base + 5 * stride_stat, s_dual)
    tl.store(base + 6 * stride_stat, s_nk)
    tl.store(base + 7 * stride_stat, s_r)
    if CORR != 0:
        tl.store(base + 8 * stride_stat, tl.sum(tl.where(m, w, zero), axis=0))
        tl.store(base + 9 * stride_stat, tl.sum(tl.where(m & trunc, one, zero), axis=0))
        tl.store(base + 10 * stride_stat, tl.sum(tl.where(m, lr, zero), axis=0))
    else:
        tl.store(base + 8 * stride_stat, s_n)
        tl.store(base + 9 * stride_stat, tl.sum(zero, axis=0))
        tl.store(base + 10 * stride_stat, tl.sum(zero, axis=0))


@triton.jit
def _pl_bwd_kernel(
    # data pointers
    logp_ptr,  # [B, T] fp16 / bf16 / fp32 / fp64
    old_ptr,  # [B, T] any float
    adv_ptr,  # [B, T] any float (column stride 0: one value per row)
    mask_ptr,  # [B, T] uint8
    ref_ptr,  # [B, T] any float; read only if KL != 0
    roll_ptr,  # [B, T] any float; read only if CORR == 2
    g_ptr,  # [2, B] acc dtype, contiguous: g_pg, g_kl
    grad_ptr,  # [B, T] logp's dtype
    # shapes
    n_rows,
    n_cols,
    # strides (elements)
    s_lp_b, s_lp_t, s_old_b, s_old_t, s_adv_b, s_adv_t, s_m_b, s_m_t, s_ref_b, s_ref_t,
    s_roll_b, s_roll_t, s_g_b, s_g_t,
    # constants
    lo_in: tl.float64,
    hi_in: tl.float64,
    c_in: tl.float64,
    cap_in: tl.float64,
    ACC: tl.constexpr,
    KL: tl.constexpr,  # 0: no KL gradient, 1 / 2 / 3 / 4: k1 / k2 / k3 / k3 * ratio
    DUAL: tl.constexpr,
    CORR: tl.constexpr,  # as in _pl_fwd_kernel (only 2 changes the gradient)
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    lo = (lo_in + tl.zeros((), ACC)).to(ACC)
    hi = (hi_in + tl.zeros((), ACC)).to(ACC)
    c = (c_in + tl.zeros((), ACC)).to(ACC)
    offs = (tile * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    valid = offs < n_cols
    lp, old, a, m, ref = _load_tile(logp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, row, offs, valid,
                                    s_lp_b, s_lp_t, s_old_b, s_old_t, s_adv_b, s_adv_t, s_m_b, s_m_t,
                                    s_ref_b, s_ref_t, ACC, KL)
    d, dc, in_clamp, r, na, pg1, pg2, c1, pg3, neg, pg = _token_terms(lp, old, a, lo, hi, c, DUAL)
    zero = tl.zeros((BLOCK_T,), ACC)
    tie = pg1 == pg2
    g1 = tl.where(pg1 > pg2, 1.0, tl.where(tie, 0.5, 0.0))
    g2 = tl.where(pg2 > pg1, 1.0, tl.where(tie, 0.5, 0.0))
    in_r = (r >= lo) & (r <= hi)
    if DUAL:
        gd = tl.where(c1 < pg3, 1.0, tl.where(c1 == pg3, 0.5, 0.0))
        gc1 = tl.where(neg, gd, 1.0)
    else:
        gc1 = zero + 1.0
    dr = gc1 * (g1 * na + tl.where(in_r, g2 * na, zero))
    dpg = tl.where(in_clamp, dr * r, zero)
    if CORR == 2:
        cap = (cap_in + tl.zeros((), ACC)).to(ACC)
        w, lr, trunc = _rollout_weight(old, roll_ptr, row, offs, valid, s_roll_b, s_roll_t, cap, ACC, CORR)
        dpg = dpg * w
    g_pg = tl.load(g_ptr + row)
    out = g_pg * dpg
    if KL != 0:
        g_kl = tl.load(g_ptr + n_rows + row)
        out += g_kl * _kl_grad(lp, ref, r, in_clamp, KL)
    out = tl.where(m, out, zero)
    tl.store(grad_ptr + row * s_g_b + offs * s_g_t, out.to(grad_ptr.dtype.element_ty), mask=valid)


def _check(logp, old, adv, mask, ref, kl_estimator, roll, corr):
    assert logp.dim() == 2, "logp must be [B, T]"
    shape = tuple(logp.shape)
    for name, t in (("old", old), ("adv", adv), ("mask", mask)):
        assert tuple(t.shape) == shape, f"{name} must be {shape}, got {tuple(t.shape)}"
    assert mask.dtype == torch.uint8, "mask must be uint8"
    assert kl_estimator in (0, 1, 2, 3, 4), "kl_estimator must be 0, 1, 2, 3 or 4"
    if kl_estimator:
        assert tuple(ref.shape) == shape, f"ref must be {shape}, got {tuple(ref.shape)}"
    assert corr in (0, 1, 2), "corr must be 0, 1 or 2"
    if corr:
        assert tuple(roll.shape) == shape, f"roll must be {shape}, got {tuple(roll.shape)}"


def _strides(logp, old, adv, mask, ref, roll):
    return (*logp.stride(), *old.stride(), *adv.stride(), *mask.stride(), *ref.stride(), *roll.stride())


def pl_fwd(logp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
           ref: torch.Tensor, lo: float, hi: float, dual_c: float, kl_estimator: int,
           roll: torch.Tensor, corr: int, cap: float) -> torch.Tensor:
    """Per-row sums of the policy-loss terms.

    Args:
        logp: [B, T] fp16 / bf16 / fp32 / fp64, any strides.
        old, adv, ref: [B, T] any float dtype, any strides (adv's column stride may be 0);
            ref is read only if kl_estimator != 0 (pass any [B, T] tensor otherwise).
        mask: [B, T] uint8, any strides.
        lo, hi: the ratio clip range [1 - clip_low, 1 + clip_high].
        dual_c: clip_ratio_c of the dual clip, or <= 0 for none.
        kl_estimator: 0 (no ref), 1, 2, 3, 4 (k1, k2, k3, k3 * ratio).
        roll, corr, cap: the rollout log-probs ([B, T], read only if corr != 0) and the
            correction: 0 none, 1 statistics only, 2 token TIS with weights min(exp(old - roll), cap).

    Returns:
        [11, B] acc dtype (fp64 for fp64 logp, else fp32): pg_sum, kl_sum, count, clip_low,
        clip_high, clip_dual, neg_kl_sum, ratio_sum, weight_sum, truncated, roll_lr_sum
        (csrc/policy_loss.h).
    """
    _check(logp, old, adv, mask, ref, kl_estimator, roll, corr)
    if not kl_estimator:
        ref = old
    if not corr:
        roll = old
    n_rows, n_cols = logp.shape
    acc = acc_dtype(logp.dtype)
    if n_rows == 0 or n_cols == 0:
        return torch.zeros((N_STATS, n_rows), dtype=acc, device=logp.device)
    block = _block_t(n_cols)
    n_tiles = triton.cdiv(n_cols, block)
    out = torch.empty((N_STATS, n_rows, n_tiles), dtype=acc, device=logp.device)
    _pl_fwd_kernel[(n_rows, n_tiles)](
        logp, old, adv, mask, ref, roll, out,
        n_rows, n_cols, n_tiles,
        *_strides(logp, old, adv, mask, ref, roll),
        float(lo), float(hi), float(dual_c if dual_c > 0 else 0.0), float(cap),
        ACC=tl_acc_dtype(logp.dtype), KL=int(kl_estimator), DUAL=bool(dual_c > 0), CORR=int(corr),
        BLOCK_T=block, num_warps=num_warps(block),
    )
    return out.sum(-1) if n_tiles > 1 else out[:, :, 0]


def pl_bwd(logp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
           ref: torch.Tensor, lo: float, hi: float, dual_c: float, kl_estimator: int,
           roll: torch.Tensor, corr: int, cap: float, g: torch.Tensor, grad_logp: torch.Tensor) -> None:
    """Gradient w.r.t. logp of sum_b g[0, b] pg_sum_b + g[1, b] kl_sum_b, into grad_logp.

    Args: as pl_fwd, plus
        kl_estimator: 0 skips the KL term (pass 0 when the KL coefficient is 0).
        g: [2, B] acc dtype, contiguous.
        grad_logp: [B, T] logp's dtype, any strides; masked-out tokens get 0.
    """
    _check(logp, old, adv, mask, ref, kl_estimator, roll, corr)
    if not kl_estimator:
        ref = old
    if not corr:
        roll = old
    n_rows, n_cols = logp.shape
    assert g.shape == (2, n_rows) and g.is_contiguous() and g.dtype == acc_dtype(logp.dtype), \
        "g must be contiguous [2, B] in the accumulation dtype"
    assert grad_logp.shape == logp.shape and grad_logp.dtype == logp.dtype, "grad_logp must be like logp"
    if n_rows == 0 or n_cols == 0:
        return
    block = _block_t(n_cols)
    grid = (n_rows, triton.cdiv(n_cols, block))
    _pl_bwd_kernel[grid](
        logp, old, adv, mask, ref, roll, g, grad_logp,
        n_rows, n_cols,
        *_strides(logp, old, adv, mask, ref, roll), *grad_logp.stride(),
        float(lo), float(hi), float(dual_c if dual_c > 0 else 0.0), float(cap),
        ACC=tl_acc_dtype(logp.dtype), KL=int(kl_estimator), DUAL=bool(dual_c > 0), CORR=int(corr),
        BLOCK_T=block, num_warps=num_warps(block),
    )
