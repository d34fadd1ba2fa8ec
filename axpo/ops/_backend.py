"""The one place where a backend is chosen for an op call.

Backends:
  torch   the plain PyTorch reference (axpo/ops/reference.py); always available
  cpu     the C++ kernels of axpo._C, for CPU tensors
  cuda    the CUDA kernels of axpo._C, for CUDA tensors (when built with CUDA)
  triton  the Triton kernels of axpo.kernels, for CUDA tensors; for CPU tensors only through
          Triton's interpreter, which must be switched on (TRITON_INTERPRET=1) before axpo
          is imported

Which op family has which backend, and its default per device, is the FAMILIES table below;
`resolve`, `available_backends`, `axpo info`, `axpo bench`, the benchmarks' backend lists and
the tests' parametrization read it.

Order of precedence: the call's `backend=` argument, then the environment variable
AXPO_BACKEND, then the family's default for the tensor's device.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from axpo import _ext

BACKENDS = ("torch", "cpu", "cuda", "triton")
ENV_BACKEND = "AXPO_BACKEND"


@dataclass(frozen=True)
class OpFamily:
    """One op family: its public ops, the backends that implement it, and its default backend
    per device type (a device type not listed runs the torch reference).

    name: the family's files: csrc/<name>.h + csrc/{cpu,cuda}/<name>.*, kernels/<name>.py,
        axpo/ops/reference*.py, benchmarks/bench_<name>.py (`axpo bench <name>`).
    """
    name: str
    ops: tuple[str, ...]
    backends: tuple[str, ...]
    default: dict = field(default_factory=dict)

    def __post_init__(self):
        bad = [b for b in self.backends if b not in BACKENDS]
        if bad or "torch" not in self.backends:
            raise ValueError(f"OpFamily {self.name!r}: backends must be among {BACKENDS} and include 'torch', "
                             f"got {self.backends}")
        for device_type, b in self.default.items():
            if b not in self.backends:
                raise ValueError(f"OpFamily {self.name!r}: the default for {device_type} ({b!r}) is not one of "
                                 f"its backends {self.backends}")


# Which op has which backend, and the default per device: the one table. GPU defaults must follow
# the GPU benchmark (benchmarks/results/); until one has been run, Triton serves the
# bandwidth-bound ops on CUDA and the CUDA kernels the irregular ones.
FAMILIES: tuple[OpFamily, ...] = (
    OpFamily("logprob_entropy", ("token_logprob_entropy", "linear_logprob_entropy"), BACKENDS,
             {"cpu": "cpu", "cuda": "triton"}),
    OpFamily("group_advantages", ("group_advantages",), BACKENDS, {"cpu": "cpu", "cuda": "cuda"}),
    OpFamily("policy_loss", ("policy_loss",), BACKENDS, {"cpu": "cpu", "cuda": "triton"}),
    OpFamily("fork_kv", ("fork_kv",), BACKENDS, {"cpu": "cpu", "cuda": "cuda"}),
)
FAMILY_NAMES = tuple(f.name for f in FAMILIES)
FAMILY_OF_OP = {op: f for f in FAMILIES for op in f.ops}
OPS = tuple(FAMILY_OF_OP)


def family(name: str) -> OpFamily:
    """The OpFamily called `name`, or the family of the op called `name`."""
    for f in FAMILIES:
        if f.name == name:
            return f
    if name in FAMILY_OF_OP:
        return FAMILY_OF_OP[name]
    raise ValueError(f"no op family or op named {name!r}; families: {FAMILY_NAMES}, ops: {OPS}")


def _triton_reason(device_type: str) -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e}); pip install triton"
    if device_type == "cuda":
        return None
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            return None
        return "Triton runs on CPU tensors only in its interpreter: set TRITON_INTERPRET=1 before importing axpo"
    return f"no Triton backend for device type '{device_type}'"


def unavailable_reason(backend: str, device: torch.device | str) -> str | None:
    """None if `backend` can run on `device`, else why not (one line)."""
    device_type = torch.device(device).type
    if backend == "torch":
        return None
    if backend == "triton":
        return _triton_reason(device_type)
    if backend in ("cpu", "cuda"):
        if device_type != backend:
            return f"the {backend} backend takes {backend} tensors, not {device_type}"
        mod, reason = _ext.load()
        if mod is None:
            return reason
        if backend == "cuda" and not mod.with_cuda:
            return "axpo._C was built without CUDA (torch had no CUDA or no CUDA toolkit at build time)"
        return None
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def available_backends(device: torch.device | str, op: str | None = None) -> dict[str, str | None]:
    """Backend name -> None if usable on `device`, else the reason it is not. With `op` (an op or
    a family name), only the backends that family implements."""
    names = BACKENDS if op is None else family(op).backends
    return {b: unavailable_reason(b, device) for b in names}


def resolve(op: str, device: torch.device, backend: str | None) -> str:
    """The backend that runs `op` on tensors of `device`; raises if a forced one cannot."""
    fam = family(op)
    forced = backend if backend is not None else os.environ.get(ENV_BACKEND) or None
    if forced is not None:
        if forced not in BACKENDS:
            src = "backend" if backend is not None else f"environment variable {ENV_BACKEND}"
            raise ValueError(f"{src} must be one of {BACKENDS}, got {forced!r}")
        if forced not in fam.backends:
            raise ValueError(f"{op} has no {forced!r} backend; it has {fam.backends}")
        reason = unavailable_reason(forced, device)
        if reason is not None:
            raise RuntimeError(f"{op}: backend '{forced}' cannot run on {device}: {reason}")
        return forced
    choice = fam.default.get(device.type, "torch")
    return choice if unavailable_reason(choice, device) is None else "torch"


def kernels(backend: str, family: str, names: tuple[str, ...]) -> SimpleNamespace:
    """The host functions `names` of op family `family` for one kernel backend.

    triton: axpo.kernels.<family>.<name>; cpu / cuda: axpo._C.<name>_cpu / <name>_cuda
    (contracts: csrc/<family>.h).
    """
    if backend == "triton":
        mod = importlib.import_module(f"axpo.kernels.{family}")
        return SimpleNamespace(**{n: getattr(mod, n) for n in names})
    if backend in ("cpu", "cuda"):
        c, reason = _ext.load()
        if c is None:
            raise RuntimeError(reason)
        return SimpleNamespace(**{n: getattr(c, f"{n}_{backend}") for n in names})
    raise ValueError(f"no kernels for backend {backend!r}")


def lpe_kernels(backend: str) -> SimpleNamespace:
    """fwd / fwd_chunk / bwd of the log-prob + entropy family (csrc/logprob_entropy.h)."""
    k = kernels(backend, "logprob_entropy", ("lpe_fwd", "lpe_fwd_chunk", "lpe_bwd"))
    return SimpleNamespace(fwd=k.lpe_fwd, fwd_chunk=k.lpe_fwd_chunk, bwd=k.lpe_bwd)
