"""Triton kernels for the log-prob + entropy ("lpe") op family.

Contract: csrc/logprob_entropy.h (same semantics as the CPU / CUDA backends), oracle: axpo/ops/reference.py.

Per row, with x = logit * inv_temp in the accumulation dtype (fp64 for fp64 logits, else fp32),
one streaming pass over the vocabulary keeps an online state

    m = running max of x,  s = sum exp(x - m),  w = sum exp(x - m) * (x - m)   (0 * -inf := 0)

merged tile by tile. Each side of a merge is rescaled by exp(m_side - m') only if its s > 0, so
fully masked (-inf) tiles never produce -inf - -inf = NaN. Out-of-range vocab positions of a tile
load as -inf (never 0). Then

    lse = m + log s,   entropy = log s - w / s,   logprob = x[label] - lse.

The label's logit is read with a single guarded load, only if 0 <= label - v_offset < C; a label
outside the vocabulary (that is not ignore_index) reads nothing and gives a NaN logprob.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, interpreting, num_warps, tl_acc_dtype

__all__ = ["lpe_fwd", "lpe_fwd_chunk", "lpe_bwd"]


def _fwd_block_v(n_cols: int, dtype: torch.dtype) -> int:
    # Forward: one program streams a whole row, so tiles are large to amortize the per-tile
    # reductions and the online-state merge; 16-bit logits get twice the elements per tile for the
    # same bytes in flight. Small tiles under the interpreter keep the CPU checks fast and still
    # exercise several tiles + a ragged last tile.
    cap = 256 if interpreting() else (8192 if dtype in (torch.float16, torch.bfloat16) else 4096)
    return max(16, min(triton.next_power_of_2(max(n_cols, 1)), cap))


def _bwd_block_v(n_cols: int) -> int:
    # Backward: elementwise, one tile of one row per program; moderate tiles give enough programs
    # to fill the GPU even for few rows.
    cap = 256 if interpreting() else 2048
    return max(16, min(triton.next_power_of_2(max(n_cols, 1)), cap))



@triton.jit
def _merge_state(ma, sa, wa, mb, sb, wb, COMPUTE_ENTROPY: tl.constexpr):
    """Merge two online-softmax states (m, s, w); a side with s == 0 contributes nothing."""
    m = tl.maximum(ma, mb)
    a_live = sa > 0
    b_live = sb > 0
    aa = tl.where(a_live, tl.exp(tl.where(a_live, ma - m, 0.0)), 0.0)
    ab = tl.where(b_live, tl.exp(tl.where(b_live, mb - m, 0.0)), 0.0)
    s = aa * sa + ab * sb
    if COMPUTE_ENTROPY:
        w = (tl.where(a_live, aa * (wa + sa * tl.where(a_live, ma - m, 0.0)), 0.0)
             + tl.where(b_live, ab * (wb + sb * tl.where(b_live, mb - m, 0.0)), 0.0))
    else:
        w = wa
    return m, s, w


@triton.jit
def _lpe_fwd_kernel(
    # data pointers
    logits_ptr,  # [N, C] fp16 / bf16 / fp32 / fp64, stride(1) == 1
    labels_ptr,  # [N] int64, global vocab ids
    state_ptr,  # [4, N] acc dtype (m, s, w, xl); read if not INIT, written if not FINALIZE
    out_ptr,  # [3, N] acc dtype (logprob, entropy, lse); written if FINALIZE
    # shapes
    n_rows,
    n_cols,  # C: columns of this chunk (== V for a full row)
    v_offset,  # vocab id of column 0
    # strides
    stride_logits_row,
    stride_state,  # row stride of state / out (== N)
    # constants
    inv_temp: tl.float64,
    ignore_index,
    ACC_DTYPE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    COMPUTE_ENTROPY: tl.constexpr,
    INIT: tl.constexpr,  # start from the empty state (m=-inf, s=0, w=0, xl=NaN)
    FINALIZE: tl.constexpr,  # write (logprob, entropy, lse) to out instead of the state
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_logits_row
    # inv_temp (fp64) in the accumulation dtype. Written as an add, not tl.cast: the interpreter
    # would round the Python float through fp32 on the way.
    scale = (inv_temp + tl.zeros((), ACC_DTYPE)).to(ACC_DTYPE)
    label = tl.load(labels_ptr + row)

    if INIT:
        m = tl.full((), float("-inf"), ACC_DTYPE)
        s = tl.zeros((), ACC_DTYPE)
        w = tl.zeros((), ACC_DTYPE)
        xl = tl.full((), float("nan"), ACC_DTYPE)
    else:
        m = tl.load(state_ptr + 0 * stride_state + row)
        s = tl.load(state_ptr + 1 * stride_state + row)
        w = tl.load(state_ptr + 2 * stride_state + row)
        xl = tl.load(state_ptr + 3 * stride_state + row)

    # The label's logit: one guarded scalar load, never out of bounds.
    rel = label - v_offset
    in_chunk = (rel >= 0) & (rel < n_cols)
    xl_here = tl.load(row_ptr + tl.where(in_chunk, rel, 0), mask=in_chunk, other=0.0)
    xl = tl.where(in_chunk, xl_here.to(ACC_DTYPE) * scale, xl)

    cols = tl.arange(0, BLOCK_V)
    for start in range(0, n_cols, BLOCK_V):
        offs = start + cols
        valid = offs < n_cols
        # Out-of-range positions are -inf: they add exactly nothing to s and w.
        x = tl.load(row_ptr + offs, mask=valid, other=float("-inf")).to(ACC_DTYPE) * scale
        mt = tl.max(x, axis=0)
        live = x > float("-inf")
        e = tl.where(live, tl.exp(tl.where(live, x - mt, 0.0)), 0.0)
        st = tl.sum(e, axis=0)
        if COMPUTE_ENTROPY:
            wt = tl.sum(e * tl.where(e > 0, x - mt, 0.0), axis=0)  # no 0 * -inf
        else:
            wt = st * 0
        m, s, w = _merge_state(m, s, w, mt, st, wt, COMPUTE_ENTROPY)

    if FINALIZE:
        log_s = tl.log(s)
        lse = m + log_s
        logprob = tl.where(label == ignore_index, 0.0, xl - lse)
        if COMPUTE_ENTROPY:
            entropy = log_s - w / s
        else:
            entropy = tl.zeros((), ACC_DTYPE)
        tl.store(out_ptr + 0 * stride_state + row, logprob)
        tl.store(out_ptr + 1 * stride_state + row, entropy)
        tl.store(out_ptr + 2 * stride_state + row, lse)
    else:
        tl.store(state_ptr + 0 * stride_state + row, m)
        tl.store(state_ptr + 1 * stride_state + row, s)
        tl.store(state_ptr + 2 * stride_state + row, w)
        tl.store(state_ptr + 3 * stride_state + row, xl)


@triton.jit
def _lpe_bwd_kernel(
    # data pointers
    logits_ptr,  # [N, C] fp16 / bf16 / fp32 / fp64, stride(1) == 1
    labels_ptr,  # [N] int64, global vocab ids
    lse_ptr,  # [N] acc dtype
    entropy_ptr,  # [N] acc dtype; read only if HAS_ENTROPY_GRAD
    grad_logprob_ptr,  # [N] acc dtype
    grad_entropy_ptr,  # [N] acc dtype; read only if HAS_ENTROPY_GRAD
    grad_logits_ptr,  # [N, C] logits' dtype, stride(1) == 1; may alias logits
    # shapes
    n_cols,
    v_offset,
    # strides
    stride_logits_row,
    stride_grad_row,
    # constants
    inv_temp: tl.float64,
    ignore_index,
    ACC_DTYPE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    HAS_ENTROPY_GRAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    # inv_temp (fp64) in the accumulation dtype. Written as an add, not tl.cast: the interpreter
    # would round the Python float through fp32 on the way.
    scale = (inv_temp + tl.zeros((), ACC_DTYPE)).to(ACC_DTYPE)

    label = tl.load(labels_ptr + row)
    lse = tl.load(lse_ptr + row)
    g_lp = tl.load(grad_logprob_ptr + row)
    g_lp = tl.where(label == ignore_index, 0.0, g_lp)

    offs = tile * BLOCK_V + tl.arange(0, BLOCK_V)
    valid = offs < n_cols
    x = tl.load(logits_ptr + row * stride_logits_row + offs, mask=valid, other=0.0)
    x = x.to(ACC_DTYPE) * scale
    lp = x - lse
    p = tl.exp(lp)
    is_label = offs.to(tl.int64) == label - v_offset
    dx = g_lp * (tl.where(is_label, 1.0, 0.0) - p)
    if HAS_ENTROPY_GRAD:
        ent = tl.load(entropy_ptr + row)
        g_h = tl.load(grad_entropy_ptr + row)
        t = p * tl.where(p > 0, lp + ent, 0.0)  # no 0 * -inf
        dx = dx - g_h * t
    grad = dx * scale
    # Same index as the load above: safe when grad_logits aliases logits.
    tl.store(grad_logits_ptr + row * stride_grad_row + offs,
             grad.to(grad_logits_ptr.dtype.element_ty), mask=valid)


def _check_logits(logits: torch.Tensor, labels: torch.Tensor) -> None:
    assert logits.dim() == 2 and (logits.shape[1] <= 1 or logits.stride(1) == 1), "logits must be [N, C] with stride(1) == 1"
    assert labels.dtype == torch.int64 and labels.is_contiguous(), "labels must be contiguous int64"
    assert labels.shape == (logits.shape[0],), "labels must be [N]"


def _launch_fwd(logits, labels, v_offset, inv_temp, ignore_index, state, out,
                compute_entropy, init, finalize):
    n_rows, n_cols = logits.shape
    block = _fwd_block_v(n_cols, logits.dtype)
    _lpe_fwd_kernel[(n_rows,)](
        logits, labels, state, out,
        n_rows, n_cols, v_offset,
        logits.stride(0), n_rows,
        float(inv_temp), int(ignore_index),
        ACC_DTYPE=tl_acc_dtype(logits.dtype),
        BLOCK_V=block,
        COMPUTE_ENTROPY=bool(compute_entropy),
        INIT=init,
        FINALIZE=finalize,
        num_warps=num_warps(block),
    )


def lpe_fwd(logits: torch.Tensor, labels: torch.Tensor, inv_temp: float, ignore_index: int,
            compute_entropy: bool) -> torch.Tensor:
    """Log-prob, entropy and logsumexp of full rows.

    Args:
        logits: [N, V] fp16 / bf16 / fp32 / fp64, stride(1) == 1, any stride(0).
        labels: [N] int64 contiguous, vocab ids (or ignore_index).
        inv_temp: 1 / temperature.
        ignore_index: label value whose logprob is 0.
        compute_entropy: if False, the entropy row is 0 and its accumulation is skipped.

    Returns:
        [3, N] acc dtype (fp64 for fp64 logits, else fp32): rows logprob, entropy, lse.
    """
    _check_logits(logits, labels)
    n_rows = logits.shape[0]
    out = torch.empty((3, n_rows), dtype=acc_dtype(logits.dtype), device=logits.device)
    if n_rows == 0:
        return out
    # state is not touched with INIT and FINALIZE; pass out as a placeholder pointer.
    _launch_fwd(logits, labels, 0, inv_temp, ignore_index, out, out, compute_entropy,
                init=True, finalize=True)
    return out


def lpe_fwd_chunk(logits: torch.Tensor, labels: torch.Tensor, v_offset: int, inv_temp: float,
                  state: torch.Tensor, compute_entropy: bool) -> None:
    """Fold one vocab chunk into the running per-row state, in place.

    Args:
        logits: [N, C] fp16 / bf16 / fp32 / fp64, stride(1) == 1, any stride(0); holds vocab ids
            [v_offset, v_offset + C).
        labels: [N] int64 contiguous, global vocab ids.
        v_offset: vocab id of column 0.
        inv_temp: 1 / temperature.
        state: [4, N] acc dtype, contiguous, rows m (init -inf), s (0), w (0), xl (NaN); updated.
        compute_entropy: if False, w is left untouched.
    """
    _check_logits(logits, labels)
    n_rows = logits.shape[0]
    assert state.shape == (4, n_rows) and state.is_contiguous(), "state must be contiguous [4, N]"
    assert state.dtype == acc_dtype(logits.dtype), "state must have the accumulation dtype"
    if n_rows == 0:
        return
    _launch_fwd(logits, labels, v_offset, inv_temp, 0, state, state, compute_entropy,
                init=False, finalize=False)


def lpe_bwd(logits: torch.Tensor, labels: torch.Tensor, v_offset: int, inv_temp: float,
            ignore_index: int, lse: torch.Tensor, entropy: torch.Tensor,
            grad_logprob: torch.Tensor, grad_entropy: torch.Tensor, has_entropy_grad: bool,
            grad_logits: torch.Tensor) -> None:
    """Gradient w.r.t. one chunk of logits, written to grad_logits.

    dx_j = g_lp * ([v_offset + j == label] - p_j) - g_H * p_j * (log p_j + H),  p_j = exp(x_j - lse)
    grad_logits_j = dx_j * inv_temp; rows with label == ignore_index get no g_lp term.

    Args:
        logits: [N, C] fp16 / bf16 / fp32 / fp64, stride(1) == 1, any stride(0).
        labels: [N] int64 contiguous, global vocab ids.
        v_offset: vocab id of column 0.
        inv_temp: 1 / temperature.
        ignore_index: label value that gets no logprob gradient.
        lse, entropy, grad_logprob, grad_entropy: [N] acc dtype contiguous (entropy and
            grad_entropy are not read if has_entropy_grad is False).
        has_entropy_grad: whether the entropy term is present.
        grad_logits: [N, C] logits' dtype, stride(1) == 1; may alias logits.
    """
    _check_logits(logits, labels)
    assert grad_logits.shape == logits.shape and (logits.shape[1] <= 1 or grad_logits.stride(1) == 1), \
        "grad_logits must be [N, C] with stride(1) == 1"
    n_rows, n_cols = logits.shape
    if n_rows == 0 or n_cols == 0:
        return
    if not has_entropy_grad:
        entropy, grad_entropy = lse, lse  # placeholders, never read
    block = _bwd_block_v(n_cols)
    grid = (n_rows, triton.cdiv(n_cols, block))
    _lpe_bwd_kernel[grid](
        logits, labels, lse, entropy, grad_logprob, grad_entropy, grad_logits,
        n_cols, v_offset,
        logits.stride(0), grad_logits.stride(0),
        float(inv_temp), int(ignore_index),
        ACC_DTYPE=tl_acc_dtype(logits.dtype),
        BLOCK_V=block,
        HAS_ENTROPY_GRAD=bool(has_entropy_grad),
        num_warps=num_warps(block),
    )
