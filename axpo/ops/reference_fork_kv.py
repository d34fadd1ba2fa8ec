"""Plain PyTorch definitions of the KV-cache fork (to be folded into axpo/ops/reference.py).

`fork_kv` is the oracle of the tests and the baseline of the benchmark: a loop over output rows
with slicing. `repeat_interleave_crop` is what transformers offers for the same job
(`DynamicCache.batch_repeat_interleave` + `crop`): every source row repeated the same number of
times, one common prefix length, no per-row spans or left padding. It equals `fork_kv` exactly
when src_rows = arange(B).repeat_interleave(K), src_start = 0 and length = prefix for all rows.
"""
from __future__ import annotations

import torch


def fork_kv(tensors, src_rows, src_start, length, out_len=None) -> list[torch.Tensor]:
    """L x [B, H, T, D], int64 [M] x 3 -> L x [M, H, out_len, D]:
    out[i, :, out_len - length[i]:, :] = t[src_rows[i], :, src_start[i]:src_start[i] + length[i], :],
    zeros elsewhere. out_len defaults to max(length) (0 for M = 0)."""
    rows = [int(x) for x in torch.as_tensor(src_rows).tolist()]
    starts = [int(x) for x in torch.as_tensor(src_start).tolist()]
    lens = [int(x) for x in torch.as_tensor(length).tolist()]
    if out_len is None:
        out_len = max(lens, default=0)
    outs = []
    for t in tensors:
        out = t.new_zeros((len(rows), t.shape[1], out_len, t.shape[3]))
        for i, (r, s, n) in enumerate(zip(rows, starts, lens)):
            if n:
                out[i, :, out_len - n:, :] = t[r, :, s:s + n, :]
        outs.append(out)
    return outs


def dynamic_cache_from(tensors):
    """A transformers DynamicCache whose layer i holds keys tensors[2i] and values tensors[2i+1],
    used as they are (DynamicLayer.lazy_initialization plus its keys / values attributes: no
    copy, unlike DynamicCache(ddp_cache_data=...), which concatenates onto empty tensors)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    cache = DynamicCache()
    for k, v in zip(tensors[0::2], tensors[1::2]):
        layer = DynamicLayer()
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
        cache.layers.append(layer)
    return cache


def repeat_interleave_crop(tensors, repeats: int, prefix_len: int) -> list[torch.Tensor]:
    """The transformers baseline on a list of [B, H, T, D] tensors: a DynamicCache holding them,
    `batch_repeat_interleave(repeats)` (copies every row `repeats` times, all T tokens), then
    `crop(prefix_len - T)` (a view). Returns the cache's tensors [B * repeats, H, prefix_len, D]."""
    cache = dynamic_cache_from(tensors)
    cache.batch_repeat_interleave(repeats)
    t_len = tensors[0].shape[2]
    if prefix_len < t_len:
        cache.crop(prefix_len - t_len)
    out = []
    for layer in cache.layers:
        out += [layer.keys, layer.values]
    return out
