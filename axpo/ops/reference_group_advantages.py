"""Plain PyTorch definitions of group_advantages (to be folded into axpo.ops.reference).

- ``group_advantages``: the reference (oracle of the tests, backend "torch"): vectorized,
  computed in fp64 whatever the input dtype, shifted two-pass variance, no data-dependent shape
  (compiles with torch.compile(fullgraph=True)).
- ``group_advantages_loop``: one Python iteration per group (benchmark baseline (a)).
- ``group_advantages_index_add``: torch.unique + index_add_ in the rewards' dtype, the usual
  vectorized version (benchmark baseline (b)).

Semantics (all three): per group, mean and unbiased std (torch.std);
scale "std": (r - mean) / (std + eps); "none": r - mean; a group of one gets 0.
Output fp32, or fp64 for fp64 rewards.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._dtypes import acc_dtype

SCALES = ("std", "none")


def dense_group_ids(group_ids: Tensor) -> Tensor:
    """[R] arbitrary int64 labels -> [R] ids in [0, R), equal iff the labels are equal.

    Sort + cumsum of "label changed" + scatter back: no data-dependent shape, no host sync.
    """
    R = group_ids.numel()
    sorted_ids, perm = torch.sort(group_ids, stable=True)
    changed = torch.ones(R, dtype=torch.int64, device=group_ids.device)
    changed[1:] = (sorted_ids[1:] != sorted_ids[:-1]).to(torch.int64)
    dense_sorted = torch.cumsum(changed, 0) - 1
    return torch.empty_like(dense_sorted).scatter_(0, perm, dense_sorted)


def group_advantages(rewards: Tensor, group_ids: Tensor, *, scale: str = "std",
                     eps: float = 1e-6) -> Tensor:
    """The reference: [R] rewards, [R] int64 labels -> [R] advantages (see the module doc)."""
    r = rewards.detach().reshape(-1).to(torch.float64)
    gid = dense_group_ids(group_ids.reshape(-1).to(torch.int64))
    R = r.numel()
    zeros = torch.zeros(R, dtype=torch.float64, device=r.device)
    # shift each group by the reward of its first member: all-equal groups give exactly 0
    first = torch.full((R,), R, dtype=torch.int64, device=r.device).scatter_reduce_(
        0, gid, torch.arange(R, device=r.device), "amin")
    d = r - r[first[gid]]
    n = zeros.clone().index_add_(0, gid, torch.ones_like(r))
    mean = zeros.clone().index_add_(0, gid, d) / n.clamp(min=1)
    dev = d - mean[gid]  # pass 2: deviations from the group mean
    if scale == "std":
        m2 = zeros.clone().index_add_(0, gid, dev * dev)
        std = torch.sqrt(m2 / (n - 1).clamp(min=1))
        den = std[gid] + eps
        adv = torch.where(den == 0, torch.zeros_like(dev), dev / den)  # eps = 0, std = 0: 0, not NaN
    elif scale == "none":
        adv = dev
    else:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    adv = torch.where(n[gid] > 1, adv, torch.zeros_like(adv))
    return adv.to(acc_dtype(rewards.dtype))


def group_advantages_loop(rewards: Tensor, group_ids: Tensor, *, scale: str = "std",
                          eps: float = 1e-6) -> Tensor:
    """Baseline (a): one Python iteration per group (groups cut from a sorted layout, O(R))."""
    dt = acc_dtype(rewards.dtype)
    r = rewards.detach().reshape(-1).to(dt)
    sorted_ids, perm = torch.sort(group_ids.reshape(-1), stable=True)
    _, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    pieces = []
    for seg in torch.split(r[perm], counts.tolist()):
        if seg.numel() == 1:
            pieces.append(torch.zeros_like(seg))
            continue
        a = seg - seg.mean()
        if scale == "std":
            a = a / (seg.std() + eps)
        pieces.append(a)
    out = torch.empty_like(r)
    if pieces:
        out[perm] = torch.cat(pieces)
    return out


def group_advantages_index_add(rewards: Tensor, group_ids: Tensor, *, scale: str = "std",
                               eps: float = 1e-6) -> Tensor:
    """Baseline (b): torch.unique(return_inverse) + index_add_, in the rewards' dtype (>= fp32)."""
    dt = acc_dtype(rewards.dtype)
    r = rewards.detach().reshape(-1).to(dt)
    uniq, inv = torch.unique(group_ids.reshape(-1), return_inverse=True)
    G = uniq.numel()
    n = torch.zeros(G, dtype=dt, device=r.device).index_add_(0, inv, torch.ones_like(r))
    mean = torch.zeros(G, dtype=dt, device=r.device).index_add_(0, inv, r) / n
    dev = r - mean[inv]
    if scale == "std":
        var = torch.zeros(G, dtype=dt, device=r.device).index_add_(0, inv, dev * dev) / (n - 1).clamp(min=1)
        dev = dev / (var.sqrt()[inv] + eps)
    return torch.where(n[inv] > 1, dev, torch.zeros_like(dev))
