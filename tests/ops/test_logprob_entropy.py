"""token_logprob_entropy: every backend against the float64 reference, forward and backward."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

from axpo.ops import reference, token_logprob_entropy
from axpo.ops.logprob_entropy import _bwd, _fwd
from tests.conftest import KERNEL_BACKENDS

NEG_INF = float("-inf")


def make_logits(case: str, n: int, v: int, dtype=torch.float32, device="cpu"):
    """Logits and labels for one named case (the inputs that break kernels included)."""
    x = torch.randn(n, v, dtype=torch.float64) * 2
    y = torch.randint(0, v, (n,))
    if case == "peaked":  # one token dominates: p ~ 1, the rest ~ e^-50
        x[torch.arange(n), y] += 50
        x[0, (y[0] + 1) % v] += 80  # and one row peaked away from its label
    elif case == "masked":  # a masked vocabulary: -inf logits, whole tiles included
        x[torch.rand(n, v) < 0.3] = NEG_INF
        x[:, : v // 2] = NEG_INF  # covers whole tiles
        x[torch.arange(n), y] = torch.randn(n, dtype=torch.float64)
        if n > 1:  # one label sits on a masked logit: logprob -inf, still a finite gradient
            x[1, y[1]] = NEG_INF
    elif case == "large":  # big logits: entropy must not cancel catastrophically
        x = x * 40 + 1000
    if n > 2:
        y[2] = -100  # an ignored position
    return x.to(dtype).to(device), y.to(device)


def ref64(logits, labels, temperature=1.0, compute_entropy=True):
    return reference.token_logprob_entropy(
        logits.detach().double(), labels, temperature=temperature, compute_entropy=compute_entropy
    )


def fwd_bwd(fn, logits, labels, g_lp, g_ent, **kw):
    x = logits.detach().clone().requires_grad_(True)
    lp, ent = fn(x, labels, **kw)
    loss = (torch.where(torch.isfinite(lp), lp, 0) * g_lp).sum() + (ent * g_ent).sum()
    (gx,) = torch.autograd.grad(loss, x)
    return lp, ent, gx


def tol(dtype):
    # Forward accumulates in fp32 whatever the input dtype; gradients are stored in the input dtype.
    return {"fwd": dict(rtol=2e-5, atol=2e-4), "grad": dict(rtol=2e-2, atol=2e-2) if dtype != torch.float32 else dict(rtol=1e-4, atol=1e-6)}


CASES = ["random", "peaked", "masked", "large"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("v", [1000, 2053])
def test_matches_reference(any_backend, case, v, dtype):
    backend, device = any_backend
    logits, labels = make_logits(case, 6, v, dtype, device)
    g_lp, g_ent = torch.randn(6, device=device), torch.randn(6, device=device)
    t = 0.7 if case == "random" else 1.0
    lp, ent, gx = fwd_bwd(token_logprob_entropy, logits, labels, g_lp, g_ent, temperature=t, backend=backend)
    rlp, rent, rgx = fwd_bwd(
        lambda x, y, **k: reference.token_logprob_entropy(x, y, **k),
        logits.double(), labels, g_lp.double(), g_ent.double(), temperature=t,
    )
    assert lp.dtype == ent.dtype == torch.float32 and gx.dtype == dtype
    torch.testing.assert_close(lp.double(), rlp, **tol(dtype)["fwd"])
    torch.testing.assert_close(ent.double(), rent, **tol(dtype)["fwd"])
    grad_tol = tol(dtype)["grad"]
    if case == "large" and dtype == torch.float32:  # fp32 logits near 1000 carry 6e-5 of rounding
        grad_tol = dict(rtol=1e-4, atol=5e-5)
    torch.testing.assert_close(gx.double(), rgx, **grad_tol)
    assert lp[2].item() == 0.0  # ignored position


@pytest.mark.parametrize("v", [151936, 129920], ids=["V151936", "V129920"])
def test_qwen_vocab_sizes(any_backend, v):
    """Vocab sizes that are not a multiple of any power-of-two tile (verl's positive log-prob bug)."""
    backend, device = any_backend
    logits, labels = make_logits("random", 2, v, torch.bfloat16, device)
    logits[1, -7:] = 30  # the last, partial tile decides the max
    g_lp, g_ent = torch.randn(2, device=device), torch.randn(2, device=device)
    lp, ent, gx = fwd_bwd(token_logprob_entropy, logits, labels, g_lp, g_ent, backend=backend)
    rlp, rent, rgx = fwd_bwd(reference.token_logprob_entropy, logits.double(), labels, g_lp.double(), g_ent.double())
    assert (lp <= 0).all()
    torch.testing.assert_close(lp.double(), rlp, rtol=2e-5, atol=2e-4)
    torch.testing.assert_close(ent.double(), rent, rtol=2e-5, atol=2e-4)
    torch.testing.assert_close(gx.double(), rgx, rtol=2e-2, atol=1e-3)


def test_non_contiguous(any_backend):
    backend, device = any_backend
    base = torch.randn(4, 5, 2 * 777, device=device)
    labels = torch.randint(0, 777, (5, 4), device=device).t()  # non-contiguous labels too
    views = {
        "row-strided": base[..., :777],  # unit vocab stride, padded rows: no copy needed
        "vocab-strided": base[..., ::2],  # stride 2 in the vocab dim
        "batch-transposed": base[..., 777:].transpose(0, 1),
    }
    for name, x in views.items():
        y = labels if x.shape[:-1] == labels.shape else labels.t()
        lp, ent = token_logprob_entropy(x, y, backend=backend)
        rlp, rent = ref64(x, y)
        assert lp.shape == y.shape, name
        torch.testing.assert_close(lp.double(), rlp, rtol=2e-5, atol=2e-4, msg=name)
        torch.testing.assert_close(ent.double(), rent, rtol=2e-5, atol=2e-4, msg=name)


def test_batch_shapes(any_backend):
    backend, device = any_backend
    # Single token with no batch dims, an empty batch, a 3-D batch.
    x1, y1 = torch.randn(50, device=device), torch.tensor(3, device=device)
    lp, ent = token_logprob_entropy(x1, y1, backend=backend)
    assert lp.shape == ent.shape == ()
    torch.testing.assert_close(lp.double(), ref64(x1, y1)[0], rtol=1e-5, atol=1e-5)
    x0 = torch.randn(0, 50, device=device, requires_grad=True)
    lp, ent = token_logprob_entropy(x0, torch.zeros(0, dtype=torch.long, device=device), backend=backend)
    assert lp.shape == ent.shape == (0,)
    (lp.sum() + ent.sum()).backward()
    assert x0.grad.shape == (0, 50)
    x3, y3 = torch.randn(2, 3, 40, device=device), torch.randint(0, 40, (2, 3), device=device)
    lp, ent = token_logprob_entropy(x3, y3, backend=backend)
    torch.testing.assert_close(lp.double(), ref64(x3, y3)[0], rtol=1e-5, atol=1e-5)


def test_no_entropy(any_backend):
    backend, device = any_backend
    logits, labels = make_logits("random", 5, 300, device=device)
    lp, ent = token_logprob_entropy(logits, labels, compute_entropy=False, backend=backend)
    assert ent is None
    torch.testing.assert_close(lp.double(), ref64(logits, labels)[0], rtol=1e-5, atol=1e-5)
    # Gradient through logprobs alone equals the reference's.
    g = torch.randn(5, device=device)
    _, _, gx = fwd_bwd(lambda x, y, **k: (token_logprob_entropy(x, y, **k)[0], torch.zeros(5, device=device)),
                       logits, labels, g, g, compute_entropy=False, backend=backend)
    _, _, rgx = fwd_bwd(lambda x, y: (reference.token_logprob_entropy(x, y)[0], torch.zeros(5, dtype=torch.float64)),
                        logits.double(), labels, g.double(), g.double())
    torch.testing.assert_close(gx.double(), rgx, rtol=1e-4, atol=1e-6)


def test_entropy_only_gradient(any_backend):
    """Gradient through the entropy alone (the entropy-bonus term of a loss)."""
    backend, device = any_backend
    logits, labels = make_logits("masked", 4, 700, device=device)
    x = logits.clone().requires_grad_(True)
    token_logprob_entropy(x, labels, backend=backend)[1].sum().backward()
    xr = logits.double().clone().requires_grad_(True)
    reference.token_logprob_entropy(xr, labels)[1].sum().backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-6)


def test_fully_masked_row_is_nan(any_backend):
    backend, device = any_backend
    x = torch.randn(3, 100, device=device)
    x[1] = NEG_INF
    lp, ent = token_logprob_entropy(x, torch.tensor([1, 2, 3], device=device), backend=backend)
    rlp, rent = ref64(x, torch.tensor([1, 2, 3], device=device))
    assert torch.isnan(lp[1]) and torch.isnan(rlp[1]) and torch.isnan(ent[1]) and torch.isnan(rent[1])
    assert torch.isfinite(lp[[0, 2]]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=["fp16", "fp64"])
def test_other_dtypes(any_backend, dtype):
    backend, device = any_backend
    logits, labels = make_logits("random", 5, 333, dtype, device)
    lp, ent = token_logprob_entropy(logits, labels, backend=backend)
    assert lp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    atol = 1e-10 if dtype == torch.float64 else 2e-4
    torch.testing.assert_close(lp.double(), ref64(logits, labels)[0], rtol=atol, atol=atol)
    torch.testing.assert_close(ent.double(), ref64(logits, labels)[1], rtol=atol, atol=atol)


def test_gradcheck_float64(any_backend):
    backend, device = any_backend
    logits = torch.randn(3, 11, dtype=torch.float64, device=device, requires_grad=True)
    labels = torch.tensor([4, -100, 10], device=device)

    def f(x):
        lp, ent = token_logprob_entropy(x, labels, temperature=0.8, backend=backend)
        return lp, ent

    assert torch.autograd.gradcheck(f, (logits,), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradgradcheck(f, (logits,)) if backend == "torch" else True


def test_opcheck(kernel_backend):
    backend, device = kernel_backend
    logits, labels = make_logits("masked", 4, 97, torch.float32, device)
    logits.requires_grad_(True)
    torch.library.opcheck(_fwd, (logits, labels, 1.25, -100, True, backend))
    torch.library.opcheck(_fwd, (logits.detach(), labels, 1.0, -100, False, backend))
    stats = _fwd(logits.detach(), labels, 1.25, -100, True, backend)
    grad = torch.randn(3, 4, device=device)
    torch.library.opcheck(_bwd, (grad, logits.detach(), labels, stats, 1.25, -100, True, backend))


def compile_cases():
    # Inductor around the cpu kernels; aot_eager (trace + fake tensors, no codegen) for every backend.
    return [("cpu", "cpu", "inductor")] + [(b, d, "aot_eager") for b, d in KERNEL_BACKENDS]


@pytest.mark.parametrize("backend,device,compiler", compile_cases())
def test_torch_compile(backend, device, compiler):
    logits, labels = make_logits("random", 8, 64, torch.float32, device)

    @torch.compile(fullgraph=True, backend=compiler)
    def loss_fn(x, y):
        lp, ent = token_logprob_entropy(x, y, temperature=0.9, backend=backend)
        return -(lp.mean()) - 0.01 * ent.mean()

    x = logits.clone().requires_grad_(True)
    loss = loss_fn(x, labels)
    loss.backward()
    xr = logits.double().clone().requires_grad_(True)
    rlp, rent = reference.token_logprob_entropy(xr, labels, temperature=0.9)
    (-(rlp.mean()) - 0.01 * rent.mean()).backward()
    torch.testing.assert_close(loss.double(), (-(rlp.mean()) - 0.01 * rent.mean()).detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-7)


def test_out_of_range_label_never_reads_out_of_bounds(kernel_backend, monkeypatch):
    """With value checks off (as under torch.compile) a bad label gives NaN, never a crash."""
    backend, device = kernel_backend
    monkeypatch.setenv("AXPO_SKIP_VALUE_CHECKS", "1")
    x = torch.randn(3, 50, device=device)
    lp, ent = token_logprob_entropy(x, torch.tensor([5, 50, -7], device=device), backend=backend)
    assert torch.isfinite(lp[0]) and torch.isnan(lp[1]) and torch.isnan(lp[2])
    torch.testing.assert_close(ent.double(), ref64(x, torch.tensor([5, 5, 5], device=device))[1], rtol=1e-5, atol=1e-5)


def test_bad_input_errors():
    x = torch.randn(4, 10)
    y = torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\).*labels\[1\] = 10"):
        token_logprob_entropy(x, torch.tensor([0, 10, 1, 2]))
    with pytest.raises(ValueError, match="labels must be in"):
        token_logprob_entropy(x, torch.tensor([0, -1, 1, 2]))
    with pytest.raises(TypeError, match="labels must have dtype in \\(int64\\), got int32"):
        token_logprob_entropy(x, y.int())
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        token_logprob_entropy(x, y[:3])
    with pytest.raises(TypeError, match="logits must have dtype"):
        token_logprob_entropy(x.long(), y)
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        token_logprob_entropy(x.numpy(), y)
    with pytest.raises(ValueError, match="non-empty vocab"):
        token_logprob_entropy(torch.randn(4, 0), y)
    with pytest.raises(ValueError, match="labels is on meta but logits is on cpu"):
        token_logprob_entropy(x, y.to("meta"))
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        token_logprob_entropy(x, y, temperature=0.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        token_logprob_entropy(x, y, backend="mkl")
    # ignore_index itself is always allowed, whatever its value.
    lp, _ = token_logprob_entropy(x, torch.tensor([0, -100, 1, 2]))
    assert lp[1] == 0


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 5), v=st.integers(1, 300), temperature=st.floats(0.3, 3.0),
    masked=st.floats(0.0, 0.9), scale=st.sampled_from([0.1, 1.0, 30.0]), seed=st.integers(0, 2**31 - 1),
)
def test_property_matches_reference(backend, device, n, v, temperature, masked, scale, seed):
    """Random shapes, temperatures, masks and logit scales: every kernel backend equals the reference."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g) * scale
    y = torch.randint(0, v, (n,), generator=g)
    x[torch.rand(n, v, generator=g) < masked] = NEG_INF
    x[torch.arange(n), y] = torch.randn(n, generator=g)  # every row keeps its label finite
    g_lp, g_ent = torch.randn(n, generator=g), torch.randn(n, generator=g)
    x, y, g_lp, g_ent = (t.to(device) for t in (x, y, g_lp, g_ent))
    lp, ent, gx = fwd_bwd(token_logprob_entropy, x, y, g_lp, g_ent, temperature=temperature, backend=backend)
    rlp, rent, rgx = fwd_bwd(reference.token_logprob_entropy, x.double(), y, g_lp.double(), g_ent.double(),
                             temperature=temperature)
    torch.testing.assert_close(lp.double(), rlp, rtol=2e-5, atol=2e-4)
    torch.testing.assert_close(ent.double(), rent, rtol=2e-5, atol=2e-4)
    torch.testing.assert_close(gx.double(), rgx, rtol=1e-4, atol=1e-5)
