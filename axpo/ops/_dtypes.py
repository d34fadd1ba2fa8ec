"""The accumulation dtype of every op, its reference and its Triton kernels: one rule, here."""
from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 inputs accumulate (and return) in fp64; every other float dtype in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
