"""step_diagnostics on a hand-checked batch."""
from __future__ import annotations

import pytest

from axpo.algo import AxpoConfig, plan_resample, step_diagnostics
from tests.algo._build import make_continuation, make_rollout


def batch():
    g0 = [make_rollout(0, i, 0.0, [{"error": "timeout"}] if i == 0 else 1) for i in range(4)]
    g1 = [make_rollout(1, 10, 1.0, 1), make_rollout(1, 11, 0.0, 2), make_rollout(1, 12, 0.0),
          make_rollout(1, 13, 0.0)]
    g2 = [make_rollout(2, 20 + i, float(i == 0)) for i in range(4)]
    return g0 + g1 + g2


def test_step_diagnostics_values():
    rollouts = batch()
    plan = plan_resample(rollouts, 3, 4, AxpoConfig(ratio=0.5, k=2))  # P = 3, all from group 0
    assert plan.budget == 3 and len(plan.selected) == 3
    s0, s1, _ = [next(r for r in rollouts if r.uid == p.uid) for p in plan.selected]
    conts = [make_continuation(s0, 100, 1.0, {"name": "zoom", "arguments": {"x": 1, "y": 2}}),
             make_continuation(s0, 101, 0.0, {"name": "python", "arguments": {"code": "1"}, "error": "timeout"}),
             make_continuation(s1, 102, 0.0, {"name": "zoom", "arguments": {"y": 2, "x": 1}}),
             make_continuation(s1, 103, 0.0, {"name": "zoom", "arguments": {"x": 1, "y": 2}, "error": "bad_args"})]
    d = step_diagnostics(rollouts, plan, conts, extra={"grad_norm": 2.5, "prefill_tokens_saved": 40})
    assert d["n_rollouts"] == 12 and d["n_groups"] == 3
    assert d["tool_call_rate"] == pytest.approx(6 / 12)
    assert d["pass1"] == pytest.approx(2 / 12)
    assert d["pass1_tool"] == pytest.approx(1 / 6) and d["pass1_no_tool"] == pytest.approx(1 / 6)
    assert d["n_groups_tool"] == 2 and d["all_wrong_rate_tool"] == pytest.approx(0.5)
    assert d["n_groups_no_tool"] == 2 and d["all_wrong_rate_no_tool"] == pytest.approx(0.5)
    assert d["triggered_frac"] == pytest.approx(1 / 3) and d["n_triggered"] == 1
    assert d["prefix_budget"] == 3 and d["prefixes_selected"] == 3 and d["prefixes_resampled"] == 2
    assert d["recovery_rate"] == pytest.approx(1 / 3)  # the third selected prefix got no continuation
    assert d["triggered_groups_recovered_frac"] == 1.0
    conf = [c.confidence for c in plan.candidates]
    assert d["confidence_mean"] == pytest.approx(sum(conf) / 4)
    assert d["confidence_min"] == min(conf) and d["confidence_max"] == max(conf)
    chosen = {p.uid for p in plan.selected}
    assert d["confidence_selected_mean"] == pytest.approx(sum(p.confidence for p in plan.selected) / 3)
    assert d["confidence_rest_mean"] == pytest.approx(next(c.confidence for c in plan.candidates if c.uid not in chosen))
    assert d["confidence_selected_mean"] < d["confidence_rest_mean"]  # lowest confidence first
    assert "entropy_mean" in d
    assert d["distinct_tool_calls_resampled"] == pytest.approx((2 / 2 + 1 / 2) / 2)  # key order ignored
    assert d["extra_rollout_tokens"] == sum(len(c) - c.prefix_len for c in conts) > 0
    assert d["tool_calls"] == 4 + 1 + 2 + 4
    assert d["tool_errors/timeout"] == 2 and d["tool_errors/bad_args"] == 1
    assert d["grad_norm"] == 2.5 and d["prefill_tokens_saved"] == 40.0
    assert all(isinstance(v, float) for v in d.values())


def test_empty_denominators_are_omitted_not_nan():
    rollouts = [make_rollout(0, i, 0.0, entropies=False) for i in range(3)]
    plan = plan_resample(rollouts, 1, 3, AxpoConfig())
    d = step_diagnostics(rollouts, plan, [])
    assert d["tool_call_rate"] == 0 and d["n_rollouts_tool"] == 0 and d["n_groups_tool"] == 0
    for key in ("pass1_tool", "all_wrong_rate_tool", "recovery_rate", "confidence_mean",
                "distinct_tool_calls_resampled"):
        assert key not in d
    assert d["all_wrong_rate_no_tool"] == 1.0 and d["triggered_frac"] == 0.0
    assert d["extra_rollout_tokens"] == 0.0 and not any(k.startswith("tool_errors/") for k in d)
    empty = step_diagnostics([], plan_resample([], 0, 8, AxpoConfig()), [])
    assert empty["n_rollouts"] == 0 and "pass1" not in empty


def test_extra_clash_and_types():
    rollouts = batch()
    plan = plan_resample(rollouts, 3, 4, AxpoConfig())
    with pytest.raises(ValueError, match="pass1"):
        step_diagnostics(rollouts, plan, [], extra={"pass1": 0.3})
    with pytest.raises(TypeError, match="plan"):
        step_diagnostics(rollouts, None, [])
    with pytest.raises(TypeError, match="extra"):
        step_diagnostics(rollouts, plan, [], extra={"kl": "high"})
