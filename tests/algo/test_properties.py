"""Property tests on random batches: selection, masks, advantages against float64 hand values."""
from __future__ import annotations

import math
from collections import Counter, defaultdict

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from axpo.algo import AxpoConfig, Stream, assemble_advantages, plan_resample
from tests.algo._build import make_continuation, make_rollout
from tests.algo.test_advantages import hand_advantages

SETTINGS = settings(max_examples=40, deadline=None)

call_spec = st.fixed_dictionaries({"open_len": st.integers(1, 3), "body_len": st.integers(0, 3),
                                   "close_len": st.integers(1, 2)})
rollout_spec = st.tuples(st.sampled_from([0.0, 1.0]), st.lists(call_spec, max_size=2),
                         st.integers(1, 3), st.integers(0, 2))  # reward, calls, prompt_len, think_len
batch_spec = st.lists(st.lists(rollout_spec, min_size=1, max_size=6), min_size=1, max_size=5)


def build(groups, seed):
    rollouts, uid = [], 0
    for g, members in enumerate(groups):
        for reward, calls, prompt_len, think_len in members:
            rollouts.append(make_rollout(3 * g + 1, uid, reward, calls, prompt_len=prompt_len,
                                         think_len=think_len, seed=seed + uid))
            uid += 1
    return rollouts


@SETTINGS
@given(groups=batch_spec, ratio=st.sampled_from([0.0, 0.25, 0.5, 1.0]), k=st.integers(1, 4),
       seed=st.integers(0, 10**6))
def test_selection_properties(groups, ratio, k, seed):
    rollouts = build(groups, seed)
    cfg = AxpoConfig(ratio=ratio, k=k)
    plan = plan_resample(rollouts, len(groups), max(len(m) for m in groups), cfg)
    triggered = set(plan.triggered)
    for g in triggered:  # trigger rule
        tool = [r for r in rollouts if r.group_id == g and r.uses_tools]
        assert tool and all(r.reward == 0 for r in tool)
    assert {c.group_id for c in plan.candidates} == triggered
    assert len(plan.selected) == min(plan.budget, len(plan.candidates))
    # breadth-first: the round of each selection never decreases; within a group, lowest score first
    seen = Counter()
    rounds, last_score = [], {}
    for c in plan.selected:
        rounds.append(seen[c.group_id])
        seen[c.group_id] += 1
        assert c.score >= last_score.get(c.group_id, -math.inf)
        last_score[c.group_id] = c.score
    assert rounds == sorted(rounds)
    if len(plan.selected) >= len(triggered):
        assert set(seen) == triggered
    for c in plan.selected:
        r = next(x for x in rollouts if x.uid == c.uid)
        assert c.prefix_len == r.tool_calls[0].open_end


@SETTINGS
@given(groups=batch_spec, data=st.data(), seed=st.integers(0, 10**6))
def test_advantage_properties(groups, data, seed):
    rollouts = build(groups, seed)
    plan = plan_resample(rollouts, len(groups), 8, AxpoConfig(ratio=1.0, k=2))
    by_uid = {r.uid: r for r in rollouts}
    conts, uid = [], 1000
    for c in plan.selected:
        for reward in data.draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=0, max_size=4)):
            conts.append(make_continuation(by_uid[c.uid], uid, reward, seed=seed + uid))
            uid += 1
    samples = assemble_advantages(rollouts, conts, AxpoConfig())
    grpo = assemble_advantages(rollouts, [], AxpoConfig(algorithm="grpo"))
    axpo_plain = assemble_advantages(rollouts, [], AxpoConfig())
    assert all(torch.equal(a.advantages, b.advantages) and torch.equal(a.loss_mask, b.loss_mask)
               for a, b in zip(axpo_plain, grpo, strict=True))

    cont_of = defaultdict(list)
    for c in conts:
        cont_of[c.source_uid].append(c)
    assert len(samples) == len(rollouts) + len(conts)
    rewards = [r.reward for r in rollouts]
    gids = [r.group_id for r in rollouts]
    ref = hand_advantages(rewards, gids)
    for i, (s, r) in enumerate(zip(samples, rollouts)):
        assert s.rollout is r
        if r.uid in cont_of:
            assert s.stream == Stream.SOURCE_PREFIX
            r_prefix = float(any(c.reward > 0 for c in cont_of[r.uid]))
            want = hand_advantages([r_prefix if j == i else x for j, x in enumerate(rewards)], gids)[i]
        else:
            assert s.stream == Stream.ORIGINAL
            assert torch.equal(s.loss_mask, r.trainable)
            want = ref[i]
        torch.testing.assert_close(s.advantages[s.loss_mask].double(), want.expand(int(s.loss_mask.sum())),
                                   rtol=1e-5, atol=1e-5)
    for s in samples[len(rollouts):]:
        assert s.stream == Stream.CONTINUATION
        sibling = cont_of[s.rollout.source_uid]
        j = next(n for n, c in enumerate(sibling) if c is s.rollout)
        want = hand_advantages([c.reward for c in sibling], [0] * len(sibling))[j]
        torch.testing.assert_close(s.advantages[s.loss_mask].double(), want.expand(int(s.loss_mask.sum())),
                                   rtol=1e-5, atol=1e-5)
    # masks partition each source's tokens: prefix trained by the source, the rest by each continuation
    source_samples = {s.rollout.uid: s for s in samples if s.stream == Stream.SOURCE_PREFIX}
    for src_uid, cs in cont_of.items():
        src = source_samples[src_uid]
        p = cs[0].prefix_len
        assert torch.equal(src.loss_mask[:p], src.rollout.trainable[:p]) and not src.loss_mask[p:].any()
        for c, s in ((c, next(x for x in samples if x.rollout is c)) for c in cs):
            assert not s.loss_mask[:p].any() and torch.equal(s.loss_mask[p:], c.trainable[p:])
    for s in samples:
        assert torch.isfinite(s.advantages).all()
        assert not s.advantages[~s.loss_mask].any()
        assert not (s.loss_mask & ~s.rollout.trainable).any()
