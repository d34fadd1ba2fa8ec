"""Helpers shared by the Triton kernel files."""
from __future__ import annotations

import os

import torch
import triton.language as tl

from axpo.ops._dtypes import acc_dtype  # noqa: F401  (re-exported for the kernel files)


def interpreting() -> bool:
    """True under Triton's CPU interpreter (TRITON_INTERPRET=1): kernels pick small tiles there."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def tl_acc_dtype(dtype: torch.dtype):
    """acc_dtype (axpo.ops._dtypes) as a Triton dtype."""
    return tl.float64 if acc_dtype(dtype) == torch.float64 else tl.float32


def num_warps(block: int) -> int:
    """Warps of a program that walks `block` elements of a row: more warps for longer tiles."""
    return 16 if block >= 8192 else 8 if block >= 2048 else 4
