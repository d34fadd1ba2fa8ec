"""Helpers shared by the Triton kernel files."""
from __future__ import annotations

import os

import torch
import triton.language as tl


def interpreting() -> bool:
    """True under Triton's CPU interpreter (TRITON_INTERPRET=1): kernels pick small tiles there."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc_dtype(dtype: torch.dtype):
    """acc_dtype as a Triton dtype."""
    return tl.float64 if dtype == torch.float64 else tl.float32
