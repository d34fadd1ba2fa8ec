"""linear_logprob_entropy: every backend against the float64 reference on hidden @ W.T + b."""
import contextlib

import pytest
import torch

from axpo.ops import LinearLogprobEntropy, linear_logprob_entropy, reference
from axpo.ops._dtypes import gemm_dtype
from axpo.ops.linear_logprob_entropy import _bwd, _fwd
from tests.conftest import KERNEL_BACKENDS


def make_inputs(n, h, v, dtype=torch.float32, device="cpu", bias=True, case="random"):
    hidden = torch.randn(n, h, dtype=torch.float64)
    weight = torch.randn(v, h, dtype=torch.float64) / h**0.5 * 3
    b = torch.randn(v, dtype=torch.float64) if bias else None
    labels = torch.randint(0, v, (n,))
    if case == "masked":  # a masked vocabulary through the bias
        b = torch.where(torch.rand(v) < 0.4, float("-inf"), b)
        b[labels] = 0.0
    elif case == "peaked":
        weight[labels[0]] = hidden[0] * 8
    if n > 1:
        labels[1] = -100
    cast = lambda t: None if t is None else t.to(dtype).to(device)  # noqa: E731
    return cast(hidden), cast(weight), cast(b), labels.to(device)


def run(fn, hidden, weight, bias, labels, g_lp, g_ent, **kw):
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight)]
    b = None if bias is None else bias.detach().clone().requires_grad_(True)
    lp, ent = fn(leaves[0], leaves[1], labels, bias=b, **kw)
    loss = (lp * g_lp).sum() + (ent * g_ent).sum()
    grads = torch.autograd.grad(loss, leaves + ([b] if b is not None else []))
    return lp, ent, grads


def ref_run(hidden, weight, bias, labels, g_lp, g_ent, **kw):
    d = lambda t: None if t is None else t.double()  # noqa: E731
    return run(reference.linear_logprob_entropy, d(hidden), d(weight), d(bias), labels, g_lp.double(), g_ent.double(), **kw)


def assert_grads_close(grads, ref_grads, dtype, same_dtype_ref_grads=None):
    """fp32: close to the float64 reference. bf16: gradients pass through bf16 logits and bf16
    matmuls, so the bar is PyTorch's own bf16 evaluation of the reference: no more than twice
    its error (plus a bf16 ulp of slack)."""
    for i, (name, g, r) in enumerate(zip(("hidden", "weight", "bias"), grads, ref_grads)):
        scale = r.abs().max().item() + 1e-12
        if dtype == torch.float32:
            torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5 * scale, msg=name)
        else:
            err = (g.double() - r).abs().max().item()
            ref_err = (same_dtype_ref_grads[i].double() - r).abs().max().item()
            assert err <= 2 * ref_err + 8e-3 * scale, f"{name}: max err {err}, torch bf16 err {ref_err}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ["random", "masked", "peaked"])
@pytest.mark.parametrize("chunk", [None, 300])
def test_matches_reference(any_backend, case, dtype, chunk):
    backend, device = any_backend
    n, h, v = 7, 32, 1283
    hidden, weight, bias, labels = make_inputs(n, h, v, dtype, device, case=case)
    g_lp, g_ent = torch.randn(n, device=device), torch.randn(n, device=device)
    kw = dict(temperature=0.8, backend=backend)
    if backend != "torch":
        kw["chunk_size"] = chunk
    lp, ent, grads = run(linear_logprob_entropy, hidden, weight, bias, labels, g_lp, g_ent, **kw)
    rlp, rent, rgrads = ref_run(hidden, weight, bias, labels, g_lp, g_ent, temperature=0.8)
    bf16_grads = run(reference.linear_logprob_entropy, hidden, weight, bias, labels, g_lp, g_ent, temperature=0.8)[2]
    # Logits rounded to bf16 by the matmul, as the reference does; then fp32 accumulation.
    fwd_tol = dict(rtol=2e-5, atol=2e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(lp.double(), rlp, **fwd_tol)
    torch.testing.assert_close(ent.double(), rent, **fwd_tol)
    assert lp[1] == 0
    assert_grads_close(grads, rgrads, dtype, bf16_grads)
    assert all(g.dtype == dtype for g in grads)


def test_bf16_matches_op1_on_bf16_logits(kernel_backend):
    """In bf16 the fused op equals op 1 applied to the bf16 logits an LM head would produce."""
    backend, device = kernel_backend
    hidden, weight, bias, labels = make_inputs(5, 64, 999, torch.bfloat16, device)
    lp, ent = linear_logprob_entropy(hidden, weight, labels, bias=bias, backend=backend, chunk_size=256)
    gd = gemm_dtype(hidden.dtype, hidden.device)  # fp32 on a CPU without a fast bf16 GEMM
    logits = torch.nn.functional.linear(hidden.to(gd), weight.to(gd), bias.to(gd))
    rlp, rent = reference.token_logprob_entropy(logits.double(), labels)
    torch.testing.assert_close(lp.double(), rlp, rtol=2e-5, atol=2e-4)
    torch.testing.assert_close(ent.double(), rent, rtol=2e-5, atol=2e-4)


@contextlib.contextmanager
def mkldnn_enabled(on: bool):
    """torch.backends.mkldnn.flags also resets its TF32 flag (with a warning): only this one."""
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = on
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fp32_gemms_on_a_cpu_without_fast_low_precision_gemms(dtype):
    """Where torch has no fast bf16 / fp16 CPU GEMM (oneDNN off here: the path torch takes on an
    AVX2-only CPU) the head's GEMMs run in fp32: the op equals itself on fp32 copies of the
    inputs, with the gradients cast back to the input dtype."""
    cpu = torch.device("cpu")
    hidden, weight, bias, labels = make_inputs(6, 32, 700, dtype, case="masked")
    g_lp, g_ent = torch.randn(6), torch.randn(6)
    kw = dict(backend="cpu", chunk_size=256, temperature=0.7)
    with mkldnn_enabled(False):
        assert gemm_dtype(dtype, cpu) == torch.float32
        lp, ent, grads = run(linear_logprob_entropy, hidden, weight, bias, labels, g_lp, g_ent, **kw)
        f32 = [t.float() for t in (hidden, weight, bias)]
        lp32, ent32, grads32 = run(linear_logprob_entropy, *f32, labels, g_lp, g_ent, **kw)
    assert torch.equal(lp, lp32) and torch.equal(ent, ent32)
    for name, g, g32 in zip(("hidden", "weight", "bias"), grads, grads32):
        assert g.dtype == dtype and torch.equal(g, g32.to(dtype)), name
    # Elsewhere: the input dtype where torch multiplies it natively, and always on CUDA.
    check = (torch.ops.mkldnn._is_mkldnn_bf16_supported if dtype == torch.bfloat16
             else torch.ops.mkldnn._is_mkldnn_fp16_supported)
    with mkldnn_enabled(True):
        assert gemm_dtype(dtype, cpu) == (dtype if check() else torch.float32)
    assert gemm_dtype(dtype, torch.device("cuda")) == dtype
    assert gemm_dtype(torch.float32, cpu) == torch.float32


@pytest.mark.parametrize("v", [151936, 129920], ids=["V151936", "V129920"])
def test_qwen_vocab_sizes(any_backend, v):
    backend, device = any_backend
    hidden, weight, bias, labels = make_inputs(2, 8, v, torch.float32, device, bias=False)
    weight[-3:] = hidden[0] * 3  # the max sits in the last, partial chunk
    g = torch.randn(2, device=device)
    lp, ent, grads = run(linear_logprob_entropy, hidden, weight, None, labels, g, g, backend=backend)
    rlp, rent, rgrads = ref_run(hidden, weight, None, labels, g, g)
    assert (lp <= 0).all()
    torch.testing.assert_close(lp.double(), rlp, rtol=2e-5, atol=2e-4)
    torch.testing.assert_close(ent.double(), rent, rtol=2e-5, atol=2e-4)
    assert_grads_close(grads, rgrads, torch.float32)


def test_shapes_and_partial_grads(any_backend):
    backend, device = any_backend
    hidden, weight, _, _ = make_inputs(6, 16, 200, device=device)
    h3 = hidden.reshape(2, 3, 16).transpose(0, 1)  # [3, 2, 16], non-contiguous
    y3 = torch.randint(0, 200, (3, 2), device=device)
    lp, ent = linear_logprob_entropy(h3, weight, y3, backend=backend)
    rlp, rent = reference.linear_logprob_entropy(h3.double(), weight.double(), y3)
    assert lp.shape == (3, 2)
    torch.testing.assert_close(lp.double(), rlp, rtol=1e-5, atol=1e-5)
    # Only the weight requires grad (frozen backbone): no hidden gradient is computed.
    w = weight.clone().requires_grad_(True)
    lp, _ = linear_logprob_entropy(hidden, w, torch.randint(0, 200, (6,), device=device), backend=backend)
    lp.sum().backward()
    assert w.grad is not None and w.grad.shape == w.shape
    # Empty batch: outputs empty, weight gradient zero.
    w = weight.clone().requires_grad_(True)
    lp, ent = linear_logprob_entropy(hidden[:0], w, torch.zeros(0, dtype=torch.long, device=device), backend=backend)
    (lp.sum() + ent.sum()).backward()
    assert lp.shape == (0,) and torch.count_nonzero(w.grad) == 0
    # No entropy requested.
    lp, ent = linear_logprob_entropy(hidden, weight, torch.zeros(6, dtype=torch.long, device=device),
                                     compute_entropy=False, backend=backend)
    assert ent is None and lp.shape == (6,)


def test_gradcheck_float64(any_backend):
    backend, device = any_backend
    hidden, weight, bias, labels = make_inputs(3, 5, 13, torch.float64, device)
    labels[1] = -100
    kw = {} if backend == "torch" else {"chunk_size": 4}
    args = tuple(t.clone().requires_grad_(True) for t in (hidden, weight, bias))
    f = lambda h, w, b: linear_logprob_entropy(h, w, labels, bias=b, temperature=0.9, backend=backend, **kw)  # noqa: E731
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7)


def test_opcheck(kernel_backend):
    backend, device = kernel_backend
    hidden, weight, bias, labels = make_inputs(4, 8, 70, torch.float32, device)
    h, w, b = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
    torch.library.opcheck(_fwd, (h, w, b, labels, 1.25, -100, True, 32, backend))
    torch.library.opcheck(_fwd, (h, w, None, labels, 1.0, -100, False, 0, backend))
    stats = _fwd(hidden, weight, bias, labels, 1.25, -100, True, 32, backend)
    torch.library.opcheck(
        _bwd, (torch.randn(3, 4, device=device), hidden, weight, bias, labels, stats, 1.25, -100, True, 32,
               backend, True, True, True))


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_torch_compile(backend, device):
    hidden, weight, bias, labels = make_inputs(6, 16, 300, torch.float32, device)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def loss_fn(h, w, y):
        lp, ent = linear_logprob_entropy(h, w, y, backend=backend)
        return -lp.mean() - 0.01 * ent.mean()

    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss_fn(h, w, labels).backward()
    hr, wr = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    rlp, rent = reference.linear_logprob_entropy(hr, wr, labels)
    (-rlp.mean() - 0.01 * rent.mean()).backward()
    torch.testing.assert_close(h.grad.double(), hr.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), wr.grad, rtol=1e-4, atol=1e-6)


def test_lm_head_module(any_backend):
    backend, device = any_backend
    linear = torch.nn.Linear(16, 100, bias=True, device=device)
    head = LinearLogprobEntropy.from_linear(linear, backend=backend)
    assert head.weight is linear.weight and head.bias is linear.bias
    x = torch.randn(4, 16, device=device)
    torch.testing.assert_close(head(x), linear(x))  # plain logits without labels
    y = torch.randint(0, 100, (4,), device=device)
    lp, ent = head(x, y)
    rlp, rent = reference.token_logprob_entropy(linear(x).double(), y)
    torch.testing.assert_close(lp.double(), rlp, rtol=1e-5, atol=1e-5)


def test_bad_input_errors():
    h, w, b, y = make_inputs(4, 8, 50)
    with pytest.raises(ValueError, match="hidden's last dim must equal weight's H = 8"):
        linear_logprob_entropy(h[:, :7], w, y)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        linear_logprob_entropy(h, w[0], y)
    with pytest.raises(TypeError, match="weight dtype torch.float64 must equal hidden dtype torch.float32"):
        linear_logprob_entropy(h, w.double(), y)
    with pytest.raises(ValueError, match=r"bias must have shape \[50\]"):
        linear_logprob_entropy(h, w, y, bias=b[:49])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 50\)"):
        linear_logprob_entropy(h, w, torch.tensor([0, 1, 50, 2]))
    with pytest.raises(TypeError, match="labels must have dtype"):
        linear_logprob_entropy(h, w, y.float())
    with pytest.raises(ValueError, match="weight is on meta but hidden is on cpu"):
        linear_logprob_entropy(h, w.to("meta"), y)
    with pytest.raises(ValueError, match="weight must be a non-empty .*ZeRO-3"):
        linear_logprob_entropy(h, torch.empty(0, 8), y)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        linear_logprob_entropy(h, w, y, chunk_size=0)
