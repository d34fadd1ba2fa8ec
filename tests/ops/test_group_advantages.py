"""group_advantages: every backend against the float64 reference, edge cases, verl's formula."""
from __future__ import annotations

import json
from collections import defaultdict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from axpo.ops import reference_group_advantages as reference
from axpo.ops.group_advantages import _op, group_advantages
from tests.conftest import KERNEL_BACKENDS
from tests._bench import bench_module

I64_MIN, I64_MAX = -(2**63), 2**63 - 1
# -1 is the empty-key bit pattern of the CUDA hash table; the extremes test the hashing
SPECIAL_LABELS = [-1, 0, I64_MIN, I64_MAX, 10**12, -(10**12) - 7]


def make_groups(n_groups: int, lo: int = 1, hi: int = 16, kind: str = "binary",
                dtype=torch.float32, device="cpu"):
    """Shuffled rollouts of `n_groups` groups of random sizes in [lo, hi], with labels that are
    non-contiguous, huge and negative. kind: binary (0/1), continuous, or mixed (some all-equal
    groups of non-representable values among continuous ones)."""
    sizes = torch.randint(lo, hi + 1, (n_groups,))
    labels = torch.randperm(10 * n_groups + 10)[:n_groups] * 1_000_003 - 5 * n_groups
    labels[: min(len(SPECIAL_LABELS), n_groups)] = torch.tensor(SPECIAL_LABELS[:n_groups])
    labels = labels[torch.randperm(n_groups)]
    ids = torch.repeat_interleave(labels, sizes)
    R = ids.numel()
    if kind == "binary":
        r = torch.randint(0, 2, (R,)).to(torch.float64)
    else:
        r = torch.randn(R, dtype=torch.float64) * 3 + 1
        if kind == "mixed":  # every third group constant (0.1, 0.7, ... are not exact in binary)
            gidx = torch.repeat_interleave(torch.arange(n_groups), sizes)
            const = gidx % 3 == 0
            r[const] = 0.1 + 0.3 * gidx[const].to(torch.float64)
    perm = torch.randperm(R)
    return r[perm].to(dtype).to(device), ids[perm].to(device)


def ref64(rewards, ids, scale="std", eps=1e-6):
    return reference.group_advantages(rewards.double(), ids, scale=scale, eps=eps)


def tol(out_dtype):
    return dict(rtol=1e-12, atol=1e-12) if out_dtype == torch.float64 else dict(rtol=2e-6, atol=2e-6)


def verl_grpo_outcome_advantage(rewards, index, epsilon=1e-6, norm_adv_by_std_in_grpo=True):
    """verl's compute_grpo_outcome_advantage (verl/trainer/ppo/core_algos.py) on one-token
    responses: per-index lists, torch.mean / torch.std per group, mean 0 std 1 for a group of
    one, then (score - mean) / (std + eps) or score - mean."""
    scores = rewards.clone()
    id2score, id2mean, id2std = defaultdict(list), {}, {}
    for i in range(scores.shape[0]):
        id2score[index[i]].append(scores[i])
    for idx, vals in id2score.items():
        if len(vals) == 1:
            id2mean[idx], id2std[idx] = torch.tensor(0.0), torch.tensor(1.0)
        else:
            t = torch.stack(vals)
            id2mean[idx], id2std[idx] = torch.mean(t), torch.std(t)
    for i in range(scores.shape[0]):
        if norm_adv_by_std_in_grpo:
            scores[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + epsilon)
        else:
            scores[i] = scores[i] - id2mean[index[i]]
    return scores


# --------------------------------------------------------------------------------------------
# against the float64 reference
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("kind", ["binary", "continuous", "mixed"])
@pytest.mark.parametrize("scale", ["std", "none"])
def test_matches_reference(any_backend, scale, kind, dtype):
    backend, device = any_backend
    r, ids = make_groups(300, kind=kind, dtype=dtype, device=device)
    out = group_advantages(r, ids, scale=scale, backend=backend)
    assert out.dtype == dtype and out.shape == r.shape and out.device == r.device
    exp = ref64(r, ids, scale)
    torch.testing.assert_close(out.double().cpu(), exp.cpu(), **tol(dtype))
    # independent check of the reference itself: the per-group loop in fp64 (unshifted: an
    # all-equal fp64 group gives it ~1e-14 / eps of noise, hence the atol)
    loop = reference.group_advantages_loop(r.double(), ids, scale=scale)
    torch.testing.assert_close(exp, loop, rtol=1e-9, atol=1e-6)
    # structural: groups of one and all-equal groups are exactly 0, sums per group ~ 0
    _, inv, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    assert (out[counts[inv] == 1] == 0).all()
    gsum = torch.zeros(counts.numel(), dtype=torch.float64, device=device).index_add_(0, inv, out.double())
    assert gsum.abs().max() < 1e-4


@pytest.mark.parametrize("scale", ["std", "none"])
def test_all_equal_groups_exactly_zero(any_backend, scale):
    backend, device = any_backend
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        vals = torch.tensor([0.1, 0.7, 1e6 + 0.3, -3.3, 1.0, 0.0], dtype=torch.float64)
        sizes = torch.tensor([3, 7, 16, 5, 2, 11])
        r = torch.repeat_interleave(vals, sizes).to(dtype)
        ids = torch.repeat_interleave(torch.tensor([5, -1, 10**12, I64_MIN, I64_MAX, 3]), sizes)
        perm = torch.randperm(r.numel())
        for eps in (1e-12, 0.0):
            out = group_advantages(r[perm].to(device), ids[perm].to(device), scale=scale, eps=eps,
                                   backend=backend)
            assert (out == 0).all(), (dtype, eps, out)


def test_groups_of_one_are_zero(any_backend):
    backend, device = any_backend
    r = torch.tensor([3.0, -2.0, 0.5, 7.0], device=device)
    for ids in (torch.tensor([4, 1, 9, 10**12]), torch.tensor([4, 1, 1, -5])):
        out = group_advantages(r, ids.to(device), backend=backend)
        exp = ref64(r, ids.to(device)).float()
        assert torch.equal(out, exp)
        singletons = torch.tensor([(ids == i).sum() == 1 for i in ids], device=device)
        assert (out[singletons] == 0).all()
    torch.testing.assert_close(out[1:3].cpu(), torch.tensor([-1.0, 1.0]) * 1.25 / (2.5 / 2**0.5 + 1e-6))


def test_single_group_and_known_values(any_backend):
    backend, device = any_backend
    r = torch.tensor([1.0, 2.0, 3.0, 4.0], device=device)
    ids = torch.full((4,), 10**12, device=device)
    std = torch.tensor([1.0, 2.0, 3.0, 4.0]).std().item()  # sqrt(5/3)
    out = group_advantages(r, ids, backend=backend)
    torch.testing.assert_close(out.cpu(), torch.tensor([-1.5, -0.5, 0.5, 1.5]) / (std + 1e-6))
    out = group_advantages(r, ids, eps=0.5, backend=backend)
    torch.testing.assert_close(out.cpu(), torch.tensor([-1.5, -0.5, 0.5, 1.5]) / (std + 0.5))
    out = group_advantages(r, ids, scale="none", backend=backend)
    assert torch.equal(out.cpu(), torch.tensor([-1.5, -0.5, 0.5, 1.5]))
    out = group_advantages(r, ids, eps=0, backend=backend)
    torch.testing.assert_close(out.cpu(), torch.tensor([-1.5, -0.5, 0.5, 1.5]) / std)


def test_empty(any_backend):
    backend, device = any_backend
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        out = group_advantages(torch.empty(0, dtype=dtype, device=device),
                               torch.empty(0, dtype=torch.int64, device=device), backend=backend)
        assert out.shape == (0,) and out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


def test_non_contiguous(any_backend):
    backend, device = any_backend
    r, ids = make_groups(100, kind="continuous", device=device)
    R = r.numel()
    r2 = torch.stack([r, torch.randn_like(r)], 1)[:, 0]  # stride 2
    ids2 = torch.stack([torch.randint(0, 3, (R,), device=device), ids], 1)[:, 1]
    assert not r2.is_contiguous() and not ids2.is_contiguous()
    out = group_advantages(r2, ids2, backend=backend)
    torch.testing.assert_close(out.double(), ref64(r, ids), **tol(torch.float32))
    rev = group_advantages(r.flip(0), ids.flip(0), backend=backend)  # negative strides via flip copy
    torch.testing.assert_close(rev.flip(0).double(), ref64(r, ids), **tol(torch.float32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_in_fp32_out(any_backend, dtype):
    backend, device = any_backend
    r, ids = make_groups(80, kind="continuous", dtype=dtype, device=device)
    out = group_advantages(r, ids, backend=backend)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref64(r, ids), **tol(torch.float32))


def test_int32_group_ids(any_backend):
    backend, device = any_backend
    r, ids = make_groups(50, device=device)
    ids32 = (ids % 1000).to(torch.int32)
    torch.testing.assert_close(group_advantages(r, ids32, backend=backend).double(),
                               ref64(r, ids32.long()), **tol(torch.float32))


def test_nan_without_value_checks_stays_in_its_group(kernel_backend, monkeypatch):
    """With the finiteness check off (as under torch.compile) a NaN poisons only its group."""
    backend, device = kernel_backend
    monkeypatch.setenv("AXPO_SKIP_VALUE_CHECKS", "1")
    r = torch.tensor([1.0, float("nan"), 0.0, 1.0, 0.0], device=device)
    ids = torch.tensor([7, 7, 3, 3, -1], device=device)
    out = group_advantages(r, ids, backend=backend)
    assert torch.isnan(out[:2]).all()
    torch.testing.assert_close(out[2:].cpu(), torch.tensor([-0.7071064, 0.7071064, 0.0]))


# --------------------------------------------------------------------------------------------
# verl
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", [True, False])
def test_matches_verl_formula(any_backend, norm):
    backend, device = any_backend
    r, ids = make_groups(60, lo=2, hi=16, kind="binary")
    r[::7] = torch.rand_like(r[::7])
    exp = verl_grpo_outcome_advantage(r, ids.tolist(), norm_adv_by_std_in_grpo=norm)
    out = group_advantages(r.to(device), ids.to(device), scale="std" if norm else "none", backend=backend)
    torch.testing.assert_close(out.cpu(), exp, rtol=1e-5, atol=1e-5)


def test_verl_group_of_one_differs_by_spec():
    r = torch.tensor([0.25, 1.0, 0.0])
    ids = torch.tensor([9, 4, 4])
    verl = verl_grpo_outcome_advantage(r, ids.tolist())
    ours = group_advantages(r, ids)
    assert verl[0].item() == pytest.approx(0.25 / (1 + 1e-6)) and ours[0].item() == 0.0
    torch.testing.assert_close(ours[1:], verl[1:])


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------
def test_bad_input_errors():
    r = torch.rand(6)
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(TypeError, match="rewards must have dtype"):
        group_advantages(torch.tensor([1, 0, 1, 1, 0, 0]), ids)
    with pytest.raises(TypeError, match="rewards must be a torch.Tensor"):
        group_advantages([1.0, 0.0], ids[:2])
    with pytest.raises(TypeError, match="group_ids must have dtype"):
        group_advantages(r, ids.float())
    with pytest.raises(ValueError, match="group_ids must have the shape of rewards"):
        group_advantages(r, ids[:5])
    with pytest.raises(ValueError, match="rewards must be 1-D"):
        group_advantages(r.view(2, 3), ids.view(2, 3))
    with pytest.raises(ValueError, match="group_ids is on meta but rewards is on cpu"):
        group_advantages(r, ids.to("meta"))
    with pytest.raises(ValueError, match="scale must be one of"):
        group_advantages(r, ids, scale="mean")
    for eps in (-1e-6, float("nan"), float("inf"), True, "1e-6"):
        with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
            group_advantages(r, ids, eps=eps)
    with pytest.raises(ValueError, match="backend must be one of"):
        group_advantages(r, ids, backend="tpu")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_rewards_raise(any_backend, bad):
    backend, device = any_backend
    r = torch.rand(6, device=device)
    r[3] = bad
    with pytest.raises(ValueError, match=r"rewards must be finite; rewards\[3\]"):
        group_advantages(r, torch.tensor([0, 0, 1, 1, 2, 2], device=device), backend=backend)


def test_kernel_entry_points_check_arguments():
    from axpo import _C

    with pytest.raises(RuntimeError, match="group_ids must be int64"):
        _C.group_advantages_cpu(torch.rand(3), torch.zeros(3, dtype=torch.int32), True, 1e-6)
    with pytest.raises(RuntimeError, match="group_ids must have shape"):
        _C.group_advantages_cpu(torch.rand(3), torch.zeros(2, dtype=torch.int64), True, 1e-6)
    with pytest.raises(RuntimeError, match="rewards must be fp16, bf16, fp32 or fp64"):
        _C.group_advantages_cpu(torch.ones(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64), True, 1e-6)


# --------------------------------------------------------------------------------------------
# custom op, torch.compile
# --------------------------------------------------------------------------------------------
def test_opcheck(kernel_backend):
    backend, device = kernel_backend
    r, ids = make_groups(20, device=device)
    for scale_std in (True, False):
        torch.library.opcheck(_op, (r, ids, scale_std, 1e-6, backend))
    torch.library.opcheck(_op, (r.double(), ids, True, 0.0, backend))


def compile_cases():
    return [(b, d) for b, d in KERNEL_BACKENDS] + [("torch", "cpu")]


@pytest.mark.parametrize("backend,device", compile_cases())
def test_torch_compile(backend, device):
    r, ids = make_groups(40, device=device)
    logp = torch.randn(r.numel(), device=device, requires_grad=True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def loss_fn(logp, r, ids):
        adv = group_advantages(r, ids, backend=backend)
        return -(adv * logp).mean()

    loss = loss_fn(logp, r, ids)
    loss.backward()
    adv = ref64(r, ids).float()
    torch.testing.assert_close(loss, -(adv * logp).mean())
    torch.testing.assert_close(logp.grad, -adv / r.numel())


# --------------------------------------------------------------------------------------------
# properties
# --------------------------------------------------------------------------------------------
PROPERTY_BACKENDS = [b for b, d in KERNEL_BACKENDS if d == "cpu"] + ["torch"]


@settings(max_examples=40, deadline=None)
@given(
    backend=st.sampled_from(PROPERTY_BACKENDS),
    data=st.lists(st.tuples(st.integers(-3, 3), st.sampled_from([0.0, 1.0, 0.5, -2.25, 1e-3, 1e4])),
                  min_size=0, max_size=40),
    scale=st.sampled_from(["std", "none"]),
    eps=st.sampled_from([0.0, 1e-6, 0.1]),
    relabel=st.integers(-(10**15), 10**15),
)
def test_property_matches_reference(backend, data, scale, eps, relabel):
    ids = torch.tensor([i for i, _ in data], dtype=torch.int64)
    r = torch.tensor([v for _, v in data], dtype=torch.float32)
    out = group_advantages(r, ids, scale=scale, eps=eps, backend=backend)
    exp = ref64(r, ids, scale, eps)
    if eps == 0.0:  # 0 / 0 for an all-equal group must still be exactly 0 (no NaN)
        assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), exp, rtol=2e-6, atol=2e-6)
    # relabeling the groups (an injective map of the labels) and permuting the rollouts commute
    perm = torch.randperm(r.numel())
    out2 = group_advantages(r[perm], ids[perm] * 3 + relabel, scale=scale, eps=eps, backend=backend)
    torch.testing.assert_close(out2, out[perm], rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# benchmark smoke test
# --------------------------------------------------------------------------------------------
def test_bench_smoke(tmp_path, capsys):
    bench = bench_module("bench_group_advantages")
    rc = bench.main(["--device", "cpu", "--n", "512", "--repeats", "1", "--warmup", "1",
                     "--out", str(tmp_path), "--no-plot"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| op | dtype | shape | mode | impl |" in out and "speedup vs loop" in out
    data = json.loads((tmp_path / "group_advantages_cpu.json").read_text())
    assert (tmp_path / "group_advantages_cpu.md").is_file()
    rows = data["rows"]
    names = {r["impl"] for r in rows if r["median_ms"] is not None}
    assert {"reference", "loop", "index_add", "axpo:cpu"} <= names, names
    for r in rows:
        assert r["status"] in ("ok", "skipped"), (r["impl"], r["status"], r["reason"])
    assert data["ratios"]["axpo:cpu"]["vs_loop"] > 0


def test_many_groups_hash_probing():
    """~20k groups with clustered labels (long probe chains in a hash table), CPU C++ backend."""
    sizes = torch.randint(1, 9, (20000,))
    labels = torch.arange(20000) * 2**40 - 2**62  # multiples of a power of two: poor low bits
    ids = torch.repeat_interleave(labels[torch.randperm(20000)], sizes)
    perm = torch.randperm(ids.numel())
    r, ids = torch.randint(0, 2, (ids.numel(),)).float()[perm], ids[perm]
    for scale in ("std", "none"):
        out = group_advantages(r, ids, scale=scale, backend="cpu")
        torch.testing.assert_close(out.double(), ref64(r, ids, scale), **tol(torch.float32))
