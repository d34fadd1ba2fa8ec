"""The verl plugin (axpo.integrations.verl) against verl 0.9.1's own functions.

Policy loss "axpo" == verl's compute_policy_loss_vanilla (+ agg_loss with config.global_batch_info)
and advantage estimator "axpo_grpo" == verl's compute_grpo_outcome_advantage, on the same random
inputs: every loss_agg_mode, local and global (dp_size, batch_num_tokens, global_batch_size,
loss_scale_factor) normalizers, fully masked rows, clip ratios hit on both sides and the dual
clip, float32 and float64, loss, metrics and log_prob gradient; variable group sizes (singletons,
all-equal groups), string uids. Both are found by name through verl's getters, and `import verl`
loads the plugin through the `verl.plugins` entry point.

verl cannot share the main .venv (it pins transformers < 5.11): scripts/verl_env.sh builds
.venv-verl and runs this file. Skipped where verl is missing, unless AXPO_REQUIRE_VERL=1 (then a
missing verl is an error).
"""
from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import subprocess
import sys
import uuid

import pytest
import torch

if os.environ.get("AXPO_REQUIRE_VERL") == "1":
    import verl.trainer.ppo.core_algos  # noqa: F401  (fails the module when required and missing)
else:
    pytest.importorskip("verl.trainer.ppo.core_algos")

import numpy as np  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402

import axpo.integrations.verl as axv  # noqa: E402

MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}
MAX_DIFF: dict[str, float] = {}


def _record(key: str, a: torch.Tensor, b: torch.Tensor) -> None:
    """Largest absolute difference, and relative to the largest |verl value|."""
    if not a.numel():
        return
    d = float((a.double() - b.double()).abs().max())
    r = d / max(float(b.double().abs().max()), 1e-300)
    old = MAX_DIFF.get(key, (0.0, 0.0))
    MAX_DIFF[key] = (max(old[0], d), max(old[1], r))


def _config(info: dict, clip_low=0.2, clip_high=0.28, clip_c=3.0) -> ActorConfig:
    cfg = ActorConfig(strategy="fsdp", rollout_n=4, ppo_mini_batch_size=8, ppo_micro_batch_size_per_gpu=2,
                      clip_ratio=0.2, clip_ratio_low=clip_low, clip_ratio_high=clip_high, clip_ratio_c=clip_c)
    cfg.global_batch_info.update(info)
    return cfg


def _inputs(B, T, dtype, device, seed, mask_dtype=torch.bool):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    logp = old + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)  # ratios e^{+-0.8}: both clips hit
    logp[0, :3] = old[0, :3] + torch.tensor([-1.5, 1.2, 0.0], dtype=torch.float64)  # dual clip (A < 0, ratio > 3)
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64) + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv[0] = -2.0
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[1] = 0  # a fully masked row
    lengths[2] = T
    mask = torch.arange(T)[None, :] < lengths[:, None]
    if B > 5:
        mask[5, : T // 2] = False  # a row with a masked prefix (tool tokens)
    return (old.to(dtype).to(device), logp.to(dtype).to(device), adv.to(dtype).to(device),
            mask.to(mask_dtype).to(device))


def _global_infos(mask: torch.Tensor):
    n_tok = int((mask != 0).sum())
    n_seq = int(((mask != 0).sum(-1) > 0).sum())
    return {
        "local": {},
        "local-explicit-dp1": {"dp_size": 1, "batch_num_tokens": None, "global_batch_size": None,
                               "loss_scale_factor": None},
        "global-int": {"dp_size": 1, "batch_num_tokens": n_tok + 7, "global_batch_size": n_seq + 3,
                       "loss_scale_factor": 50},
        "global-dp4-tensor": {"dp_size": 4, "batch_num_tokens": torch.tensor(4 * n_tok + 5),
                              "global_batch_size": 4 * mask.shape[0], "loss_scale_factor": None},
    }


def _run(fn, old, logp, adv, mask, mode, cfg, weights=None):
    lp = logp.detach().clone().requires_grad_(True)
    loss, metrics = fn(old_log_prob=old, log_prob=lp, advantages=adv, response_mask=mask, loss_agg_mode=mode,
                       config=cfg, rollout_is_weights=weights)
    loss.backward()
    return loss.detach(), lp.grad, metrics


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("mode", MODES)
def test_policy_loss_matches_verl(any_backend, dtype, mode, monkeypatch):
    backend, device = any_backend
    monkeypatch.setenv("AXPO_BACKEND", backend)
    vanilla = core_algos.get_policy_loss_fn("vanilla")
    ours = core_algos.get_policy_loss_fn("axpo")
    for seed, (B, T) in enumerate([(7, 13), (16, 40)]):
        old, logp, adv, mask = _inputs(B, T, dtype, device, seed)
        for name, info in _global_infos(mask).items():
            loss_v, grad_v, met_v = _run(vanilla, old, logp, adv, mask, mode, _config(info))
            loss_a, grad_a, met_a = _run(ours, old, logp, adv, mask, mode, _config(info))
            assert loss_a.dtype == loss_v.dtype, (loss_a.dtype, loss_v.dtype)
            torch.testing.assert_close(loss_a, loss_v, **TOL[dtype], msg=lambda m: f"{name}: {m}")
            torch.testing.assert_close(grad_a, grad_v, **TOL[dtype], msg=lambda m: f"{name} grad: {m}")
            assert set(met_a) == set(met_v)
            for k in met_v:
                assert met_a[k] == pytest.approx(met_v[k], rel=2e-6, abs=1e-7), (name, k)
            _record(f"loss {dtype}", loss_a, loss_v)
            _record(f"grad {dtype}", grad_a, grad_v)
        # the data exercised the clip on both sides and the dual clip
        assert met_v["actor/pg_clipfrac"] > 0 and met_v["actor/pg_clipfrac_lower"] > 0


@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.float32, torch.float64], ids=["i64", "f32", "f64"])
@pytest.mark.parametrize("mode", MODES)
def test_policy_loss_mask_dtypes_and_is_weights(mode, mask_dtype):
    """verl's masks are bool in its ppo_loss; other 0/1 dtypes (the fp64 one changes verl's
    seq-mean-token-mean through its + 1e-8) and positive rollout importance weights."""
    dtype = torch.float64
    old, logp, adv, mask = _inputs(9, 17, dtype, "cpu", 3, mask_dtype=mask_dtype)
    w = torch.rand(mask.shape, generator=torch.Generator().manual_seed(1), dtype=dtype) * 1.5 + 0.05
    vanilla = core_algos.get_policy_loss_fn("vanilla")
    for weights in (None, w):
        for name, info in _global_infos(mask).items():
            lv, gv, mv = _run(vanilla, old, logp, adv, mask, mode, _config(info), weights)
            la, ga, ma = _run(axv.compute_policy_loss_axpo, old, logp, adv, mask, mode, _config(info), weights)
            torch.testing.assert_close(la, lv, **TOL[dtype], msg=lambda m: f"{name}: {m}")
            torch.testing.assert_close(ga, gv, **TOL[dtype], msg=lambda m: f"{name} grad: {m}")
            for k in mv:
                assert ma[k] == pytest.approx(mv[k], rel=2e-6, abs=1e-7)  # metrics: fp32, (name, k)
            _record(f"loss fp64, {mask_dtype} mask, rollout_is_weights={weights is not None}", la, lv)


def test_policy_loss_clip_settings_and_errors():
    old, logp, adv, mask = _inputs(8, 11, torch.float64, "cpu", 5)
    for lo, hi, c in [(0.1, 0.1, 1.5), (0.3, 0.5, 10.0)]:
        for mode in MODES:
            cfg = _config({}, lo, hi, c)
            lv, gv, _ = _run(core_algos.compute_policy_loss_vanilla, old, logp, adv, mask, mode, cfg)
            la, ga, _ = _run(axv.compute_policy_loss_axpo, old, logp, adv, mask, mode, cfg)
            torch.testing.assert_close(la, lv, **TOL[torch.float64])
            torch.testing.assert_close(ga, gv, **TOL[torch.float64])
    # verl's errors are kept
    for mode in MODES:
        if mode == "token-sum":
            continue
        with pytest.raises(ValueError):
            axv.compute_policy_loss_axpo(old, logp, adv, mask, mode, _config({"dp_size": 2}))
    with pytest.raises(ValueError, match="Invalid loss_agg_mode"):
        axv.compute_policy_loss_axpo(old, logp, adv, mask, "seq-sum", _config({}))
    # a micro-batch without any token: 0 and a zero gradient (verl: NaN)
    empty = torch.zeros_like(mask)
    for mode in MODES:
        la, ga, _ = _run(axv.compute_policy_loss_axpo, old, logp, adv, empty, mode, _config({}))
        assert float(la) == 0.0 and float(ga.abs().max()) == 0.0


def _uids(sizes, seed):
    rng = np.random.default_rng(seed)
    ids = [str(uuid.UUID(int=int(rng.integers(0, 2**62)))) for _ in sizes]
    index = np.array([u for u, n in zip(ids, sizes) for _ in range(n)], dtype=object)
    return index[rng.permutation(len(index))]  # groups interleaved, as after verl's balancing


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("norm", [True, False], ids=["std", "nostd"])
def test_grpo_advantage_matches_verl(any_backend, dtype, norm, monkeypatch):
    backend, device = any_backend
    monkeypatch.setenv("AXPO_BACKEND", backend)
    ours = core_algos.get_adv_estimator_fn("axpo_grpo")
    for seed, sizes in enumerate([[1, 2, 3, 4, 5, 8, 1, 6], [4] * 6, [16, 1, 2, 7]]):
        index = _uids(sizes, seed)
        B, T = len(index), 9
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.int64)
        scores = torch.randint(0, 3, (B,), generator=g).to(torch.float64) + 0.1 * torch.randn(B, generator=g, dtype=torch.float64)
        equal = torch.as_tensor(index == index[0])
        scores[equal] = 0.7  # an all-equal group (size > 1 in every case below)
        rewards = torch.zeros(B, T, dtype=torch.float64)
        rewards[torch.arange(B), lengths - 1] = scores  # the outcome reward on the last token
        rewards = rewards.to(dtype)
        adv_v, ret_v = core_algos.compute_grpo_outcome_advantage(rewards.clone(), mask, index, 1e-6, norm)
        adv_a, ret_a = ours(token_level_rewards=rewards.to(device), response_mask=mask.to(device), index=index,
                            epsilon=1e-6, norm_adv_by_std_in_grpo=norm, config=None)
        assert adv_a.dtype == adv_v.dtype and adv_a.shape == adv_v.shape
        tol = dict(rtol=2e-6, atol=2e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
        # all-equal group: exactly 0 here; verl's fp32 mean / std of equal values leave a
        # rounding error that it divides by (std + eps) (seen: 0.056 instead of 0)
        assert float(adv_a[equal].abs().max()) == 0.0
        if dtype == torch.float64:
            assert float(adv_v[equal].abs().max()) < 1e-8
        keep = ~equal
        torch.testing.assert_close(adv_a.cpu()[keep], adv_v[keep], **tol)
        torch.testing.assert_close(ret_a.cpu()[keep], ret_v[keep], **tol)
        torch.testing.assert_close(adv_a, ret_a)
        _record(f"advantages {dtype}", adv_a.cpu()[keep], adv_v[keep])


@pytest.mark.parametrize("norm", [True, False], ids=["std", "nostd"])
def test_grpo_called_like_verls_trainer(norm):
    """verl's ray_trainer.compute_advantage calls a registered estimator with
    token_level_rewards, response_mask, config (AlgoConfig) and index only."""
    from verl.trainer.config import AlgoConfig

    index = _uids([3, 1, 5, 2], 7)
    B, T = len(index), 6
    g = torch.Generator().manual_seed(3)
    rewards = torch.zeros(B, T)
    rewards[:, -1] = torch.randn(B, generator=g)
    mask = torch.ones(B, T, dtype=torch.int64)
    cfg = AlgoConfig(adv_estimator="axpo_grpo", norm_adv_by_std_in_grpo=norm)
    fn = core_algos.get_adv_estimator_fn(cfg.adv_estimator)
    adv_a, _ = fn(token_level_rewards=rewards, response_mask=mask, config=cfg, index=index)
    adv_v, _ = core_algos.compute_grpo_outcome_advantage(rewards.clone(), mask, index, 1e-6, norm)
    torch.testing.assert_close(adv_a, adv_v, rtol=2e-6, atol=2e-6)


def test_grpo_integer_and_tensor_index():
    index = np.array([3, 3, 9, 9, 9, 12, 40, 40])
    rewards = torch.zeros(8, 4)
    rewards[:, -1] = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.5, 0.2, 0.9])
    mask = torch.ones(8, 4)
    adv_v, _ = core_algos.compute_grpo_outcome_advantage(rewards.clone(), mask, index)
    for idx in (index, torch.as_tensor(index), index.astype(str).astype(object)):
        adv_a, _ = axv.compute_axpo_grpo_advantage(rewards, mask, idx)
        torch.testing.assert_close(adv_a, adv_v, rtol=2e-6, atol=2e-6)


def test_found_by_name_and_idempotent():
    assert core_algos.get_policy_loss_fn("axpo") is axv.compute_policy_loss_axpo
    assert core_algos.get_adv_estimator_fn("axpo_grpo") is axv.compute_axpo_grpo_advantage
    axv.register()  # again: no error
    mod = importlib.reload(axv)  # a new copy of the functions replaces the old one
    assert core_algos.get_policy_loss_fn("axpo") is mod.compute_policy_loss_axpo
    assert core_algos.get_adv_estimator_fn("axpo_grpo") is mod.compute_axpo_grpo_advantage
    # a foreign function under our name is refused
    saved = core_algos.ADV_ESTIMATOR_REGISTRY.pop("axpo_grpo")
    try:
        core_algos.ADV_ESTIMATOR_REGISTRY["axpo_grpo"] = lambda *a, **k: None
        with pytest.raises(ValueError, match="already registered"):
            mod.register()
    finally:
        core_algos.ADV_ESTIMATOR_REGISTRY["axpo_grpo"] = saved


def test_entry_point(tmp_path):
    # every distribution on sys.path, not only the first of each name: a stale axpo.egg-info at
    # the repo root (the main .venv's editable install, written before the entry point existed)
    # shadows the installed axpo's metadata for importlib.metadata.entry_points()
    eps = [ep for d in md.distributions() for ep in d.entry_points
           if ep.group == "verl.plugins" and ep.value == "axpo.integrations.verl"]
    if not eps:
        if os.environ.get("AXPO_REQUIRE_VERL") == "1":
            pytest.fail("axpo is not installed with its verl.plugins entry point (scripts/verl_env.sh installs it)")
        pytest.skip("axpo not installed here (its verl.plugins entry point is in pyproject.toml)")
    assert eps[0].load() is sys.modules["axpo.integrations.verl"]
    # a fresh interpreter outside the source tree (the installed axpo): `import verl` alone loads
    # the plugin (verl/__init__.py loads the verl.plugins entry points)
    code = ("import verl\n"
            "from verl.trainer.ppo import core_algos as c\n"
            "f = c.get_policy_loss_fn('axpo'); g = c.get_adv_estimator_fn('axpo_grpo')\n"
            "print(f.__module__, g.__module__)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VERL_USE_EXTERNAL_PLUGINS")}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=str(tmp_path), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["axpo.integrations.verl"] * 2
    env["VERL_USE_EXTERNAL_PLUGINS"] = "none"  # verl's switch turns it off
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=str(tmp_path), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode != 0 and "Unsupported loss mode: axpo" in out.stderr


def test_zz_report_max_differences():
    """Prints the largest differences seen above (pytest -s shows them)."""
    for k, v in sorted(MAX_DIFF.items()):
        print(f"verl vs axpo max |diff| {k}: {v[0]:.3e} (relative {v[1]:.3e})")
