"""The accumulation dtype of every op, its reference and its Triton kernels: one rule, here."""
from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 inputs accumulate (and return) in fp64; every other float dtype in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gemm_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the LM-head GEMMs of linear_logprob_entropy run in, for inputs of `dtype`.

    The input dtype wherever the device multiplies it natively. On a CPU, torch runs bf16 / fp16
    GEMMs through oneDNN only when the CPU has the instructions for it (AVX-512 or Arm bf16,
    torch's own `_is_mkldnn_bf16_supported` / `_fp16_` check) and oneDNN is enabled; otherwise
    it falls back to a generic loop: about 7x slower than fp32 on an AVX2 machine (measured
    in benchmarks/NOTES.md). There the GEMMs run in fp32: the operands are upcast a chunk at
    a time and the gradients cast back, which costs one fp32 copy of hidden and of one chunk.
    """
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return dtype
    mkldnn = torch.backends.mkldnn
    if not (mkldnn.is_available() and mkldnn.enabled):
        return torch.float32
    supported = (torch.ops.mkldnn._is_mkldnn_bf16_supported if dtype == torch.bfloat16
                 else torch.ops.mkldnn._is_mkldnn_fp16_supported)
    return dtype if supported() else torch.float32
