"""Per-token log-prob + entropy from logits: custom ops, autograd, public function.

Kernels: csrc/cpu/logprob_entropy.cpp, csrc/cuda/logprob_entropy.cu,
kernels/logprob_entropy.py (contract in csrc/logprob_entropy.h). One pass over the vocabulary forward,
one backward; no [N, V] temporary besides the gradient itself.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._dtypes import acc_dtype

from . import _backend, _validate, reference

_OP = "token_logprob_entropy"


@torch.library.custom_op("axpo::token_logprob_entropy_fwd", mutates_args=())
def _fwd(
    logits: Tensor, labels: Tensor, inv_temperature: float, ignore_index: int,
    compute_entropy: bool, backend: str,
) -> Tensor:
    """logits [N, V] (unit vocab stride), labels [N] -> [3, N]: logprob, entropy, lse."""
    return _backend.lpe_kernels(backend).fwd(logits, labels, inv_temperature, ignore_index, compute_entropy)


@_fwd.register_fake
def _(logits, labels, inv_temperature, ignore_index, compute_entropy, backend):
    return logits.new_empty((3, logits.shape[0]), dtype=acc_dtype(logits.dtype))


@torch.library.custom_op("axpo::token_logprob_entropy_bwd", mutates_args=())
def _bwd(
    grad_out: Tensor, logits: Tensor, labels: Tensor, stats: Tensor, inv_temperature: float,
    ignore_index: int, has_entropy_grad: bool, backend: str,
) -> Tensor:
    """grad_out, stats [3, N] -> grad_logits [N, V] in the logits' dtype."""
    grad_logits = torch.empty_like(logits, memory_format=torch.contiguous_format)
    _backend.lpe_kernels(backend).bwd(
        logits, labels, 0, inv_temperature, ignore_index,
        stats[2].contiguous(), stats[1].contiguous(),
        grad_out[0].contiguous(), grad_out[1].contiguous(), has_entropy_grad, grad_logits,
    )
    return grad_logits


@_bwd.register_fake
def _(grad_out, logits, labels, stats, inv_temperature, ignore_index, has_entropy_grad, backend):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, labels, inv_temperature, ignore_index, compute_entropy, backend = inputs
    ctx.save_for_backward(logits, labels, output)
    ctx.args = (inv_temperature, ignore_index, compute_entropy, backend)


def _backward(ctx, grad_out):
    logits, labels, stats = ctx.saved_tensors
    inv_temperature, ignore_index, compute_entropy, backend = ctx.args
    grad = _bwd(grad_out, logits, labels, stats, inv_temperature, ignore_index, compute_entropy, backend)
    return grad, None, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def _as_rows(logits: Tensor) -> Tensor:
    """[..., V] -> [N, V] with unit vocab stride, copying only if no such view exists."""
    rows = logits.reshape(-1, logits.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def token_logprob_entropy(
    logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    compute_entropy: bool = True,
    backend: str | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Log-prob of each label and entropy of each token's distribution, in one vocab pass.

    Args:
        logits: [..., V] fp32 / bf16 / fp16 (fp64 is computed and returned in fp64).
        labels: [...] int64 vocab ids; positions equal to `ignore_index` get logprob 0 and no
            gradient through it.
        temperature: the logits are divided by it (sampling temperature), > 0.
        compute_entropy: False returns None for entropy and does no entropy work.
        backend: "cpu" | "cuda" | "triton" | "torch" | None (auto; see axpo.ops._backend).

    Returns:
        logprobs [...] fp32: log_softmax(logits / T)[label]
        entropy [...] fp32 or None: -sum(p log p), p = softmax(logits / T)
    Both are differentiable w.r.t. logits, with any upstream gradient.
    """
    _validate.tensor(logits, "logits", dtypes=_validate.FLOAT_DTYPES, min_dim=1)
    vocab = logits.shape[-1]
    if vocab == 0:
        raise ValueError(f"logits must have a non-empty vocab (last) dim, got shape {tuple(logits.shape)}")
    _validate.tensor(labels, "labels")
    _validate.same_device(("logits", logits), ("labels", labels))
    _validate.labels(labels, logits.shape[:-1], vocab, ignore_index)
    t = _validate.temperature(temperature)
    chosen = _backend.resolve(_OP, logits.device, backend)
    if chosen == "torch":
        return reference.token_logprob_entropy(
            logits, labels, temperature=t, ignore_index=ignore_index, compute_entropy=compute_entropy
        )
    stats = _fwd(_as_rows(logits), labels.reshape(-1).contiguous(), 1.0 / t, int(ignore_index), bool(compute_entropy), chosen)
    logprobs = stats[0].view(labels.shape)
    entropy = stats[1].view(labels.shape) if compute_entropy else None
    return logprobs, entropy


class TokenLogprobEntropy(torch.nn.Module):
    """nn.Module form of token_logprob_entropy with fixed settings."""

    def __init__(self, *, temperature: float = 1.0, ignore_index: int = -100,
                 compute_entropy: bool = True, backend: str | None = None):
        super().__init__()
        self.temperature, self.ignore_index = temperature, ignore_index
        self.compute_entropy, self.backend = compute_entropy, backend

    def forward(self, logits: Tensor, labels: Tensor):
        return token_logprob_entropy(
            logits, labels, temperature=self.temperature, ignore_index=self.ignore_index,
            compute_entropy=self.compute_entropy, backend=self.backend,
        )
