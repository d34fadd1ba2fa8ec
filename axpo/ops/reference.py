"""Plain PyTorch definitions of every op: the oracle for tests and the baseline for benchmarks.

Written for clarity, not speed: each materializes what the fused kernels avoid. Evaluate in
float64 (pass float64 inputs) to get the ground truth the tests compare against.
"""
from __future__ import annotations

import torch

from ._dtypes import acc_dtype


def token_logprob_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    compute_entropy: bool = True,
):
    """logits [..., V], labels [...] -> (logprobs [...], entropy [...] or None).

    logprob = log_softmax(logits / T)[label] (0 where label == ignore_index);
    entropy = -sum(p * log p) of softmax(logits / T), with 0 * log 0 = 0 (masked vocabulary).
    """
    x = logits.to(acc_dtype(logits.dtype)) / temperature
    logp = torch.log_softmax(x, dim=-1)
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    picked = logp.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    logprobs = torch.where(valid, picked, torch.zeros_like(picked))
    if not compute_entropy:
        return logprobs, None
    p = logp.exp()
    # p == 0 exactly where the logit is -inf: the term is 0, and so is its gradient.
    entropy = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)
    return logprobs, entropy


def linear_logprob_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    compute_entropy: bool = True,
):
    """hidden [..., H], weight [V, H], bias [V] | None -> op 1 on hidden @ weight.T + bias.

    Materializes the full [..., V] logits (in the input dtype, as an LM head does).
    """
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return token_logprob_entropy(
        logits, labels, temperature=temperature, ignore_index=ignore_index,
        compute_entropy=compute_entropy,
    )


# The other op families' references, one module each beside this file, gathered here so that
# `axpo.ops.reference` names every op's definition.
from .reference_fork_kv import fork_kv, repeat_interleave_crop  # noqa: E402,F401
from .reference_group_advantages import (  # noqa: E402,F401
    group_advantages, group_advantages_index_add, group_advantages_loop,
)
from .reference_policy_loss import agg_loss, kl_penalty, policy_loss  # noqa: E402,F401
