"""Step 6: advantages and loss masks of every stream; the baselines; packing."""
from __future__ import annotations

import math

import pytest
import torch

from axpo.algo import STREAM_CODES, AxpoConfig, Stream, assemble_advantages, pack_samples
from tests.algo._build import make_continuation, make_rollout

EPS = 1e-6


def hand_advantages(rewards, group_ids, scale="std", eps=EPS):
    """float64 GRPO / Dr.GRPO advantages, one Python loop per rollout."""
    out = []
    for r, g in zip(rewards, group_ids):
        grp = [x for x, h in zip(rewards, group_ids) if h == g]
        n = len(grp)
        mean = sum(grp) / n
        if n == 1:
            out.append(0.0)
            continue
        if scale == "none":
            out.append(r - mean)
            continue
        std = math.sqrt(sum((x - mean) ** 2 for x in grp) / (n - 1))
        out.append(0.0 if r == mean else (r - mean) / (std + eps))
    return torch.tensor(out, dtype=torch.float64)


def worked_example(recovered: bool):
    rollouts = [make_rollout(0, uid, 0.0, 1) for uid in range(8)]
    rewards = [1.0, 0.0, 0.0, 0.0] if recovered else [0.0] * 4
    conts = [make_continuation(rollouts[3], 100 + k, r) for k, r in enumerate(rewards)]
    return rollouts, conts


def test_worked_example_recovered():
    rollouts, conts = worked_example(True)
    samples = assemble_advantages(rollouts, conts, AxpoConfig())
    assert [s.stream for s in samples] == [Stream.ORIGINAL] * 3 + [Stream.SOURCE_PREFIX] + \
        [Stream.ORIGINAL] * 4 + [Stream.CONTINUATION] * 4
    assert [s.rollout.uid for s in samples] == list(range(8)) + [100, 101, 102, 103]
    source = samples[3]
    p = conts[0].prefix_len
    # rewards become [1,0,...,0]: mean 0.125, unbiased std sqrt(0.125) = 0.3536
    expect = (1 - 0.125) / (math.sqrt(0.125) + EPS)
    assert source.advantages[source.loss_mask].double() == pytest.approx(expect, rel=1e-6)
    assert expect == pytest.approx(2.475, abs=1e-3)
    # source prefix: exactly the model tokens before prefix_len (thinking + `<tool_call>` tag)
    r = source.rollout
    pos = torch.arange(len(r))
    assert torch.equal(source.loss_mask, r.trainable & (pos < p))
    prompt_len = r.prompt_len
    assert source.loss_mask[prompt_len:p].all() and not source.loss_mask[:prompt_len].any()
    assert source.loss_mask.sum() == p - prompt_len
    # continuations: Eq. 2 over [1, 0, 0, 0]: mean 0.25, std 0.5
    for s, want in zip(samples[8:], [1.5, -0.5, -0.5, -0.5]):
        assert s.advantages[s.loss_mask].double() == pytest.approx(want / (1 + 2 * EPS), rel=1e-5)
        c = s.rollout
        assert not s.loss_mask[:p].any()
        assert torch.equal(s.loss_mask, c.trainable & (torch.arange(len(c)) >= p))
        tool = c.turns[2]
        assert tool.role == "tool" and not s.loss_mask[tool.start:tool.end].any()
    # the others keep their (zero) GRPO advantage on all their trainable tokens
    for s in samples[:3] + samples[4:8]:
        assert torch.equal(s.loss_mask, s.rollout.trainable)
        assert not s.advantages.any()
    for s in samples:  # clean tensors: zero off-mask, never on prompt / tool tokens
        assert s.advantages.dtype == torch.float32 and s.loss_mask.dtype == torch.bool
        assert not s.advantages[~s.loss_mask].any()
        assert not (s.loss_mask & ~s.rollout.trainable).any()


def test_worked_example_not_recovered():
    rollouts, conts = worked_example(False)
    samples = assemble_advantages(rollouts, conts, AxpoConfig())
    assert len(samples) == 12 and samples[3].stream == Stream.SOURCE_PREFIX
    for s in samples:
        assert not s.advantages.any()
    assert samples[3].loss_mask.sum() > 0  # still a (zero-advantage) prefix sample


def test_worked_example_drgrpo_style_axpo():
    rollouts, conts = worked_example(True)
    samples = assemble_advantages(rollouts, conts, AxpoConfig(scale="none"))
    assert samples[3].advantages[samples[3].loss_mask].double() == pytest.approx(0.875, rel=1e-6)
    assert not samples[0].advantages.any()  # the others keep their ordinary (all-wrong: 0) advantage
    assert samples[8].advantages[samples[8].loss_mask].double() == pytest.approx(0.75, rel=1e-6)


def test_several_sources_in_one_group_are_independent():
    g0 = [make_rollout(0, uid, 0.0, 1) for uid in range(4)]
    g1 = [make_rollout(1, 10 + i, r, 1 if i % 2 else 0) for i, r in enumerate([1.0, 0.0, 1.0, 1.0, 0.0])]
    conts = [make_continuation(g0[0], 100, 0.0), make_continuation(g0[0], 101, 1.0),
             make_continuation(g0[1], 102, 0.0), make_continuation(g0[1], 103, 0.0),
             make_continuation(g0[1], 104, 0.0)]  # K varies per source (2 and 3)
    rollouts = g0 + g1
    samples = assemble_advantages(rollouts, conts, AxpoConfig())
    adv = [s.advantages[s.loss_mask] for s in samples]
    # source 0 recovered: [1,0,0,0] (NOT [1,0,...] with source 1's replacement too)
    assert adv[0].double() == pytest.approx(hand_advantages([1.0, 0, 0, 0], [0] * 4)[0].item(), rel=1e-6)
    assert adv[0][0].item() == pytest.approx(1.5, rel=1e-5)
    assert not adv[1].any()  # source 1 not recovered: [0,0,0,0] -> 0
    assert samples[0].stream == samples[1].stream == Stream.SOURCE_PREFIX
    # untouched groups: GRPO against float64
    ref = hand_advantages([r.reward for r in rollouts], [r.group_id for r in rollouts])
    for i in range(4, 9):
        assert samples[i].stream == Stream.ORIGINAL
        torch.testing.assert_close(samples[i].advantages[samples[i].loss_mask].double(),
                                   ref[i].expand(int(samples[i].loss_mask.sum())), rtol=1e-6, atol=1e-6)
    # continuations: Eq. 2 per source
    assert adv[9].double() == pytest.approx(-1 / math.sqrt(2) / (1 + EPS * math.sqrt(2)), rel=1e-5)
    assert adv[10].double() == pytest.approx(1 / math.sqrt(2) / (1 + EPS * math.sqrt(2)), rel=1e-5)
    for s in samples[11:]:
        assert not s.advantages.any()


def test_source_with_two_tool_calls_trains_prefix_before_first_call_only():
    rollouts = [make_rollout(0, 0, 0.0, 2), make_rollout(0, 1, 0.0, 1)]
    conts = [make_continuation(rollouts[0], 10, 1.0), make_continuation(rollouts[0], 11, 0.0)]
    s = assemble_advantages(rollouts, conts, AxpoConfig())[0]
    first, second = rollouts[0].tool_calls
    assert s.stream == Stream.SOURCE_PREFIX and conts[0].prefix_len == first.open_end
    assert s.loss_mask[first.start:first.open_end].all()
    assert not s.loss_mask[first.open_end:].any()  # rest of call 1, call 2, the answer: masked
    # Eq. 4 on [r_prefix=1, 0]: mean 0.5, unbiased std sqrt(0.5)
    assert s.advantages[s.loss_mask].double() == pytest.approx(0.5 / (math.sqrt(0.5) + EPS), rel=1e-6)


def _mixed_batch():
    spec = [(0, [0, 0, 1, 0]), (1, [1, 1, 1]), (2, [0, 0, 0, 0, 0]), (3, [1]), (7, [0, 1, 1, 0, 1, 0])]
    out, uid = [], 0
    for g, rewards in spec:
        for i, r in enumerate(rewards):
            out.append(make_rollout(g, uid, float(r), i % 3))
            uid += 1
    perm = torch.randperm(len(out)).tolist()
    return [out[i] for i in perm]


def test_resample_off_equals_grpo_exactly():
    rollouts = _mixed_batch()
    grpo = assemble_advantages(rollouts, [], AxpoConfig(algorithm="grpo"))
    for cfg in (AxpoConfig(resample=False), AxpoConfig()):  # AXPO without continuations too
        axpo = assemble_advantages(rollouts, [], cfg)
        for a, b in zip(axpo, grpo, strict=True):
            assert torch.equal(a.advantages, b.advantages) and torch.equal(a.loss_mask, b.loss_mask)
            assert a.stream == b.stream == Stream.ORIGINAL and a.rollout is b.rollout
    ref = hand_advantages([r.reward for r in rollouts], [r.group_id for r in rollouts])
    for s, want in zip(grpo, ref):
        torch.testing.assert_close(s.advantages[s.loss_mask].double(), want.expand(int(s.loss_mask.sum())),
                                   rtol=1e-6, atol=1e-6)
        assert torch.equal(s.loss_mask, s.rollout.trainable)


def test_drgrpo_is_r_minus_mean():
    rollouts = _mixed_batch()
    samples = assemble_advantages(rollouts, [], AxpoConfig(algorithm="drgrpo"))
    ref = hand_advantages([r.reward for r in rollouts], [r.group_id for r in rollouts], scale="none")
    for s, want in zip(samples, ref):
        torch.testing.assert_close(s.advantages[s.loss_mask].double(), want.expand(int(s.loss_mask.sum())),
                                   rtol=1e-6, atol=1e-7)
    assert any(abs(x) > 0.1 for x in ref.tolist())


def test_continuations_rejected_when_resampling_is_off():
    rollouts, conts = worked_example(True)
    for cfg in (AxpoConfig(resample=False), AxpoConfig(algorithm="grpo"), AxpoConfig(algorithm="drgrpo")):
        with pytest.raises(ValueError, match="continuations"):
            assemble_advantages(rollouts, conts, cfg)


def test_input_validation():
    rollouts, conts = worked_example(True)
    with pytest.raises(ValueError, match="ORIGINAL"):
        assemble_advantages(rollouts + conts[:1], [], AxpoConfig())
    with pytest.raises(ValueError, match="reward"):
        assemble_advantages(rollouts + [make_rollout(0, 50, None, 1)], [], AxpoConfig())
    with pytest.raises(ValueError, match="uid"):
        assemble_advantages(rollouts + [make_rollout(0, 0, 0.0, 1)], [], AxpoConfig())
    orphan = make_continuation(make_rollout(0, 77, 0.0, 1), 200, 1.0)
    with pytest.raises(ValueError, match="source_uid"):
        assemble_advantages(rollouts, [orphan], AxpoConfig())
    wrong_prefix = make_continuation(make_rollout(0, 3, 0.0, 1, seed=12345), 201, 1.0)
    with pytest.raises(ValueError, match="prefix_len"):
        assemble_advantages(rollouts, [wrong_prefix], AxpoConfig())
    unscored = make_continuation(rollouts[3], 202, None)
    with pytest.raises(ValueError, match="reward"):
        assemble_advantages(rollouts, [unscored], AxpoConfig())
    with pytest.raises(TypeError, match="cfg"):
        assemble_advantages(rollouts, [], None)


def test_pack_samples():
    rollouts, conts = worked_example(True)
    samples = assemble_advantages(rollouts, conts, AxpoConfig())
    batch = pack_samples(samples, pad_token_id=-7)
    n, tmax = len(samples), max(len(s.rollout) for s in samples)
    assert batch["input_ids"].shape == (n, tmax) and batch["input_ids"].dtype == torch.int64
    for i, s in enumerate(samples):
        t = len(s.rollout)
        assert torch.equal(batch["input_ids"][i, :t], s.rollout.token_ids)
        assert (batch["input_ids"][i, t:] == -7).all()
        assert batch["attention_mask"][i, :t].all() and not batch["attention_mask"][i, t:].any()
        assert torch.equal(batch["loss_mask"][i, :t], s.loss_mask) and not batch["loss_mask"][i, t:].any()
        assert torch.equal(batch["advantages"][i, :t], s.advantages) and not batch["advantages"][i, t:].any()
        assert torch.equal(batch["old_logprobs"][i, :t], s.rollout.logprobs)
    assert batch["stream"].tolist() == [STREAM_CODES[s.stream] for s in samples]
    assert batch["stream"].tolist().count(STREAM_CODES[Stream.CONTINUATION]) == 4
    assert batch["group_id"].tolist() == [0] * n
    assert batch["advantages"].dtype == torch.float32 and batch["loss_mask"].dtype == torch.bool
    empty = pack_samples([])
    assert empty["input_ids"].shape == (0, 0) and empty["stream"].shape == (0,)
    assert set(empty) == set(batch)
