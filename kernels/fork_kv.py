"""Triton kernel for the KV-cache fork op family ("fork_kv").

Contract: csrc/fork_kv.h (same semantics as the CPU / CUDA backends), oracle:
axpo/ops/reference_fork_kv.py. For each tensor t [B, H, T, D] and output row i:

    out[i, :, out_len - length[i]:out_len, :] = t[src_rows[i], :, src_start[i]:src_start[i] + length[i], :]

and zeros elsewhere (left padding).

One launch PER TENSOR (per layer's keys / values): Triton has no portable way to take a table of
raw pointers to tensors of different dtypes (and its CPU interpreter none at all), so unlike the
CUDA backend (one launch for all layers through a device descriptor table) this backend pays one
launch per tensor. No host sync happens in between.

The copy is bitwise: every tensor is reinterpreted as the integer dtype of its element size
(``Tensor.view(dtype)`` keeps the strides), so any dtype works, dtypes may differ between tensors,
and the interpreter's bf16 handling never touches the data. Each program copies a
[BLOCK_T, BLOCK_D] tile of one (output row, head): loads are masked to the span, so rows whose
(src_row, src_start, length) are out of range (checked again in the kernel) read nothing and
produce zeros.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import interpreting

__all__ = ["fork_kv"]

_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@triton.jit
def _fork_kv_kernel(
    # data pointers
    src_ptr,        # [B, H, T, D] any integer dtype (the bits of the input), last dim unit stride
    dst_ptr,        # [M, H, out_len, D] same dtype, contiguous
    rows_ptr,       # [M] int64 src_rows
    start_ptr,      # [M] int64 src_start
    len_ptr,        # [M] int64 length
    # shapes
    B, H, T, D, out_len,
    # strides (elements)
    s_b, s_h, s_t,
    # constants
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_seg = tl.program_id(0)   # output row i * H + head h
    pid_t = tl.program_id(1)     # tile of destination tokens
    i = pid_seg // H
    h = pid_seg % H
    row = tl.load(rows_ptr + i)
    start = tl.load(start_ptr + i)
    n = tl.load(len_ptr + i)
    valid = (row >= 0) & (row < B) & (start >= 0) & (n >= 0) & (n <= out_len) & (start <= T - n)
    n = tl.where(valid, n, 0)
    row = tl.where(valid, row, 0)
    start = tl.where(valid, start, 0)
    pad = out_len - n

    p = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)       # destination token
    c = tl.arange(0, BLOCK_D)                         # element within the head dim
    p_ok = p < out_len
    c_ok = c < D
    in_span = (p >= pad) & p_ok
    src_tok = tl.where(in_span, start + p - pad, 0)
    src = (src_ptr + row.to(tl.int64) * s_b + h.to(tl.int64) * s_h
           + src_tok.to(tl.int64)[:, None] * s_t + c[None, :])
    x = tl.load(src, mask=in_span[:, None] & c_ok[None, :], other=0)
    dst = dst_ptr + (pid_seg.to(tl.int64) * out_len + p.to(tl.int64)[:, None]) * D + c[None, :]
    tl.store(dst, x, mask=p_ok[:, None] & c_ok[None, :])


def fork_kv(tensors: list[torch.Tensor], src_rows: torch.Tensor, src_start: torch.Tensor,
            length: torch.Tensor, out_len: int) -> list[torch.Tensor]:
    """tensors: L x [B, H_t, T, D_t] (any dtypes, one device); src_rows, src_start, length:
    int64 [M] on that device -> L x [M, H_t, out_len, D_t] contiguous, left padded with zeros.

    Index ranges are expected to be validated by the caller (axpo.ops.fork_kv); out-of-range
    rows come out as zeros and are never read.
    """
    if not tensors:
        return []
    dev = tensors[0].device
    rows = src_rows.to(dev).contiguous()
    start = src_start.to(dev).contiguous()
    length = length.to(dev).contiguous()
    m = rows.shape[0]
    B, T = tensors[0].shape[0], tensors[0].shape[2]
    outs = []
    for t in tensors:
        out = torch.empty((m, t.shape[1], out_len, t.shape[3]), dtype=t.dtype, device=dev)
        outs.append(out)
        if out.numel() == 0:
            continue
        src = t if t.shape[3] <= 1 or t.stride(3) == 1 else t.contiguous()
        ity = _INT_OF_SIZE[src.element_size()]
        src_i, out_i = src.view(ity), out.view(ity)
        d = src.shape[3]
        block_d = triton.next_power_of_2(d)
        cap = 16 if interpreting() else max(1, 8192 // block_d)
        block_t = max(1, min(triton.next_power_of_2(out_len), cap))
        grid = (m * src.shape[1], triton.cdiv(out_len, block_t))
        _fork_kv_kernel[grid](
            src_i, out_i, rows, start, length,
            B, src.shape[1], T, d, out_len,
            src_i.stride(0), src_i.stride(1), src_i.stride(2),
            BLOCK_T=block_t, BLOCK_D=block_d,
            num_warps=4,
        )
    return outs
