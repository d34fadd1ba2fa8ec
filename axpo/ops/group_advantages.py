"""GRPO / Dr.GRPO group-normalized advantages: custom op and public function.

Kernels: csrc/cpu/group_advantages.cpp, csrc/cuda/group_advantages.cu,
kernels/group_advantages.py (contract in csrc/group_advantages.h); reference:
axpo/ops/reference_group_advantages.py. Each backend densifies the arbitrary int64 labels itself
(CPU: hash table; CUDA: device hash table; Triton: sort + cumsum) and runs one segmented
reduction (shifted two-pass variance in fp64): no Python loop over groups, and on a GPU no host
synchronization besides the optional finiteness check of the rewards.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._dtypes import acc_dtype

from . import _backend, _validate
from . import reference_group_advantages as reference

_OP = "group_advantages"
_FAMILY = "group_advantages"
SCALES = ("std", "none")


@torch.library.custom_op("axpo::group_advantages", mutates_args=())
def _op(rewards: Tensor, group_ids: Tensor, scale_std: bool, eps: float, backend: str) -> Tensor:
    """rewards [R] float, group_ids [R] int64 labels -> advantages [R] (fp64 for fp64 rewards)."""
    k = _backend.kernels(backend, _FAMILY, ("group_advantages",))
    return k.group_advantages(rewards, group_ids, scale_std, eps)


@_op.register_fake
def _(rewards, group_ids, scale_std, eps, backend):
    return rewards.new_empty(rewards.shape, dtype=acc_dtype(rewards.dtype))


def _check_finite(rewards: Tensor) -> None:
    """One host sync: non-finite rewards would silently poison their whole group.

    Fast path: the sum of the rewards is finite iff every reward is (NaN / inf never round back
    to finite), unless the sum overflows; only then, or if the sum is not finite, are the
    rewards checked one by one (to name the first bad one). A single reduction is ~20x cheaper
    than isfinite().all() on a CPU.
    """
    if rewards.numel() == 0 or not _validate._value_checks_enabled():
        return
    if bool(torch.isfinite(rewards.sum())):
        return
    finite = torch.isfinite(rewards)
    if not bool(finite.all()):
        i = int((~finite).nonzero()[0, 0])
        raise ValueError(f"rewards must be finite; rewards[{i}] = {float(rewards[i])}")


def group_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    scale: str = "std",
    eps: float = 1e-6,
    backend: str | None = None,
) -> Tensor:
    """Per-group normalized advantages (GRPO; Dr.GRPO with ``scale="none"``).

    Args:
        rewards: [R] fp32 / bf16 / fp16 / fp64 rewards, one per rollout (no gradient flows).
        group_ids: [R] int64 (or int32) group labels: any values, any order, groups of any sizes.
        scale: "std": (r - mean) / (std + eps), the unbiased std of the group (torch.std, as in
            verl's compute_grpo_outcome_advantage); "none": r - mean (Dr.GRPO).
        eps: added to the std, finite and >= 0.
        backend: "cpu" | "cuda" | "triton" | "torch" | None (auto; see axpo.ops._backend).

    Returns:
        advantages [R], fp32 (fp64 for fp64 rewards). A group of one rollout gets 0 (verl gives
        it the reward itself); a group whose rewards are all equal gets exactly 0.

    Raises:
        TypeError: rewards not floating point, group_ids not integer.
        ValueError: shapes or devices differ, bad scale / eps, non-finite rewards (the check costs
            one host sync; skipped under torch.compile and with AXPO_SKIP_VALUE_CHECKS=1).
    """
    _validate.tensor(rewards, "rewards", dtypes=_validate.FLOAT_DTYPES, dim=1)
    _validate.tensor(group_ids, "group_ids", dtypes=(torch.int64, torch.int32), dim=1)
    if group_ids.shape != rewards.shape:
        raise ValueError(f"group_ids must have the shape of rewards {tuple(rewards.shape)}, "
                         f"got {tuple(group_ids.shape)}")
    _validate.same_device(("rewards", rewards), ("group_ids", group_ids))
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if rewards.numel() >= 2**30:
        raise ValueError(f"rewards must have fewer than 2**30 elements, got {rewards.numel()}")
    rewards = rewards.detach()
    _check_finite(rewards)
    if group_ids.dtype != torch.int64:
        group_ids = group_ids.to(torch.int64)
    chosen = _backend.resolve(_OP, rewards.device, backend)
    if chosen == "torch":
        return reference.group_advantages(rewards, group_ids, scale=scale, eps=float(eps))
    return _op(rewards, group_ids, scale == "std", float(eps), chosen)
