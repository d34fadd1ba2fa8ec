"""Drop-in hot-path ops for RL trainers. Each runs on the cpu, cuda, triton or torch backend
(see axpo.ops._backend); `reference` holds the plain PyTorch definitions."""
from . import reference
from ._backend import BACKENDS, available_backends
from .fork_kv import ForkedCache, continuation_inputs, fork_cache, fork_kv
from .group_advantages import group_advantages
from .linear_logprob_entropy import LinearLogprobEntropy, linear_logprob_entropy
from .logprob_entropy import TokenLogprobEntropy, token_logprob_entropy
from .policy_loss import policy_loss

__all__ = [
    "BACKENDS",
    "ForkedCache",
    "LinearLogprobEntropy",
    "TokenLogprobEntropy",
    "available_backends",
    "continuation_inputs",
    "fork_cache",
    "fork_kv",
    "group_advantages",
    "linear_logprob_entropy",
    "policy_loss",
    "reference",
    "token_logprob_entropy",
]
