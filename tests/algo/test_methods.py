"""The method registry: every entry's meaning (group size, selection, cut, credit, normalization
group), the errors, and that a new variant is one registered entry."""
from __future__ import annotations

import math

import pytest
import torch

from axpo.algo import (AxpoConfig, Method, Stream, assemble_advantages, get_method, method_names, plan_resample,
                       register_method)
from axpo.algo import methods as M
from tests.algo._build import make_continuation, make_fresh, make_rollout
from tests.algo.test_advantages import EPS, hand_advantages

PAPER = ("grpo", "drgrpo", "axpo", "grpo-matched", "axpo-random", "axpo-no-credit", "axpo-no-fix",
         "axpo-shared-group")


def test_registry_holds_the_paper_methods():
    assert method_names() == PAPER
    assert [m for m in method_names() if get_method(m).resamples] == [
        "axpo", "axpo-random", "axpo-no-credit", "axpo-no-fix", "axpo-shared-group"]
    assert get_method("drgrpo").scale == "none" and get_method("drgrpo").loss_agg == "seq-mean-token-sum-norm"
    assert all(get_method(m).scale == "std" and get_method(m).loss_agg == "token-mean" for m in PAPER if m != "drgrpo")
    with pytest.raises(ValueError, match=r"method must be one of \['grpo', 'drgrpo', 'axpo', 'grpo-matched'"):
        get_method("ppo")
    with pytest.raises(ValueError, match=r"AxpoConfig.algorithm must be one of \['grpo', 'drgrpo'"):
        AxpoConfig(algorithm="ppo")


@pytest.mark.parametrize("kwargs, match", [
    (dict(scale="sqrt"), "scale must be one of"), (dict(loss_agg="mean"), "loss_agg must be one of"),
    (dict(resample="branch"), "resample must be one of"), (dict(selection="best"), "selection must be one of"),
    (dict(continuation_group="all"), "continuation_group must be one of"),
    (dict(matched_group=True, resample="tool_call"), "cannot also resample"),
    (dict(resample="prompt"), "prefix_credit must be False"), (dict(name=" x"), "name must be"),
])
def test_bad_method_entries(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Method(**{"name": "x", "summary": "s", **kwargs})


def test_registering_twice_needs_replace():
    with pytest.raises(ValueError, match="already registered"):
        register_method(Method("grpo", "again"))
    with pytest.raises(TypeError, match="must be an axpo.algo.Method"):
        register_method("grpo")


@pytest.fixture
def new_variant():
    """A variant registered for one test: Dr.GRPO-scaled AXPO at random, from the registry alone."""
    method = register_method(Method("axpo-drgrpo-random", "test variant", scale="none", resample="tool_call",
                                    selection="random"))
    yield method
    del M._METHODS[method.name]


def test_a_new_variant_is_one_entry(new_variant):
    cfg = AxpoConfig(algorithm=new_variant.name, ratio=1.0)  # P = floor(1 * 3 * 4 / 4) = 3
    assert cfg.advantage_scale == "none" and cfg.resampling
    rollouts = [make_rollout(g, 4 * g + i, 0.0, 1) for g in range(3) for i in range(4)]
    plan = plan_resample(rollouts, 3, 4, cfg, seed=1)
    assert len(plan.selected) == 3 and {c.group_id for c in plan.selected} == {0, 1, 2}
    from axpo.train.config import load_config  # config validation takes its choices from the registry
    assert load_config(None, [f"rl.algorithm={new_variant.name}"]).loss_agg == "token-mean"


def test_grpo_matched_spends_the_budget_on_larger_groups():
    m = get_method("grpo-matched")
    assert (m.group_size(8, 0.25), m.group_size(8, 0.3), m.group_size(8, 0.0), m.group_size(6, 0.25)) == (10, 10, 8, 8)
    assert get_method("grpo").group_size(8, 0.25) == 8
    assert not AxpoConfig(algorithm="grpo-matched").resampling
    # the same advantages as GRPO on its (larger) groups
    rollouts = [make_rollout(0, i, float(i % 3 == 0), 1) for i in range(10)]
    a = assemble_advantages(rollouts, [], AxpoConfig(algorithm="grpo-matched"))
    b = assemble_advantages(rollouts, [], AxpoConfig(algorithm="grpo"))
    assert all(torch.equal(x.advantages, y.advantages) for x, y in zip(a, b))


def _triggered_batch():
    """4 groups of 4, every tool-using rollout wrong; confidences differ per rollout."""
    rollouts = []
    for g in range(4):
        for i in range(4):
            uid = 4 * g + i
            rollouts.append(make_rollout(g, uid, 0.0, [{"logprob": -0.1 * (1 + (uid * 7) % 11)}] if i < 3 else 0))
    return rollouts


def test_axpo_random_is_seeded_breadth_first_and_differs_from_uncertainty():
    rollouts = _triggered_batch()
    base = AxpoConfig(ratio=0.5, k=2)  # P = floor(0.5 * 4 * 4 / 2) = 4: one per group
    rnd = AxpoConfig(algorithm="axpo-random", ratio=0.5, k=2)
    by_conf = plan_resample(rollouts, 4, 4, base)
    orders = {tuple(c.uid for c in plan_resample(rollouts, 4, 4, rnd, seed=s).selected) for s in range(20)}
    for s in (0, 5):
        plan = plan_resample(rollouts, 4, 4, rnd, seed=s)
        assert [c.uid for c in plan.selected] == [c.uid for c in plan_resample(rollouts, 4, 4, rnd, seed=s).selected]
        assert sorted(c.group_id for c in plan.selected) == [0, 1, 2, 3]  # still breadth-first
        # the records keep their real confidence
        real = {c.uid: c.confidence for c in by_conf.candidates}
        assert all(c.confidence == real[c.uid] for c in plan.selected)
    assert len(orders) > 1
    assert any(set(o) != {c.uid for c in by_conf.selected} for o in orders)
    with pytest.raises(ValueError, match="seed must be an int for method 'axpo-random'"):
        plan_resample(rollouts, 4, 4, rnd)


def test_axpo_no_credit_keeps_the_source_an_ordinary_rollout():
    rollouts = [make_rollout(0, uid, 0.0 if uid < 6 else 1.0, 1 if uid < 6 else 0) for uid in range(8)]
    conts = [make_continuation(rollouts[3], 100 + k, r) for k, r in enumerate([1.0, 0.0, 0.0, 0.0])]
    with_credit = assemble_advantages(rollouts, conts, AxpoConfig())
    no_credit = assemble_advantages(rollouts, conts, AxpoConfig(algorithm="axpo-no-credit"))
    grpo = assemble_advantages(rollouts, [], AxpoConfig(algorithm="grpo"))
    assert with_credit[3].stream == Stream.SOURCE_PREFIX and no_credit[3].stream == Stream.ORIGINAL
    for a, b in zip(no_credit[:8], grpo):  # the originals, source included: exactly GRPO
        assert a.stream == Stream.ORIGINAL and torch.equal(a.advantages, b.advantages)
        assert torch.equal(a.loss_mask, b.loss_mask)
    for a, b in zip(no_credit[8:], with_credit[8:]):  # the continuations: Eq. 2 as in AXPO
        assert torch.equal(a.advantages, b.advantages) and torch.equal(a.loss_mask, b.loss_mask)


def test_axpo_no_fix_resamples_whole_rollouts_from_the_prompt():
    rollouts = _triggered_batch()
    cfg = AxpoConfig(algorithm="axpo-no-fix", ratio=0.5, k=2)
    plan = plan_resample(rollouts, 4, 4, cfg)
    axpo_plan = plan_resample(rollouts, 4, 4, AxpoConfig(ratio=0.5, k=2))
    # the same sources and budget as AXPO, cut at the prompt instead of after `<tool_call>`
    assert [c.uid for c in plan.selected] == [c.uid for c in axpo_plan.selected]
    by_uid = {r.uid: r for r in rollouts}
    assert all(c.prefix_len == by_uid[c.uid].prompt_len for c in plan.selected)
    src = by_uid[plan.selected[0].uid]
    fresh = [make_fresh(src, 200 + k, r) for k, r in enumerate([1.0, 0.0])]
    samples = assemble_advantages(rollouts, fresh, cfg)
    grpo = assemble_advantages(rollouts, [], AxpoConfig(algorithm="grpo"))
    assert all(s.stream == Stream.ORIGINAL and torch.equal(s.advantages, g.advantages)
               for s, g in zip(samples[:16], grpo))
    for s, want in zip(samples[16:], hand_advantages([1.0, 0.0], [0, 0])):
        assert s.stream == Stream.CONTINUATION
        assert torch.equal(s.loss_mask, s.rollout.trainable)  # every model token: nothing was kept
        assert s.advantages[s.loss_mask].double().unique().tolist() == pytest.approx([float(want)], rel=1e-6)


def test_axpo_shared_group_normalizes_continuations_with_the_whole_group():
    rewards = [0.0] * 5 + [1.0, 1.0, 0.0]  # tool-using 0..4 all wrong; no-tool 5..7
    rollouts = [make_rollout(0, uid, r, 1 if uid < 5 else 0) for uid, r in enumerate(rewards)]
    rollouts += [make_rollout(1, 10 + uid, 0.0, 1) for uid in range(4)]
    conts = [make_continuation(rollouts[2], 100 + k, r) for k, r in enumerate([1.0, 0.0, 0.0, 0.0])]
    conts += [make_continuation(rollouts[0], 110 + k, r) for k, r in enumerate([1.0, 1.0, 0.0, 0.0])]
    conts += [make_continuation(rollouts[8], 120 + k, r) for k, r in enumerate([0.0, 0.0, 0.0, 1.0])]
    shared = assemble_advantages(rollouts, conts, AxpoConfig(algorithm="axpo-shared-group"))
    own = assemble_advantages(rollouts, conts, AxpoConfig())
    for a, b in zip(shared[:12], own[:12]):  # originals and source prefixes: as in AXPO
        assert a.stream == b.stream and torch.equal(a.advantages, b.advantages)
    # group 0: its 8 original rewards and all 8 of its continuations' rewards, one statistic
    union0 = rewards + [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    union1 = [0.0] * 4 + [0.0, 0.0, 0.0, 1.0]
    want = torch.cat([hand_advantages(union0, [0] * 16)[8:], hand_advantages(union1, [1] * 8)[4:]])
    got = torch.stack([s.advantages[s.loss_mask][0] for s in shared[12:]]).double()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, torch.stack([s.advantages[s.loss_mask][0] for s in own[12:]]).double())


@pytest.mark.parametrize("name", [m for m in PAPER if get_method(m).resamples])
def test_every_resampling_method_with_resampling_off_is_grpo(name):
    rollouts = _triggered_batch() + [make_rollout(9, 99 + i, float(i), 1) for i in range(2)]
    off = AxpoConfig(algorithm=name, resample=False)
    assert plan_resample(rollouts, 5, 4, off, seed=0).selected == []
    grpo = assemble_advantages(rollouts, [], AxpoConfig(algorithm="grpo"))
    for a, b in zip(assemble_advantages(rollouts, [], off), grpo):
        assert torch.equal(a.advantages, b.advantages) and torch.equal(a.loss_mask, b.loss_mask)
    with pytest.raises(ValueError, match="continuations must be empty"):
        src = rollouts[0]
        assemble_advantages(rollouts, [make_continuation(src, 500, 1.0)], off)


def test_scale_override_only_for_resampling_methods():
    assert AxpoConfig(algorithm="axpo-no-credit", scale="none").advantage_scale == "none"
    with pytest.raises(ValueError, match="contradicts algorithm='grpo-matched'.*use algorithm='drgrpo'"):
        AxpoConfig(algorithm="grpo-matched", scale="none")
    assert math.isfinite(EPS)
