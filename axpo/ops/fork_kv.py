"""Prefix KV-cache forking for branch resampling: `fork_kv` on tensors, `fork_cache` on a
transformers `DynamicCache`.

AXPO resamples tool-call continuations from a fixed thinking prefix: the prefix's keys and values
are copied (forked) into M new batch rows, several per source row, and generation continues from
them. Kernels: csrc/cpu/fork_kv.cpp, csrc/cuda/fork_kv.cu (one launch for all layers),
kernels/fork_kv.py (Triton, one launch per tensor); contract in csrc/fork_kv.h; oracle in
axpo/ops/reference_fork_kv.py.

Not differentiable: these are KV caches at generation time. A tensor that requires grad while
grad mode is on is refused with a TypeError (detach it, or call under torch.no_grad()).

Host syncs: with index tensors on the GPU, the range validation and out_len = max(length) (when
out_len is not given) together cost ONE device-to-host sync, none per layer. Pass CPU index
tensors (they usually come from the sampler's bookkeeping anyway) and an explicit out_len to have
no sync at all; AXPO_SKIP_VALUE_CHECKS=1 skips the validation (the kernels still never read out
of bounds: an invalid row then comes out as zeros).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from . import _backend, _validate
from . import reference_fork_kv as reference

__all__ = ["fork_kv", "fork_cache", "ForkedCache", "continuation_inputs"]

_OP = "fork_kv"


@torch.library.custom_op("axpo::fork_kv", mutates_args=())
def _fork(tensors: list[Tensor], src_rows: Tensor, src_start: Tensor, length: Tensor,
          out_len: int, backend: str) -> list[Tensor]:
    """L x [B, H, T, D] -> L x [M, H, out_len, D] (indices validated by the caller)."""
    fn = _backend.kernels(backend, "fork_kv", ("fork_kv",)).fork_kv
    return list(fn(list(tensors), src_rows, src_start, length, int(out_len)))


@_fork.register_fake
def _(tensors, src_rows, src_start, length, out_len, backend):
    m = src_rows.shape[0]
    return [t.new_empty((m, t.shape[1], out_len, t.shape[3])) for t in tensors]


def _index(x, name: str, device: torch.device) -> Tensor:
    if not isinstance(x, Tensor):
        try:
            x = torch.as_tensor(x, dtype=torch.int64)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"{name} must be an int64 tensor [M] (or a sequence of ints), got {type(x).__name__}") from e
    _validate.tensor(x, name, dtypes=(torch.int64,), dim=1)
    if x.device.type != "cpu" and x.device != device:
        raise ValueError(f"{name} is on {x.device}: it must be on the CPU or on the tensors' device {device}")
    return x


def _check_tensors(tensors) -> tuple[list[Tensor], int, int]:
    if isinstance(tensors, Tensor) or not isinstance(tensors, Sequence):
        raise TypeError(f"tensors must be a list or tuple of tensors [B, H, T, D], got {type(tensors).__name__}")
    tensors = list(tensors)
    b = t_len = None
    for j, t in enumerate(tensors):
        _validate.tensor(t, f"tensors[{j}]", dim=4)
        if t.is_complex():
            raise TypeError(f"tensors[{j}] has complex dtype {t.dtype}: fork_kv copies real KV caches")
        if j == 0:
            b, t_len = t.shape[0], t.shape[2]
        elif t.device != tensors[0].device:
            raise ValueError(f"tensors[{j}] is on {t.device} but tensors[0] is on {tensors[0].device}: "
                             "all tensors must share one device")
        elif t.shape[0] != b or t.shape[2] != t_len:
            raise ValueError(f"tensors[{j}] has shape {tuple(t.shape)}: every tensor must have the "
                             f"batch size B = {b} and sequence length T = {t_len} of tensors[0]")
        if t.requires_grad and torch.is_grad_enabled():
            raise TypeError(f"fork_kv is not differentiable and tensors[{j}] requires grad: detach it or "
                            "call under torch.no_grad() (KV caches at generation time need no gradient)")
    return tensors, b or 0, t_len or 0


def _check_ranges(rows: Tensor, start: Tensor, length: Tensor, b: int, t_len: int,
                  out_len: int | None) -> int:
    """Validates every row (one host sync for all checks and max(length)); returns out_len."""
    m = rows.shape[0]
    checks = _validate._value_checks_enabled()
    if m == 0:
        return 0 if out_len is None else out_len
    if not checks:
        return int(length.max()) if out_len is None else out_len
    lim = out_len if out_len is not None else torch.iinfo(torch.int64).max
    bad = torch.stack([
        (rows < 0) | (rows >= b),
        start < 0,
        length < 0,
        start + length > t_len,
        length > lim,
    ])
    ar = torch.arange(m, device=rows.device)
    first = torch.where(bad, ar, m).amin(dim=1)
    stats = torch.cat([first, length.max().reshape(1)]).tolist()  # the one sync
    f_rows, f_start, f_len, f_end, f_out, max_len = stats
    if f_rows < m:
        raise ValueError(f"src_rows must be in [0, {b}) (the batch size of tensors); "
                         f"src_rows[{f_rows}] = {int(rows[f_rows])}")
    if f_start < m:
        raise ValueError(f"src_start must be >= 0; src_start[{f_start}] = {int(start[f_start])}")
    if f_len < m:
        raise ValueError(f"length must be >= 0; length[{f_len}] = {int(length[f_len])}")
    if f_end < m:
        i = f_end
        raise ValueError(f"src_start + length must be <= T = {t_len} (the sequence length of tensors); "
                         f"row {i}: src_start[{i}] = {int(start[i])}, length[{i}] = {int(length[i])}")
    if f_out < m:
        raise ValueError(f"length must be <= out_len = {out_len}; length[{f_out}] = {int(length[f_out])}")
    return int(max_len) if out_len is None else out_len


def fork_kv(tensors: Sequence[Tensor], src_rows: Tensor, src_start: Tensor, length: Tensor,
            out_len: int | None = None, backend: str | None = None) -> list[Tensor]:
    """Forks spans of batch rows of KV-cache tensors into new, left-padded rows.

    Args:
        tensors: the keys and values of every layer, each [B, H, T, D] (same B and T for all; H,
            D and dtype may differ between tensors; one device; any strides).
        src_rows, src_start, length: int64 [M] (on the CPU or the tensors' device): output row i
            takes tokens [src_start[i], src_start[i] + length[i]) of batch row src_rows[i].
            Several output rows may share a source row (branches).
        out_len: length of the output rows, >= max(length); default max(length) (computing it
            from device-resident `length` is part of the one host sync, see the module doc).
        backend: "cpu" | "cuda" | "triton" | "torch" | None (auto; see axpo.ops._backend).

    Returns:
        One new contiguous tensor [M, H, out_len, D] per input tensor, same dtype and device:
        out[i, :, out_len - length[i]:, :] = t[src_rows[i], :, src_start[i]:src_start[i] + length[i], :]
        and zeros in the left padding. Not differentiable (TypeError if an input requires grad
        under grad mode).

    Raises:
        ValueError naming the argument and the first offending row for src_rows outside [0, B),
        src_start < 0, length < 0, src_start + length > T, length > out_len.
    """
    tensors, b, t_len = _check_tensors(tensors)
    device = tensors[0].device if tensors else torch.device("cpu")
    rows = _index(src_rows, "src_rows", device)
    start = _index(src_start, "src_start", device)
    length = _index(length, "length", device)
    m = rows.shape[0]
    for name, x in (("src_start", start), ("length", length)):
        if x.shape[0] != m:
            raise ValueError(f"{name} must have shape ({m},) like src_rows, got {tuple(x.shape)}")
    if out_len is not None and (isinstance(out_len, bool) or not isinstance(out_len, int) or out_len < 0):
        raise ValueError(f"out_len must be None or an int >= 0, got {out_len!r}")
    if not tensors:
        return []
    out_len = _check_ranges(rows, start, length, b, t_len, out_len)
    chosen = _backend.resolve(_OP, device, backend)
    if chosen == "torch":
        with torch.no_grad():
            return reference.fork_kv(tensors, rows, start, length, out_len)
    if chosen == "cpu":
        rows, start, length = rows.cpu(), start.cpu(), length.cpu()
    elif chosen == "triton":
        rows, start, length = (x.to(device, non_blocking=True) for x in (rows, start, length))
    with torch.no_grad():
        return _fork(tensors, rows, start, length, out_len, chosen)


# ------------------------------------------------------------------------------------------------
# transformers DynamicCache
# ------------------------------------------------------------------------------------------------
class ForkedCache(NamedTuple):
    """What `fork_cache` returns.

    cache: a new DynamicCache with M rows of out_len tokens (left padded).
    attention_mask: int64 [M, out_len]: 1 on the forked tokens that were real tokens of the source
        (per src_attention_mask), 0 on the left padding.
    next_position_ids: int64 [M]: the rotary position of the first token appended to each row, the
        source's real position right after the span (so positions continue where the prefix left
        off, whatever the source's left padding was).
    """
    cache: object
    attention_mask: Tensor
    next_position_ids: Tensor


def continuation_inputs(forked: ForkedCache, num_new_tokens: int) -> tuple[Tensor, Tensor]:
    """attention_mask [M, out_len + n] and position_ids [M, n] for a forward of n new tokens per
    row with past_key_values=forked.cache (pass both to the model, with the new input_ids).

    For model.generate(..., past_key_values=forked.cache), pass the concatenated attention_mask;
    generate derives position ids as cumsum(mask) - 1, which equals these whenever each span
    begins at its source row's first real token (the usual prefix fork). Multimodal rope
    (Qwen-VL mrope with images in the prefix) needs the model's own rope deltas instead.
    """
    if isinstance(num_new_tokens, bool) or not isinstance(num_new_tokens, int) or num_new_tokens < 0:
        raise ValueError(f"num_new_tokens must be an int >= 0, got {num_new_tokens!r}")
    mask = forked.attention_mask
    m = mask.shape[0]
    new = torch.ones((m, num_new_tokens), dtype=mask.dtype, device=mask.device)
    pos = forked.next_position_ids[:, None] + torch.arange(num_new_tokens, device=mask.device)[None, :]
    return torch.cat([mask, new], dim=1), pos


def fork_cache(cache, src_rows, src_start, length, *, out_len: int | None = None,
               src_attention_mask: Tensor | None = None, backend: str | None = None) -> ForkedCache:
    """fork_kv on every layer of a transformers DynamicCache -> ForkedCache(cache, mask, positions).

    Args:
        cache: a `transformers.DynamicCache` whose layers are all plain, initialized
            `DynamicLayer`s (full attention; sliding-window, quantized or linear-attention layers
            are refused). It is not modified.
        src_rows, src_start, length, out_len, backend: as in `fork_kv`, in cache token columns.
        src_attention_mask: the source batch's attention mask [B, T] (0 = padding). It gives the
            forked rows' attention mask (padding inside a span stays masked) and their positions
            (transformers' cumsum(mask) - 1 convention for left-padded batches). None: the source
            rows had no padding (column c is at position c).

    Returns:
        ForkedCache(cache, attention_mask [M, out_len], next_position_ids [M]); see
        `continuation_inputs` for the inputs of the next forward / generate call.

    The new cache holds the forked tensors as they are (reference_fork_kv.dynamic_cache_from).
    """
    from transformers.cache_utils import DynamicCache, DynamicLayer

    if not isinstance(cache, DynamicCache):
        raise TypeError(f"cache must be a transformers DynamicCache, got {type(cache).__name__}")
    tensors = []
    for li, layer in enumerate(cache.layers):
        if type(layer) is not DynamicLayer:
            raise TypeError(f"cache.layers[{li}] is a {type(layer).__name__}: fork_cache supports plain "
                            "DynamicLayer (full attention) layers only")
        if not layer.is_initialized or layer.keys is None or layer.keys.dim() != 4:
            raise ValueError(f"cache.layers[{li}] holds no keys/values yet: run the prefix through the model first")
        tensors += [layer.keys, layer.values]
    if not tensors:
        raise ValueError("cache has no layers: run the prefix through the model first")
    device = tensors[0].device
    rows = _index(src_rows, "src_rows", device)
    start = _index(src_start, "src_start", device)
    length = _index(length, "length", device)
    forked = fork_kv(tensors, rows, start, length, out_len=out_len, backend=backend)
    out_len = forked[0].shape[2]
    b, t_len = tensors[0].shape[0], tensors[0].shape[2]

    if src_attention_mask is not None:
        _validate.tensor(src_attention_mask, "src_attention_mask", dim=2)
        if tuple(src_attention_mask.shape) != (b, t_len):
            raise ValueError(f"src_attention_mask must have shape ({b}, {t_len}) (the cache's batch and "
                             f"length), got {tuple(src_attention_mask.shape)}")
        src_mask = src_attention_mask.to(device=device, dtype=torch.int64)
    else:
        src_mask = torch.ones((b, t_len), dtype=torch.int64, device=device)
    rows_d, start_d, len_d = (x.to(device) for x in (rows, start, length))
    m = rows_d.shape[0]
    # forked mask: the source mask's span, left padded with zeros (same layout as the KV rows)
    if m and out_len:
        j = torch.arange(out_len, device=device)[None, :]
        pad = (out_len - len_d)[:, None]
        col = start_d[:, None] + j - pad
        in_span = j >= pad
        gathered = src_mask[rows_d[:, None], col.clamp(0, max(t_len - 1, 0))] if t_len else torch.zeros_like(col)
        mask = torch.where(in_span, gathered, torch.zeros_like(gathered))
    else:
        mask = torch.zeros((m, out_len), dtype=torch.int64, device=device)
    # position after the span = number of real source tokens up to the span's end
    csum = torch.cat([torch.zeros((b, 1), dtype=torch.int64, device=device), src_mask.cumsum(1)], dim=1)
    next_pos = csum[rows_d, start_d + len_d] if m else torch.zeros((0,), dtype=torch.int64, device=device)

    return ForkedCache(reference.dynamic_cache_from(forked), mask, next_pos)
