"""Test setup: Triton's interpreter must be on before any kernel is decorated, so that the
triton backend runs on CPU tensors; backends are listed per device for parametrization."""
import os
import zlib

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from axpo.ops import available_backends  # noqa: E402


def kernel_backends(op: str | None = None):
    """(backend, device) pairs that can run here, reference excluded; with `op` (an op or family
    name), only the backends its family has (axpo.ops._backend.FAMILIES)."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [(b, d) for d in devices for b, why in available_backends(d, op).items() if b != "torch" and why is None]


KERNEL_BACKENDS = kernel_backends()
ALL_BACKENDS = KERNEL_BACKENDS + [("torch", "cpu")]


def _ids(pairs):
    return [f"{b}-{d}" for b, d in pairs]


@pytest.fixture(params=KERNEL_BACKENDS, ids=_ids(KERNEL_BACKENDS))
def kernel_backend(request):
    return request.param


@pytest.fixture(params=ALL_BACKENDS, ids=_ids(ALL_BACKENDS))
def any_backend(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed(request):
    # A different but reproducible draw per test: fresh inputs, stable failures.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
