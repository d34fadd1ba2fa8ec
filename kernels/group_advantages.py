"""Triton kernels for the group_advantages op family.

Contract: csrc/group_advantages.h (same semantics as the CPU / CUDA backends), oracle:
axpo/ops/reference_group_advantages.py.

Densification of the arbitrary int64 labels is done by the launcher with torch ops and **no host
synchronization**: a stable sort of the labels, a cumulative sum of "label changed" flags, and a
scatter back give each element a dense group id in [0, R) (the number of groups is not needed:
the per-group buffers are sized R). Then four elementwise kernels with fp64 atomics:

    _first_kernel: first[g] = min index of the group (atomic_min)        -> the shift c_g
    _sum_kernel:   cnt[g] += 1;  sum[g] += r_i - c_g
    _m2_kernel:    m2[g] += (r_i - c_g - mean_g)^2                         (scale_std only)
    _out_kernel:   adv_i = n > 1 ? (r_i - c_g - mean_g) [/ (sqrt(m2 / (n - 1)) + eps)] : 0

Shifting by a member of the group makes an all-equal group exactly 0; the two passes avoid the
cancellation of sum(x^2) - n mean^2. fp64 atomic adds make the sums' rounding order-dependent on
a GPU (~1 ulp of fp64, invisible in the fp32 output).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, interpreting

__all__ = ["group_advantages"]


def _block(n: int) -> int:
    cap = 256 if interpreting() else 1024
    return max(16, min(triton.next_power_of_2(max(n, 1)), cap))


@triton.jit
def _load_f64(ptr, offs, mask):
    # load, then widen through fp32: the interpreter does bf16 math wrongly
    x = tl.load(ptr + offs, mask=mask, other=0.0)
    if x.dtype == tl.float64:
        return x
    return x.to(tl.float32).to(tl.float64)


@triton.jit
def _first_kernel(
    # data pointers
    gid_ptr,     # [R] int64 dense group ids in [0, R)
    first_ptr,   # [R] int32, filled with R: out, min index per group
    # shapes
    R,
    # constants
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < R
    g = tl.load(gid_ptr + offs, mask=mask, other=0)
    tl.atomic_min(first_ptr + g, offs.to(tl.int32), mask=mask)


@triton.jit
def _sum_kernel(
    # data pointers
    r_ptr,       # [R] rewards (fp16 / bf16 / fp32 / fp64)
    gid_ptr,     # [R] int64 dense group ids
    first_ptr,   # [R] int32 first index per group
    cnt_ptr,     # [R] int32, zeros: out, group sizes
    sum_ptr,     # [R] fp64, zeros: out, sum of r - shift per group
    # shapes
    R,
    # constants
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < R
    g = tl.load(gid_ptr + offs, mask=mask, other=0)
    f = tl.load(first_ptr + g, mask=mask, other=0)
    d = _load_f64(r_ptr, offs, mask) - _load_f64(r_ptr, f, mask)
    tl.atomic_add(cnt_ptr + g, tl.full([BLOCK], 1, tl.int32), mask=mask)
    tl.atomic_add(sum_ptr + g, d, mask=mask)


@triton.jit
def _m2_kernel(
    # data pointers
    r_ptr, gid_ptr, first_ptr, cnt_ptr, sum_ptr,
    m2_ptr,      # [R] fp64, zeros: out, sum of squared deviations per group
    # shapes
    R,
    # constants
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < R
    g = tl.load(gid_ptr + offs, mask=mask, other=0)
    f = tl.load(first_ptr + g, mask=mask, other=0)
    n = tl.load(cnt_ptr + g, mask=mask, other=1).to(tl.float64)
    s = tl.load(sum_ptr + g, mask=mask, other=0.0)
    dev = _load_f64(r_ptr, offs, mask) - _load_f64(r_ptr, f, mask) - s / n
    tl.atomic_add(m2_ptr + g, dev * dev, mask=mask)


@triton.jit
def _out_kernel(
    # data pointers
    r_ptr, gid_ptr, first_ptr, cnt_ptr, sum_ptr, m2_ptr,
    out_ptr,     # [R] fp32 (fp64 for fp64 rewards): out
    # shapes
    R,
    # constants
    eps,
    SCALE_STD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < R
    g = tl.load(gid_ptr + offs, mask=mask, other=0)
    f = tl.load(first_ptr + g, mask=mask, other=0)
    ni = tl.load(cnt_ptr + g, mask=mask, other=1)
    n = ni.to(tl.float64)
    s = tl.load(sum_ptr + g, mask=mask, other=0.0)
    a = _load_f64(r_ptr, offs, mask) - _load_f64(r_ptr, f, mask) - s / n
    if SCALE_STD:
        m2 = tl.load(m2_ptr + g, mask=mask, other=0.0)
        nm1 = tl.maximum(n - 1.0, 1.0)
        den = tl.sqrt(m2 / nm1) + eps
        a = tl.where(den == 0, 0.0, a / den)  # eps == 0 and std == 0: 0, not 0 / 0 (NaN stays NaN)
    a = tl.where(ni > 1, a, 0.0)
    tl.store(out_ptr + offs, a.to(out_ptr.dtype.element_ty), mask=mask)


def dense_group_ids(group_ids: torch.Tensor) -> torch.Tensor:
    """[R] arbitrary int64 labels -> [R] int64 ids in [0, R), equal iff the labels are equal.

    Sort-based, no host synchronization (no data-dependent shape).
    """
    R = group_ids.numel()
    sorted_ids, perm = torch.sort(group_ids, stable=True)
    new = torch.ones(R, dtype=torch.int64, device=group_ids.device)
    if R > 1:
        new[1:] = (sorted_ids[1:] != sorted_ids[:-1]).to(torch.int64)
    dense_sorted = torch.cumsum(new, 0) - 1
    return torch.empty_like(dense_sorted).scatter_(0, perm, dense_sorted)


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, scale_std: bool,
                     eps: float) -> torch.Tensor:
    """rewards [R] fp16/bf16/fp32/fp64, group_ids [R] int64 (any labels) -> advantages [R]
    (fp64 for fp64 rewards, else fp32). See the module docstring for the method."""
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(f"rewards and group_ids must both be [R], got {tuple(rewards.shape)} and "
                         f"{tuple(group_ids.shape)}")
    if group_ids.dtype != torch.int64:
        raise TypeError(f"group_ids must be int64, got {group_ids.dtype}")
    if rewards.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"rewards must be fp16, bf16, fp32 or fp64, got {rewards.dtype}")
    R = rewards.numel()
    if R >= 2**30:
        raise ValueError(f"rewards must have fewer than 2**30 elements, got {R}")
    out_dtype = acc_dtype(rewards.dtype)
    out = torch.empty(R, dtype=out_dtype, device=rewards.device)
    if R == 0:
        return out
    r = rewards.contiguous()
    gid = dense_group_ids(group_ids.contiguous())
    dev = rewards.device
    first = torch.full((R,), R, dtype=torch.int32, device=dev)
    cnt = torch.zeros(R, dtype=torch.int32, device=dev)
    ssum = torch.zeros(R, dtype=torch.float64, device=dev)
    m2 = torch.zeros(R, dtype=torch.float64, device=dev) if scale_std else ssum
    BLOCK = _block(R)
    grid = (triton.cdiv(R, BLOCK),)
    _first_kernel[grid](gid, first, R, BLOCK=BLOCK)
    _sum_kernel[grid](r, gid, first, cnt, ssum, R, BLOCK=BLOCK)
    if scale_std:
        _m2_kernel[grid](r, gid, first, cnt, ssum, m2, R, BLOCK=BLOCK)
    _out_kernel[grid](r, gid, first, cnt, ssum, m2, out, R, float(eps),
                      SCALE_STD=bool(scale_std), BLOCK=BLOCK)
    return out
