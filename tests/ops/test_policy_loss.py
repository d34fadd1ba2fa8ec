"""policy_loss: every backend against the float64 reference (loss, metrics, gradient), the clip
boundary ties, the aggregation modes, gradcheck, opcheck, torch.compile, errors, and the
composition with linear_logprob_entropy."""
import json
import math

import numpy as np
import pytest
import torch

from axpo.ops import linear_logprob_entropy
from axpo.ops import reference_policy_loss as R
from axpo.ops.policy_loss import _bwd, _fwd, _prepare, policy_loss
from tests.conftest import KERNEL_BACKENDS
from tests._bench import bench_module

AGGS = R.AGG_MODES


def make_inputs(B=4, T=50, *, adv_dim=1, device="cpu", dtype=torch.float32, empty_row=True,
                with_ref=False):
    """Random inputs with ratios spread over both clip sides (|logp - old| up to ~0.6)."""
    lp = (torch.rand(B, T, dtype=torch.float64) * -3 - 0.05)
    old = lp + torch.randn(B, T, dtype=torch.float64) * 0.3
    adv = torch.randn(B, dtype=torch.float64) if adv_dim == 1 else torch.randn(B, T, dtype=torch.float64)
    if adv_dim == 1 and B > 2:  # both signs among the non-empty rows
        adv[0], adv[2] = adv[0].abs() + 0.1, -adv[2].abs() - 0.1
    mask = torch.rand(B, T) < 0.8
    if empty_row and B > 1:
        mask[1] = False
    mask[0, :3] = True
    ref = lp + torch.randn(B, T, dtype=torch.float64) * 0.2 if with_ref else None
    out = dict(logprobs=lp.to(dtype), old_logprobs=old.float(), advantages=adv.float(), mask=mask,
               ref_logprobs=None if ref is None else ref.float())
    return {k: (v.to(device) if v is not None else None) for k, v in out.items()}


def run(fn, inputs, **kw):
    """(loss, metrics, grad) of fn on a fresh leaf copy of logprobs."""
    x = inputs["logprobs"].detach().clone().requires_grad_(True)
    args = {**inputs, "logprobs": x}
    loss, metrics = fn(args.pop("logprobs"), args.pop("old_logprobs"), args.pop("advantages"),
                       args.pop("mask"), **args, **kw)
    (g,) = torch.autograd.grad(loss, x, allow_unused=True)
    return loss, metrics, (torch.zeros_like(x) if g is None else g)


def ref64(inputs, **kw):
    """The reference evaluated in float64 on the same (upcast) values."""
    i64 = {k: (v.double() if (v is not None and v.dtype.is_floating_point and k != "mask") else v)
           for k, v in inputs.items()}
    return run(R.policy_loss, i64, **kw)


def check(backend, inputs, *, loss_tol=None, grad_tol=None, **kw):
    loss, metrics, g = run(policy_loss, inputs, backend=backend, **kw)
    rloss, rmetrics, rg = ref64(inputs, **kw)
    lp_dtype = inputs["logprobs"].dtype
    exp_dtype = torch.float64 if lp_dtype == torch.float64 else torch.float32
    assert loss.dtype == exp_dtype and loss.dim() == 0
    assert g.dtype == lp_dtype and g.shape == inputs["logprobs"].shape
    assert sorted(metrics) == sorted(rmetrics)
    for k, v in metrics.items():
        assert v.dtype == torch.float32 and v.dim() == 0, k
        torch.testing.assert_close(v.double(), rmetrics[k].double(), rtol=1e-5, atol=1e-6, msg=k)
    torch.testing.assert_close(loss.double(), rloss, **(loss_tol or dict(rtol=1e-5, atol=1e-6)))
    scale = float(rg.abs().max()) or 1.0
    torch.testing.assert_close(g.double(), rg, **(grad_tol or dict(rtol=1e-5, atol=1e-6 * scale)))
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    return loss, metrics, g


# --------------------------------------------------------------------------------------------
# random inputs, every aggregation / option
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("dual", [False, True], ids=["nodual", "dual"])
@pytest.mark.parametrize("adv_dim", [1, 2], ids=["advB", "advBT"])
def test_matches_reference(any_backend, agg, dual, adv_dim):
    backend, device = any_backend
    inputs = make_inputs(adv_dim=adv_dim, device=device, with_ref=dual)
    kw = dict(agg=agg, clip_ratio_c=1.5 if dual else None)
    if dual:  # with a KL penalty too
        kw.update(kl_coef=0.05, kl_estimator="k3")
    _, metrics, _ = check(backend, inputs, **kw)
    # the inputs do exercise the clipping
    assert metrics["clipfrac_low"] > 0 and metrics["clipfrac_high"] > 0
    if dual:
        assert metrics["clipfrac_dual"] > 0
    else:
        assert metrics["clipfrac_dual"] == 0


@pytest.mark.parametrize("kl_estimator", R.KL_ESTIMATORS)
@pytest.mark.parametrize("kl_coef", [0.0, 0.3])
def test_kl_estimators(any_backend, kl_estimator, kl_coef):
    backend, device = any_backend
    inputs = make_inputs(device=device, with_ref=True)
    _, metrics, _ = check(backend, inputs, kl_coef=kl_coef, kl_estimator=kl_estimator,
                          agg="seq-mean-token-mean")
    assert "kl_mean" in metrics and metrics["kl_mean"] != 0
    # without ref: no KL metric, and the loss equals kl_coef = 0 with ref
    no_ref = {**inputs, "ref_logprobs": None}
    loss0, metrics0, g0 = check(backend, no_ref, kl_estimator=kl_estimator, agg="seq-mean-token-mean")
    assert "kl_mean" not in metrics0
    if kl_coef == 0:
        loss1, _, g1 = run(policy_loss, inputs, backend=backend, kl_estimator=kl_estimator,
                           agg="seq-mean-token-mean")
        assert torch.equal(loss0, loss1) and torch.equal(g0, g1)


def test_kl_only_changes_loss_by_kl_coef_times_agg_kl(any_backend):
    backend, device = any_backend
    inputs = make_inputs(device=device, with_ref=True)
    l0, _, _ = run(policy_loss, {**inputs, "ref_logprobs": None}, backend=backend)
    l1, m1, _ = run(policy_loss, inputs, backend=backend, kl_coef=0.5, kl_estimator="k2")
    torch.testing.assert_close(l1, l0 + 0.5 * m1["kl_mean"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_tokens", [37, 1000.0, "tensor"])
def test_num_tokens(any_backend, num_tokens):
    backend, device = any_backend
    inputs = make_inputs(device=device)
    n = torch.tensor(523.0, device=device) if num_tokens == "tensor" else num_tokens
    check(backend, inputs, num_tokens=n)
    # token-mean with num_tokens = the local count equals plain token-mean
    local = int(inputs["mask"].sum())
    la, _, ga = run(policy_loss, inputs, backend=backend, num_tokens=local)
    lb, _, gb = run(policy_loss, inputs, backend=backend)
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("agg", AGGS[1:])
@pytest.mark.parametrize("num_seqs", [None, 3, 40.0, "tensor"])
def test_num_seqs_and_norm_tokens(any_backend, agg, num_seqs):
    """The seq-means over a global sequence count (and Dr.GRPO's constant length L): the same
    numbers as the reference, and exactly (B / num_seqs) * (T / L) times the local values."""
    backend, device = any_backend
    inputs = make_inputs(device=device)
    B, T = inputs["logprobs"].shape
    n = torch.tensor(7.0, device=device) if num_seqs == "tensor" else num_seqs
    norm = {"norm_tokens": 256} if agg == "seq-mean-token-sum-norm" else {}
    loss, _, g = check(backend, inputs, agg=agg, num_seqs=n, **norm)
    l0, _, g0 = run(policy_loss, inputs, backend=backend, agg=agg)
    factor = (B / float(n if n is not None else B)) * (T / 256 if norm else 1.0)
    torch.testing.assert_close(loss, l0 * factor, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g, g0 * factor, rtol=1e-5, atol=1e-9)


# --------------------------------------------------------------------------------------------
# edge cases
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("agg", AGGS)
def test_all_masked_batch_is_zero_not_nan(any_backend, agg):
    backend, device = any_backend
    inputs = make_inputs(device=device, with_ref=True)
    inputs["mask"] = torch.zeros_like(inputs["mask"])
    loss, metrics, g = check(backend, inputs, agg=agg, clip_ratio_c=3.0, kl_coef=0.1)
    assert loss.item() == 0.0 and (g == 0).all()
    assert all(v.item() == 0.0 for v in metrics.values())


@pytest.mark.parametrize("agg", AGGS)
def test_empty_rows(any_backend, agg):
    """Empty rows contribute 0 and no NaN, in the loss and in the gradient of the other rows."""
    backend, device = any_backend
    inputs = make_inputs(B=5, T=40, device=device, empty_row=False)
    inputs["mask"][1] = False
    inputs["mask"][3] = False
    loss, _, g = check(backend, inputs, agg=agg)
    assert (g[1] == 0).all() and (g[3] == 0).all() and (g[0] != 0).any()
    if agg == "seq-mean-token-mean":  # the empty rows still count in the B of the mean
        full, _, _ = run(policy_loss, {k: (v[[0, 2, 4]] if v is not None else v) for k, v in inputs.items()},
                         backend=backend, agg=agg)
        torch.testing.assert_close(loss, full * 3 / 5, rtol=1e-5, atol=1e-7)


def test_masked_out_garbage_is_ignored(kernel_backend):
    """NaN / inf at masked-out positions (padding) changes nothing in the fused kernels (the eager
    reference's gradient would still see 0 * NaN through autograd of torch.where)."""
    backend, device = kernel_backend
    inputs = make_inputs(device=device, with_ref=True)
    dirty = {k: (v.clone() if v is not None else v) for k, v in inputs.items()}
    pad = ~dirty["mask"]
    dirty["logprobs"][pad] = float("nan")
    dirty["old_logprobs"][pad] = float("inf")
    dirty["ref_logprobs"][pad] = float("-inf")
    kw = dict(clip_ratio_c=3.0, kl_coef=0.1, agg="seq-mean-token-mean")
    la, ma, ga = run(policy_loss, inputs, backend=backend, **kw)
    lb, mb, gb = run(policy_loss, dirty, backend=backend, **kw)
    assert torch.equal(la, lb) and torch.equal(ga, gb)
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k


def _exact_exp_point(target_fn, candidates):
    """A float64 d with exp(d) identical in torch, libm (the C++ kernel) and numpy (the Triton
    interpreter), and target_fn(r) (the clip constant derived from r) round-tripping to r."""
    for d in candidates:
        r = torch.exp(torch.tensor([d], dtype=torch.float64))[0].item()
        if r == math.exp(d) == float(np.exp(np.float64(d))) and target_fn(r):
            return d, r
    raise AssertionError("no exactly representable boundary point found")


def _tie_inputs(device, dtype):
    """Tokens exactly on every boundary: ratio == 1 - clip_low, 1 + clip_high, clip_ratio_c,
    logp - old == +-20, and around them; advantages of both signs and 0."""
    d_lo, r_lo = _exact_exp_point(lambda r: 1 - (1 - r) == r, np.linspace(-0.3, -0.1, 41))
    d_hi, r_hi = _exact_exp_point(lambda r: 1 + (r - 1) == r, np.linspace(0.1, 0.3, 41))
    d_c, r_c = _exact_exp_point(lambda r: r > 1.5, np.linspace(0.5, 1.2, 41))
    ds = [d_lo, d_hi, d_c, 20.0, -20.0, 0.0,
          d_lo - 1e-9, d_lo + 1e-9, d_hi - 1e-9, d_hi + 1e-9, d_c - 1e-9, d_c + 1e-9, 20.5, -21.0,
          math.log(r_lo) - 1e-3, math.log(r_hi) + 1e-3]
    advs = [1.5, -1.5, 0.0, 0.7, -2.25]
    lp = torch.tensor([ds for _ in advs], dtype=torch.float64)
    old = torch.zeros_like(lp)
    adv = torch.tensor(advs, dtype=torch.float64)
    mask = torch.ones_like(lp, dtype=torch.bool)
    clip_low, clip_high, c = 1 - r_lo, r_hi - 1, r_c
    inputs = dict(logprobs=lp.to(dtype).to(device), old_logprobs=old.to(dtype).to(device),
                  advantages=adv.to(dtype).to(device), mask=mask.to(device), ref_logprobs=None)
    return inputs, dict(clip_low=clip_low, clip_high=clip_high, clip_ratio_c=c)


@pytest.mark.parametrize("dual", [False, True], ids=["nodual", "dual"])
def test_ties_at_clip_boundaries_float64(any_backend, dual):
    """Exact ties: the gradient must be autograd's (clamp inclusive, max / min halves)."""
    backend, device = any_backend
    inputs, clips = _tie_inputs(device, torch.float64)
    if not dual:
        clips["clip_ratio_c"] = None
    loss, metrics, g = run(policy_loss, inputs, backend=backend, agg="seq-mean-token-sum", **clips)
    rloss, rmetrics, rg = ref64(inputs, agg="seq-mean-token-sum", **clips)
    torch.testing.assert_close(loss, rloss, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(g, rg, rtol=1e-13, atol=1e-15)
    for k in rmetrics:
        assert metrics[k].item() == rmetrics[k].item(), k
    # the ties are there: the reference's gradient at ratio == lo with A < 0 is the half-sum,
    # i.e. the same as the unclipped branch (both branches pass through the inclusive clamp)
    x = inputs["logprobs"][1, 0] - inputs["old_logprobs"][1, 0]
    assert torch.exp(x).item() == 1 - clips["clip_low"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_exact_ties_low_precision(any_backend, dtype):
    """Ties that are exact in any precision: ratio == 1 with clip_low = 0 / clip_high = 0, and
    logp - old == +-20 (the clamp's ends)."""
    backend, device = any_backend
    ds = torch.tensor([0.0, 0.0, 20.0, -20.0, 0.0, 0.5, -0.5, 20.0], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.0, 1.0, -1.0, -2.0], dtype=torch.float64)
    lp = (ds - 1.0).reshape(2, 4)
    old = torch.full_like(lp, -1.0)
    inputs = dict(logprobs=lp.to(dtype).to(device), old_logprobs=old.float().to(device),
                  advantages=adv.reshape(2, 4).float().to(device),
                  mask=torch.ones(2, 4, dtype=torch.bool, device=device), ref_logprobs=None)
    for cl, ch in [(0.0, 0.28), (0.2, 0.0), (0.0, 0.0)]:
        loss, metrics, g = run(policy_loss, inputs, backend=backend, clip_low=cl, clip_high=ch,
                               clip_ratio_c=3.0, agg="seq-mean-token-sum")
        rloss, rmetrics, rg = ref64(inputs, clip_low=cl, clip_high=ch, clip_ratio_c=3.0,
                                    agg="seq-mean-token-sum")
        torch.testing.assert_close(loss.double(), rloss, rtol=1e-6, atol=1e-6)
        tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(g.double(), rg, **tol)
        for k in rmetrics:
            if k.startswith("clipfrac"):  # the tie decisions, exactly
                assert metrics[k].item() == rmetrics[k].item(), (cl, ch, k)
            else:
                torch.testing.assert_close(metrics[k].double(), rmetrics[k].double(), rtol=1e-6, atol=1e-6)


def test_near_boundaries_fp32(any_backend):
    """Ratios just inside / outside the clip range (1e-4 relative: no fp32 / fp64 disagreement)."""
    backend, device = any_backend
    r = torch.tensor([0.8, 1.28], dtype=torch.float64)
    rel = torch.tensor([-1e-4, -3e-5, 3e-5, 1e-4], dtype=torch.float64)
    ratios = (r[:, None] * (1 + rel[None, :])).reshape(-1)
    adv = torch.tensor([1.0, -1.0, 0.3, -0.3], dtype=torch.float64)
    lp = torch.log(ratios)[None, :].repeat(4, 1) - 1.0
    old = torch.full_like(lp, -1.0)
    inputs = dict(logprobs=lp.float().to(device), old_logprobs=old.float().to(device),
                  advantages=adv.float().to(device),
                  mask=torch.ones_like(lp, dtype=torch.bool, device=device), ref_logprobs=None)
    _, metrics, _ = check(backend, inputs, clip_ratio_c=1.1)
    assert 0 < metrics["clipfrac_low"] < 1 and 0 < metrics["clipfrac_high"] < 1


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32, torch.int64, torch.uint8, torch.bfloat16])
def test_mask_dtypes(any_backend, mask_dtype):
    backend, device = any_backend
    inputs = make_inputs(device=device)
    inputs["mask"] = inputs["mask"].to(mask_dtype)
    check(backend, inputs, agg="seq-mean-token-mean", clip_ratio_c=2.0)


def test_bf16_logprobs(any_backend):
    backend, device = any_backend
    inputs = make_inputs(device=device, dtype=torch.bfloat16, with_ref=True)
    inputs["old_logprobs"] = inputs["old_logprobs"].bfloat16()  # mixed dtypes are fine too
    check(backend, inputs, clip_ratio_c=3.0, kl_coef=0.1, agg="seq-mean-token-mean",
          grad_tol=dict(rtol=1e-2, atol=1e-4))


def test_non_contiguous_inputs(any_backend):
    backend, device = any_backend
    B, T = 4, 40
    base = make_inputs(B=B, T=T, adv_dim=2, device=device, with_ref=True)
    # transposed storage for every [B, T] input, a strided view for the mask, [B] advantages sliced
    nc = {}
    for k in ("logprobs", "old_logprobs", "ref_logprobs", "advantages"):
        nc[k] = base[k].t().contiguous().t()
        assert not nc[k].is_contiguous()
    big_mask = torch.zeros(B, 2 * T, dtype=torch.bool, device=device)
    big_mask[:, ::2] = base["mask"]
    nc["mask"] = big_mask[:, ::2]
    assert not nc["mask"].is_contiguous()
    kw = dict(clip_ratio_c=3.0, kl_coef=0.2, kl_estimator="k2", agg="token-mean")
    check(backend, nc, **kw)
    la, ma, ga = run(policy_loss, nc, backend=backend, **kw)
    lb, mb, gb = run(policy_loss, base, backend=backend, **kw)
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-9)
    adv_b = torch.randn(2 * B, device=device)[::2]
    check(backend, {**base, "advantages": adv_b}, **kw)


def test_large_log_ratio_and_k3_overflow(any_backend):
    """|logp - old| > 20 (the clamp) and a k3 that overflows fp32 stay consistent with the reference."""
    backend, device = any_backend
    inputs = make_inputs(B=2, T=20, device=device, with_ref=True, empty_row=False)
    inputs["old_logprobs"][0, :4] = inputs["logprobs"][0, :4] + torch.tensor([25.0, -25.0, 20.0, -19.0], device=device)
    check(backend, inputs, clip_ratio_c=3.0)
    # k3 metric only (kl_coef = 0): an exp overflow in kl never reaches the gradient
    inputs["ref_logprobs"][1, 0] = inputs["logprobs"][1, 0] + 95.0
    loss, metrics, g = run(policy_loss, inputs, backend=backend, kl_estimator="k3")
    assert math.isinf(metrics["kl_mean"].item()) and torch.isfinite(loss) and torch.isfinite(g).all()


def test_k3_ratio_is_k3_weighted_by_the_clamped_ratio(any_backend):
    """k3_ratio = k3 * ratio (TRL's use_bias_correction_kl), in the loss with its gradient through
    the ratio (which stops outside the [-20, 20] log-ratio clamp)."""
    backend, device = any_backend
    inputs = make_inputs(B=2, T=20, device=device, with_ref=True, empty_row=False)
    inputs["old_logprobs"][0, :3] = inputs["logprobs"][0, :3] + torch.tensor([25.0, -21.0, 0.5], device=device)
    _, m_ratio, _ = check(backend, inputs, kl_coef=0.3, kl_estimator="k3_ratio")
    lp, old, ref, mask = (inputs[k].double() for k in ("logprobs", "old_logprobs", "ref_logprobs", "mask"))
    ratio = torch.exp((lp - old).clamp(-20, 20))
    k3 = torch.exp(ref - lp) - (ref - lp) - 1
    expected = ((k3 * ratio) * mask).sum() / mask.sum()
    torch.testing.assert_close(m_ratio["kl_mean"].double(), expected, rtol=1e-5, atol=1e-7)
    _, m_plain, _ = run(policy_loss, inputs, backend=backend, kl_coef=0.3, kl_estimator="k3")
    assert abs(m_plain["kl_mean"] - m_ratio["kl_mean"]) > 1e-3  # the weighting matters here


# --------------------------------------------------------------------------------------------
# rollout-mismatch correction
# --------------------------------------------------------------------------------------------
def _with_rollout(inputs, scale=0.5, seed=0):
    """rollout log-probs off the old ones by up to a few nats, so that tis truncates some tokens
    and seq_mask drops some rows but not all."""
    g = torch.Generator().manual_seed(seed)
    old = inputs["old_logprobs"]
    noise = torch.randn(old.shape, generator=g, dtype=torch.float64).to(old) * scale
    noise[0, :3] = torch.tensor([-2.0, 1.5, -0.01]).to(old)  # exp(2) > cap: truncated
    roll = old + noise
    if old.shape[0] > 3:
        roll[3] = old[3] + 0.01  # a row within [1 / cap, cap] ...
        roll[2] = old[2] - 0.2   # ... and one far outside it
    return {**inputs, "rollout_logprobs": roll}


@pytest.mark.parametrize("mode", [None, "tis", "seq_mask"])
@pytest.mark.parametrize("adv_dim", [1, 2], ids=["advB", "advBT"])
def test_rollout_correction_matches_reference(any_backend, mode, adv_dim):
    backend, device = any_backend
    inputs = _with_rollout(make_inputs(B=6, T=40, adv_dim=adv_dim, device=device, with_ref=True))
    kw = dict(rollout_correction=mode, rollout_cap=2.0, clip_ratio_c=3.0, kl_coef=0.1, kl_estimator="k3")
    loss, metrics, g = check(backend, inputs, **kw)
    assert {"rollout_weight_mean", "rollout_corrected_frac", "rollout_kl"} <= set(metrics)
    if mode is None:  # metrics only: the loss and gradient are the uncorrected ones
        plain = run(policy_loss, {k: v for k, v in inputs.items() if k != "rollout_logprobs"}, backend=backend,
                    **{k: v for k, v in kw.items() if not k.startswith("rollout")})
        torch.testing.assert_close(loss, plain[0])
        torch.testing.assert_close(g, plain[2])
        assert abs(metrics["rollout_weight_mean"] - 1) < 1e-6 and metrics["rollout_corrected_frac"] == 0
    else:  # the correction bites, but not everywhere
        assert 0 < metrics["rollout_corrected_frac"] < 1
    lr = (inputs["old_logprobs"] - inputs["rollout_logprobs"]).double()
    m = inputs["mask"]
    torch.testing.assert_close(metrics["rollout_kl"].double(), (-lr[m]).mean(), rtol=1e-5, atol=1e-6)


def test_seq_mask_drops_whole_rows_and_keeps_the_counts(any_backend):
    """A dropped sequence contributes no pg term and no gradient, and still counts in the
    token-mean denominator (as TRL's sequence mask); the KL term is not weighted."""
    backend, device = any_backend
    inputs = _with_rollout(make_inputs(B=6, T=40, device=device))
    roll = inputs["rollout_logprobs"]
    kept_rows = ((inputs["old_logprobs"] - roll).double() * inputs["mask"]).sum(-1).abs() <= math.log(2.0)
    assert kept_rows.any() and not kept_rows.all()
    loss, _, g = run(policy_loss, inputs, backend=backend, rollout_correction="seq_mask")
    assert (g[~kept_rows] == 0).all() and g[kept_rows].abs().sum() > 0
    full, _, _ = run(policy_loss, {k: v for k, v in inputs.items() if k != "rollout_logprobs"}, backend=backend,
                     agg="token-mean", num_tokens=int(inputs["mask"].sum()))
    only_kept = {k: v for k, v in inputs.items() if k != "rollout_logprobs"}
    only_kept["mask"] = inputs["mask"] & kept_rows[:, None].to(device)
    kept, _, _ = run(policy_loss, only_kept, backend=backend, num_tokens=int(inputs["mask"].sum()))
    torch.testing.assert_close(loss, kept, rtol=1e-6, atol=1e-7)
    assert not torch.isclose(loss, full)


def test_rollout_correction_errors():
    inputs = make_inputs()
    with pytest.raises(ValueError, match="rollout_correction='tis' needs rollout_logprobs"):
        run(policy_loss, inputs, rollout_correction="tis")
    with pytest.raises(ValueError, match="rollout_correction must be None or one of"):
        run(policy_loss, _with_rollout(inputs), rollout_correction="is")
    with pytest.raises(ValueError, match="rollout_cap must be > 1"):
        run(policy_loss, _with_rollout(inputs), rollout_correction="seq_mask", rollout_cap=0.5)
    with pytest.raises(ValueError, match="rollout_logprobs must have"):
        run(policy_loss, {**inputs, "rollout_logprobs": inputs["old_logprobs"][:, :3]})


@pytest.mark.parametrize("mode", ["tis", "seq_mask"])
def test_rollout_correction_gradcheck_float64(any_backend, mode):
    backend, device = any_backend
    inputs = _with_rollout(make_inputs(B=4, T=9, device=device, with_ref=True))
    old, adv, ref, roll = (inputs[k].double() for k in ("old_logprobs", "advantages", "ref_logprobs",
                                                         "rollout_logprobs"))
    x = inputs["logprobs"].double().clone().requires_grad_(True)

    def f(lp):
        return policy_loss(lp, old, adv, inputs["mask"], ref_logprobs=ref, kl_coef=0.2, rollout_logprobs=roll,
                           rollout_correction=mode, backend=backend)[0]

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-8)


# --------------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kl_estimator", ["k3", "k3_ratio"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_gradcheck_float64(any_backend, agg, kl_estimator):
    backend, device = any_backend
    inputs = make_inputs(B=3, T=9, device=device, with_ref=True)
    old = inputs["old_logprobs"].double()
    adv = inputs["advantages"].double()
    ref = inputs["ref_logprobs"].double()
    x = inputs["logprobs"].double().clone().requires_grad_(True)

    def f(lp):
        return policy_loss(lp, old, adv, inputs["mask"], clip_ratio_c=2.0, ref_logprobs=ref,
                           kl_coef=0.3, kl_estimator=kl_estimator, agg=agg, backend=backend)[0]

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-8)


def _op_args(backend, device):
    inputs = make_inputs(B=3, T=70, adv_dim=1, device=device, with_ref=True)
    roll = inputs["old_logprobs"] + 0.3 * torch.randn_like(inputs["old_logprobs"])
    return _prepare(backend, inputs["logprobs"], inputs["old_logprobs"], inputs["advantages"], inputs["mask"],
                    inputs["ref_logprobs"], roll)


def test_opcheck(kernel_backend):
    backend, device = kernel_backend
    lp, old, adv, m, ref, roll = _op_args(backend, device)
    lpg = lp.clone().requires_grad_(True)
    torch.library.opcheck(_fwd, (lpg, old, adv, m, ref, roll, 0.8, 1.28, 3.0, 3, True, 2, 2.0, backend))
    torch.library.opcheck(_fwd, (lpg, old, adv, m, None, None, 0.8, 1.28, 0.0, 0, False, 0, 2.0, backend))
    g = torch.randn(2, lp.shape[0], device=device)
    torch.library.opcheck(_bwd, (g, lp, old, adv, m, ref, roll, 0.8, 1.28, 3.0, 2, 2, 2.0, backend))
    torch.library.opcheck(_bwd, (g, lp, old, adv, m, None, None, 0.8, 1.28, 0.0, 0, 0, 2.0, backend))


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_torch_compile(backend, device):
    inputs = make_inputs(device=device, with_ref=True)
    kw = dict(clip_ratio_c=3.0, kl_coef=0.1, agg="seq-mean-token-mean")

    @torch.compile(fullgraph=True, backend="aot_eager")
    def loss_fn(lp, old, adv, mask, ref):
        loss, metrics = policy_loss(lp, old, adv, mask, ref_logprobs=ref, backend=backend, **kw)
        return loss, metrics["clipfrac"], metrics["kl_mean"]

    x = inputs["logprobs"].clone().requires_grad_(True)
    loss, clipfrac, kl_mean = loss_fn(x, inputs["old_logprobs"], inputs["advantages"],
                                      inputs["mask"], inputs["ref_logprobs"])
    loss.backward()
    rloss, rmetrics, rg = ref64(inputs, **kw)
    torch.testing.assert_close(loss.double(), rloss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), rg, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(clipfrac.double(), rmetrics["clipfrac"].double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kl_mean.double(), rmetrics["kl_mean"].double(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------
def _bad_cases():
    B, T = 3, 5
    lp, old, adv, mask = torch.randn(B, T), torch.randn(B, T), torch.randn(B), torch.ones(B, T, dtype=torch.bool)
    ok = dict(logprobs=lp, old_logprobs=old, advantages=adv, mask=mask)
    return [
        (dict(logprobs=lp.numpy()), TypeError, "logprobs must be a torch.Tensor"),
        (dict(logprobs=lp.long()), TypeError, "logprobs must have dtype"),
        (dict(logprobs=lp[0]), ValueError, "logprobs must be 2-D"),
        (dict(logprobs=torch.randn(0, 5)), ValueError, "logprobs must be a non-empty"),
        (dict(old_logprobs=old[:, :4]), ValueError, r"old_logprobs must have logprobs' shape \(3, 5\)"),
        (dict(old_logprobs=old.int()), TypeError, "old_logprobs must have dtype"),
        (dict(advantages=torch.randn(5)), ValueError, r"advantages must have shape \[B\]"),
        (dict(advantages=torch.randn(B, T + 1)), ValueError, "advantages must have shape"),
        (dict(mask=mask[:2]), ValueError, "mask must have logprobs' shape"),
        (dict(mask=torch.full((B, T), 2.0)), ValueError, r"mask must hold only 0 and 1.*mask\[0, 0\] = 2"),
        (dict(mask=mask.to("meta")), ValueError, "mask is on meta but logprobs is on cpu"),
        (dict(ref_logprobs=torch.randn(B, 4)), ValueError, "ref_logprobs must have logprobs' shape"),
        (dict(clip_low=-0.1), ValueError, "clip_low must be in"),
        (dict(clip_low=float("nan")), ValueError, "clip_low must be a finite number"),
        (dict(clip_high=-0.1), ValueError, "clip_high must be >= 0"),
        (dict(clip_ratio_c=1.0), ValueError, "clip_ratio_c .* must be > 1"),
        (dict(clip_ratio_c="3"), ValueError, "clip_ratio_c must be a finite number"),
        (dict(kl_estimator="k4"), ValueError, "kl_estimator must be one of"),
        (dict(kl_coef=0.1), ValueError, "kl_coef = 0.1 needs ref_logprobs"),
        (dict(agg="mean"), ValueError, "agg must be one of"),
        (dict(num_tokens=0), ValueError, "num_tokens must be > 0"),
        (dict(num_tokens=10, agg="seq-mean-token-sum"), ValueError, "num_tokens is only used with agg='token-mean'"),
        (dict(num_tokens=torch.ones(2)), ValueError, "num_tokens must be a number or a one-element tensor"),
        (dict(num_seqs=4), ValueError, "num_seqs is only used with agg='seq-mean-token-mean' or"),
        (dict(num_seqs=0, agg="seq-mean-token-mean"), ValueError, "num_seqs must be > 0"),
        (dict(num_seqs=torch.ones(3), agg="seq-mean-token-sum"), ValueError, "num_seqs must be a number or a one-"),
        (dict(norm_tokens=64, agg="seq-mean-token-sum"), ValueError, "norm_tokens is only used with agg='seq-mean-token-sum-norm'"),
        (dict(norm_tokens=-1.0, agg="seq-mean-token-sum-norm"), ValueError, "norm_tokens must be > 0"),
        (dict(backend="mkl"), ValueError, "backend must be one of"),
    ], ok


@pytest.mark.parametrize("i", range(len(_bad_cases()[0])))
def test_bad_input_errors(i):
    cases, ok = _bad_cases()
    override, exc, match = cases[i]
    args = {**ok, **override}
    with pytest.raises(exc, match=match):
        policy_loss(args.pop("logprobs"), args.pop("old_logprobs"), args.pop("advantages"),
                    args.pop("mask"), **args)


# --------------------------------------------------------------------------------------------
# composition: hidden states -> log-probs (+ entropy) -> policy loss, no [N, V] tensor
# --------------------------------------------------------------------------------------------
def test_composition_with_linear_logprob_entropy(kernel_backend):
    backend, device = kernel_backend
    B, T, H, V = 3, 12, 32, 300
    hidden = torch.randn(B, T, H, dtype=torch.float64) * 0.5
    weight = torch.randn(V, H, dtype=torch.float64) / math.sqrt(H) * 2
    labels = torch.randint(0, V, (B, T))
    mask = torch.rand(B, T) < 0.85
    mask[2, :] = False
    mask[0, 0] = True
    labels[~mask] = -100
    with torch.no_grad():  # old / ref policies: the current one, perturbed
        lp0 = torch.log_softmax(hidden @ weight.T, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    old = lp0 + torch.randn(B, T, dtype=torch.float64) * 0.3
    ref = lp0 + torch.randn(B, T, dtype=torch.float64) * 0.2
    adv = torch.randn(B, dtype=torch.float64)
    kw = dict(clip_ratio_c=3.0, kl_coef=0.05, kl_estimator="k3", agg="seq-mean-token-mean")

    def fused(h, w):
        lp, ent = linear_logprob_entropy(h, w, labels.to(device), backend=backend, chunk_size=128)
        loss, metrics = policy_loss(lp, old.float().to(device), adv.float().to(device), mask.to(device),
                                    ref_logprobs=ref.float().to(device), backend=backend, **kw)
        return loss, metrics, ent

    h = hidden.float().to(device).requires_grad_(True)
    w = weight.float().to(device).requires_grad_(True)
    loss, metrics, ent = fused(h, w)
    loss.backward()

    # float64 reference of the unfused computation: materialized logits
    hr, wr = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logits = hr @ wr.T
    logp_all = torch.log_softmax(logits, -1)
    lpr = torch.where(mask, logp_all.gather(-1, labels.clamp(min=0)[..., None])[..., 0], 0.0)
    entr = -(logp_all.exp() * logp_all).sum(-1)
    rloss, rmetrics = R.policy_loss(lpr, old, adv, mask, ref_logprobs=ref, **kw)
    rloss.backward()
    torch.testing.assert_close(loss.double().cpu(), rloss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ent.double().cpu(), entr.detach(), rtol=1e-5, atol=1e-5)
    for k in rmetrics:
        torch.testing.assert_close(metrics[k].double().cpu(), rmetrics[k].double(), rtol=1e-5, atol=1e-6)
    gscale_h, gscale_w = float(hr.grad.abs().max()), float(wr.grad.abs().max())
    assert gscale_h > 0 and gscale_w > 0
    torch.testing.assert_close(h.grad.double().cpu(), hr.grad, rtol=1e-4, atol=1e-5 * gscale_h)
    torch.testing.assert_close(w.grad.double().cpu(), wr.grad, rtol=1e-4, atol=1e-5 * gscale_w)


# --------------------------------------------------------------------------------------------
# benchmark smoke test
# --------------------------------------------------------------------------------------------
def test_bench_smoke(tmp_path, capsys):
    bench = bench_module("bench_policy_loss")
    rc = bench.main(["--device", "cpu", "--b", "4", "--t", "256", "--comp-n", "64", "--comp-h", "32",
                     "--comp-v", "500", "--repeats", "1", "--warmup", "1", "--out", str(tmp_path),
                     "--no-plot"])
    assert rc == 0
    js, md = tmp_path / "policy_loss_cpu.json", tmp_path / "policy_loss_cpu.md"
    assert js.is_file() and md.is_file()
    data = json.loads(js.read_text())
    rows = data["rows"]
    for op in ("policy_loss", "composition"):
        timed = [r for r in rows if r["op"] == op and r["median_ms"] is not None]
        assert any(r["impl"] == "reference" for r in timed), op
        assert any(r["impl"].startswith("axpo:") for r in timed), op
    for r in rows:
        assert r["status"] in ("ok", "skipped"), (r["impl"], r["op"], r["status"], r.get("reason"))
        if r["median_ms"] is not None:
            assert r["correct"] is True, (r["impl"], r["op"], r.get("reason"))
    assert "| reference |" in md.read_text()
