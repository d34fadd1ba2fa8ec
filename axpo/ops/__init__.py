"""Drop-in hot-path ops for RL trainers. Each runs on the cpu, cuda, triton or torch backend
(see axpo.ops._backend); `reference` holds the plain PyTorch definitions."""
from . import reference
from ._backend import BACKENDS, available_backends
from .linear_logprob_entropy import LinearLogprobEntropy, linear_logprob_entropy
from .logprob_entropy import TokenLogprobEntropy, token_logprob_entropy

__all__ = [
    "BACKENDS",
    "LinearLogprobEntropy",
    "TokenLogprobEntropy",
    "available_backends",
    "linear_logprob_entropy",
    "reference",
    "token_logprob_entropy",
]
