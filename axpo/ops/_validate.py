"""Argument checks shared by the ops: each error names the argument and what was expected.

Data-dependent checks (label ranges) cost one host sync; they are skipped while
torch.compile traces and when AXPO_SKIP_VALUE_CHECKS=1. The kernels never read out of bounds
either way: an out-of-range label then yields a NaN log-prob instead of an error.
"""
from __future__ import annotations

import math
import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _value_checks_enabled() -> bool:
    return not torch.compiler.is_compiling() and os.environ.get("AXPO_SKIP_VALUE_CHECKS", "0") != "1"


def tensor(x, name: str, *, dtypes=None, min_dim: int | None = None, dim: int | None = None):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None and x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(x.dtype).replace('torch.', '')}")
    if dim is not None and x.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(x.shape)}")
    if min_dim is not None and x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dim(s), got shape {tuple(x.shape)}")


def same_device(*named):
    (n0, t0), *rest = named
    for n, t in rest:
        if t.device != t0.device:
            raise ValueError(f"{n} is on {t.device} but {n0} is on {t0.device}: all inputs must share one device")


def temperature(t) -> float:
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {t!r}")
    return float(t)


def labels(labels: torch.Tensor, batch_shape, vocab: int, ignore_index: int):
    tensor(labels, "labels", dtypes=(torch.int64,))
    if tuple(labels.shape) != tuple(batch_shape):
        raise ValueError(
            f"labels must have shape {tuple(batch_shape)} (the logits' shape without the vocab dim), "
            f"got {tuple(labels.shape)}"
        )
    if labels.numel() and _value_checks_enabled():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            idx = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}; "
                f"labels{list(idx)} = {int(labels[idx])}"
            )
