"""Log-prob + entropy fused with the LM head: [N, V] logits are never stored.

The vocabulary is walked in chunks of C columns. Forward: logits_c = hidden @ W_c.T (+ b_c)
by the backend's matmul, folded into a per-row running state (max, sum exp, sum exp * x,
label logit) by the lpe chunk kernel, then discarded. Backward: each chunk's logits are
recomputed, turned in place into their gradient by the lpe backward kernel, and multiplied
into grad_hidden (accumulated in fp32) and the chunk's rows of grad_weight. Peak extra
memory is one [N, C] chunk, C chosen to fit a budget (see _chunk_cols). The GEMMs run in the
input dtype, or in fp32 on a CPU that has no fast bf16 / fp16 GEMM (_dtypes.gemm_dtype).

Under DeepSpeed ZeRO-3 the weight is partitioned (an empty tensor) except while its owning
module runs; use LinearLogprobEntropy as the model's LM head so ZeRO-3's module hooks gather
the weight around forward and backward (README: "ZeRO-3").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _backend, _validate, reference
from ._dtypes import acc_dtype, gemm_dtype

_OP = "linear_logprob_entropy"
CHUNK_BUDGET_BYTES = 256 << 20  # one [N, C] logits chunk at most this large (C >= 512)
MAX_CHUNK_COLS = 8192


def _chunk_cols(n_rows: int, vocab: int, elem_size: int, chunk_size: int) -> int:
    if chunk_size > 0:
        return min(chunk_size, vocab)
    cols = CHUNK_BUDGET_BYTES // max(1, n_rows * elem_size)
    cols = max(512, min(MAX_CHUNK_COLS, cols)) // 128 * 128
    return min(cols, vocab)


def _head_chunk(weight: Tensor, bias: Tensor | None, v0: int, v1: int,
                dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """Rows v0:v1 of the LM head in the GEMM dtype (gemm_dtype; .to is free when it is theirs)."""
    return weight[v0:v1].to(dtype), None if bias is None else bias[v0:v1].to(dtype)


@torch.library.custom_op("axpo::linear_logprob_entropy_fwd", mutates_args=())
def _fwd(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, inv_temperature: float,
    ignore_index: int, compute_entropy: bool, chunk_size: int, backend: str,
) -> Tensor:
    """hidden [N, H], weight [V, H], bias [V] | None, labels [N] -> [3, N]: logprob, entropy, lse."""
    kernels = _backend.lpe_kernels(backend)
    n, vocab = hidden.shape[0], weight.shape[0]
    acc = acc_dtype(hidden.dtype)
    state = torch.empty((4, n), dtype=acc, device=hidden.device)
    state[0].fill_(float("-inf"))
    state[1:3].zero_()
    state[3].fill_(float("nan"))
    hidden_g = hidden.to(gemm_dtype(hidden.dtype, hidden.device))
    cols = _chunk_cols(n, vocab, hidden_g.element_size(), chunk_size)
    if n:
        for v0 in range(0, vocab, cols):
            v1 = min(v0 + cols, vocab)
            w, b = _head_chunk(weight, bias, v0, v1, hidden_g.dtype)
            kernels.fwd_chunk(F.linear(hidden_g, w, b), labels, v0,
                              inv_temperature, state, compute_entropy)
    m, s, w, label_x = state
    log_s = s.log()
    lse = m + log_s
    entropy = log_s - w / s if compute_entropy else torch.zeros_like(lse)
    logprob = torch.where(labels == ignore_index, torch.zeros_like(lse), label_x - lse)
    return torch.stack([logprob, entropy, lse])


@_fwd.register_fake
def _(hidden, weight, bias, labels, inv_temperature, ignore_index, compute_entropy, chunk_size, backend):
    return hidden.new_empty((3, hidden.shape[0]), dtype=acc_dtype(hidden.dtype))


@torch.library.custom_op("axpo::linear_logprob_entropy_bwd", mutates_args=())
def _bwd(
    grad_out: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
    stats: Tensor, inv_temperature: float, ignore_index: int, compute_entropy: bool,
    chunk_size: int, backend: str, need_hidden: bool, need_weight: bool, need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """-> grad_hidden [N, H], grad_weight [V, H], grad_bias [V]; each empty if not needed."""
    kernels = _backend.lpe_kernels(backend)
    n, vocab = hidden.shape[0], weight.shape[0]
    acc = acc_dtype(hidden.dtype)
    lse, entropy = stats[2].contiguous(), stats[1].contiguous()
    g_lp, g_ent = grad_out[0].contiguous(), grad_out[1].contiguous()
    grad_hidden_acc = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_hidden else None
    grad_weight = torch.empty_like(weight) if need_weight else weight.new_empty(0)
    grad_bias = torch.empty_like(bias) if (need_bias and bias is not None) else hidden.new_empty(0)
    hidden_g = hidden.to(gemm_dtype(hidden.dtype, hidden.device))
    upcast = hidden_g.dtype != hidden.dtype
    cols = _chunk_cols(n, vocab, hidden_g.element_size(), chunk_size)
    if n == 0:
        if need_weight:
            grad_weight.zero_()
        if grad_bias.numel():
            grad_bias.zero_()
    for v0 in range(0, vocab, cols) if n else ():
        v1 = min(v0 + cols, vocab)
        w, b = _head_chunk(weight, bias, v0, v1, hidden_g.dtype)
        chunk = F.linear(hidden_g, w, b)
        # The recomputed logits become their own gradient: no second [N, C] buffer.
        kernels.bwd(chunk, labels, v0, inv_temperature, ignore_index, lse, entropy,
                    g_lp, g_ent, compute_entropy, chunk)
        if need_hidden:
            grad_hidden_acc += chunk @ w
        if need_weight:
            if upcast:
                grad_weight[v0:v1] = chunk.t() @ hidden_g
            else:
                torch.mm(chunk.t(), hidden_g, out=grad_weight[v0:v1])
        if grad_bias.numel():
            grad_bias[v0:v1] = chunk.sum(0, dtype=acc)
    grad_hidden = grad_hidden_acc.to(hidden.dtype) if need_hidden else hidden.new_empty(0)
    return grad_hidden, grad_weight, grad_bias


@_bwd.register_fake
def _(grad_out, hidden, weight, bias, labels, stats, inv_temperature, ignore_index, compute_entropy,
      chunk_size, backend, need_hidden, need_weight, need_bias):
    return (
        torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
        torch.empty_like(weight) if need_weight else weight.new_empty(0),
        torch.empty_like(bias) if (need_bias and bias is not None) else hidden.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, inv_temperature, ignore_index, compute_entropy, chunk_size, backend = inputs
    ctx.save_for_backward(hidden, weight, bias, labels, output)
    ctx.args = (inv_temperature, ignore_index, compute_entropy, chunk_size, backend)


def _backward(ctx, grad_out):
    hidden, weight, bias, labels, stats = ctx.saved_tensors
    if weight.numel() == 0:
        raise RuntimeError(
            "linear_logprob_entropy backward: weight is empty (numel 0). Under DeepSpeed ZeRO-3 the "
            "LM head's weight was released before backward; use axpo.ops.LinearLogprobEntropy as the "
            "model's LM head so ZeRO-3 gathers it for backward."
        )
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    gh, gw, gb = _bwd(grad_out, hidden, weight, bias, labels, stats, *ctx.args,
                      need_hidden, need_weight, need_bias and bias is not None)
    return (gh if need_hidden else None, gw if need_weight else None,
            gb if (need_bias and bias is not None) else None, None, None, None, None, None, None)


_fwd.register_autograd(_backward, setup_context=_setup_context)


def linear_logprob_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    compute_entropy: bool = True,
    backend: str | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """token_logprob_entropy(hidden @ weight.T + bias, labels) without storing the logits.

    Args:
        hidden: [..., H] fp32 / bf16 / fp16 (fp64 computed in fp64): the last hidden states.
        weight: [V, H] (an LM head's weight), same dtype and device as hidden.
        labels: [...] int64; `ignore_index` positions get logprob 0 and no gradient through it.
        bias: [V] or None.
        chunk_size: vocab columns per chunk; default fits one [N, C] chunk in 256 MiB.
    Returns:
        logprobs [...] fp32, entropy [...] fp32 or None; gradients flow to hidden, weight, bias.
    """
    _validate.tensor(hidden, "hidden", dtypes=_validate.FLOAT_DTYPES, min_dim=1)
    _validate.tensor(weight, "weight", dtypes=_validate.FLOAT_DTYPES)
    if weight.numel() == 0:
        raise ValueError(
            f"weight must be a non-empty [V, H] matrix, got shape {tuple(weight.shape)}. Under DeepSpeed "
            "ZeRO-3 a partitioned LM head weight is empty outside its module's forward: use "
            "axpo.ops.LinearLogprobEntropy as the LM head, or gather the weight first"
        )
    _validate.tensor(weight, "weight", dim=2)
    vocab, hid = weight.shape
    if hidden.shape[-1] != hid:
        raise ValueError(f"hidden's last dim must equal weight's H = {hid}, got hidden shape {tuple(hidden.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    named = [("hidden", hidden), ("weight", weight), ("labels", labels)]
    if bias is not None:
        _validate.tensor(bias, "bias", dtypes=(hidden.dtype,), dim=1)
        if bias.shape[0] != vocab:
            raise ValueError(f"bias must have shape [{vocab}] (weight's V), got {tuple(bias.shape)}")
        named.append(("bias", bias))
    _validate.tensor(labels, "labels")
    _validate.same_device(*named)
    _validate.labels(labels, hidden.shape[:-1], vocab, ignore_index)
    t = _validate.temperature(temperature)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    chosen = _backend.resolve(_OP, hidden.device, backend)
    if chosen == "torch":
        return reference.linear_logprob_entropy(
            hidden, weight, labels, bias=bias, temperature=t, ignore_index=ignore_index,
            compute_entropy=compute_entropy,
        )
    stats = _fwd(hidden.reshape(-1, hid), weight, bias, labels.reshape(-1).contiguous(), 1.0 / t,
                 int(ignore_index), bool(compute_entropy), int(chunk_size or 0), chosen)
    logprobs = stats[0].view(labels.shape)
    entropy = stats[1].view(labels.shape) if compute_entropy else None
    return logprobs, entropy


class LinearLogprobEntropy(torch.nn.Linear):
    """An LM head that can also return per-token log-probs + entropy without logits.

    `head(hidden)` returns logits like nn.Linear (generation keeps working);
    `head(hidden, labels)` returns (logprobs, entropy) through linear_logprob_entropy.
    Because the fused call happens inside this module's forward, DeepSpeed ZeRO-3 gathers
    the partitioned weight around it, in forward and in backward. Swap it in before
    deepspeed.initialize: `model.lm_head = LinearLogprobEntropy.from_linear(model.lm_head)`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *,
                 temperature: float = 1.0, ignore_index: int = -100, compute_entropy: bool = True,
                 backend: str | None = None, chunk_size: int | None = None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.temperature, self.ignore_index = temperature, ignore_index
        self.compute_entropy, self.backend, self.chunk_size = compute_entropy, backend, chunk_size

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, **kwargs) -> "LinearLogprobEntropy":
        """Wraps an existing nn.Linear, sharing (not copying) its parameters."""
        head = cls(linear.in_features, linear.out_features, bias=False, device="meta", **kwargs)
        head.weight = linear.weight
        head.bias = linear.bias
        return head

    def forward(self, hidden: Tensor, labels: Tensor | None = None):
        if labels is None:
            return super().forward(hidden)
        return linear_logprob_entropy(
            hidden, self.weight, labels, bias=self.bias, temperature=self.temperature,
            ignore_index=self.ignore_index, compute_entropy=self.compute_entropy, backend=self.backend,
            chunk_size=self.chunk_size,
        )
