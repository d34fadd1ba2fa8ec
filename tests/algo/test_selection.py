"""Steps 1-4: trigger, uncertainty scores, candidates, budget, breadth-first selection."""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from axpo.algo import (AxpoConfig, PrefixCandidate, candidate_prefixes, entropy_from_logits, plan_resample,
                       prefix_budget, select_prefixes, span_confidence, span_mean_entropy, triggered_groups)
from tests.algo._build import make_continuation, make_rollout


def test_triggered_groups_cases():
    rollouts = [
        # group 0: tool-using subgroup all wrong -> triggers
        make_rollout(0, 0, 0.0, 1), make_rollout(0, 1, 0.0, 2), make_rollout(0, 2, 0.0),
        # group 1: no tool use at all -> never triggers, even all wrong
        make_rollout(1, 3, 0.0), make_rollout(1, 4, 0.0),
        # group 2: all correct
        make_rollout(2, 5, 1.0, 1), make_rollout(2, 6, 1.0),
        # group 3: tool users all wrong, no-tool rollouts correct -> still triggers
        make_rollout(3, 7, 0.0, 1), make_rollout(3, 8, 1.0), make_rollout(3, 9, 1.0),
        # group 4: one tool user correct -> no
        make_rollout(4, 10, 0.0, 1), make_rollout(4, 11, 1.0, 1),
    ]
    # a continuation (not ORIGINAL) with a wrong tool call must not make group 2 trigger
    cont = make_continuation(rollouts[5], 99, 0.0)
    assert triggered_groups(rollouts + [cont]) == [0, 3]
    assert triggered_groups(list(reversed(rollouts))) == [0, 3]
    assert triggered_groups([]) == []


def test_triggered_groups_needs_rewards():
    with pytest.raises(ValueError, match="reward"):
        triggered_groups([make_rollout(0, 0, 0.0, 1), make_rollout(0, 1, None, 1)])
    with pytest.raises(TypeError, match="rollouts"):
        triggered_groups(make_rollout(0, 0, 0.0, 1))


def test_span_confidence_first_call_only():
    r = make_rollout(0, 0, 0.0, [{"logprob": math.log(0.2)}, {"logprob": math.log(0.9)}])
    assert span_confidence(r) == pytest.approx(0.2, abs=1e-6)
    assert span_confidence(r, 1) == pytest.approx(0.9, abs=1e-6)
    # random log-probs: the plain mean of exp over [start, end), tags included
    r = make_rollout(0, 1, 0.0, 2)
    c = r.tool_calls[0]
    expect = r.logprobs[c.start:c.end].double().exp().mean().item()
    assert span_confidence(r) == pytest.approx(expect, rel=1e-12)
    assert span_mean_entropy(r) == pytest.approx(r.entropies[c.start:c.end].double().mean().item(), rel=1e-12)
    with pytest.raises(ValueError, match="call_index"):
        span_confidence(r, 2)
    assert span_mean_entropy(make_rollout(0, 2, 0.0, 1, entropies=False)) is None


def test_candidates_cut_after_first_open_tag():
    r = make_rollout(0, 0, 0.0, [{"logprob": math.log(0.3), "open_len": 3}, {"logprob": math.log(0.01)}])
    (cand,) = candidate_prefixes([r], [0])
    assert cand.prefix_len == r.tool_calls[0].open_end == r.tool_calls[0].start + 3
    assert cand.prefix_len < r.tool_calls[1].start
    assert cand.confidence == pytest.approx(0.3, abs=1e-6)  # the second, less confident call is ignored
    assert cand.score == cand.confidence
    # only tool-using rollouts of the given groups
    others = [make_rollout(0, 1, 0.0), make_rollout(1, 2, 0.0, 1)]
    assert [c.uid for c in candidate_prefixes([r] + others, [0])] == [0]


def test_entropy_score_is_negated_entropy():
    lo = make_rollout(0, 0, 0.0, [{"entropy": 0.5}])
    hi = make_rollout(1, 1, 0.0, [{"entropy": 2.0}])
    cands = candidate_prefixes([lo, hi], [0, 1], score="entropy")
    assert [c.score for c in cands] == pytest.approx([-0.5, -2.0])
    assert [c.uid for c in select_prefixes(cands, 1)] == [1]  # most uncertain = highest entropy
    with pytest.raises(ValueError, match="entropy_from_logits"):
        candidate_prefixes([make_rollout(0, 0, 0.0, 1, entropies=False)], [0], score="entropy")


def test_prefix_budget_exact():
    assert prefix_budget(4, 8, 4, 0.25) == 2
    assert prefix_budget(1, 8, 4, 0.25) == 0  # floor(0.5)
    assert prefix_budget(128, 8, 4, 0.25) == 64
    assert prefix_budget(10, 4, 4, 0.3) == 3  # 0.3 * 10 is 2.9999999999999996 in floats
    assert prefix_budget(0, 8, 4, 0.25) == 0
    for ratio in (0.1, 0.2, 0.3, 0.7, 0.15, 1.1):
        for b in range(1, 30):
            assert prefix_budget(b, 8, 4, ratio) == math.floor(Fraction(str(ratio)) * b * 8 / 4)


@pytest.mark.parametrize("args, name", [
    ((-1, 8, 4, 0.25), "num_questions"), ((4, 0, 4, 0.25), "group_size"), ((4, 8, 0, 0.25), "k"),
    ((4, 8, 4, -0.1), "ratio"), ((4, 8, 4, float("nan")), "ratio"), ((4.0, 8, 4, 0.25), "num_questions"),
])
def test_prefix_budget_validation(args, name):
    with pytest.raises(ValueError, match=name):
        prefix_budget(*args)


def _grid(scores: dict[int, list[float]]) -> list[PrefixCandidate]:
    out, uid = [], 0
    for g, ss in scores.items():
        for s in ss:
            out.append(PrefixCandidate(group_id=g, uid=uid, prefix_len=5, confidence=s, entropy=None, score=s))
            uid += 1
    return out


def test_breadth_first_across_groups():
    # group lowests: 0.5 (g0), 0.2 (g1), 0.4 (g2); second round: 0.6 (g0), 0.3 (g1), 0.45 (g2)
    cands = _grid({0: [0.9, 0.5, 0.6], 1: [0.3, 0.2, 0.8], 2: [0.4, 0.45, 0.95]})
    sel = select_prefixes(cands, 4)
    assert [c.confidence for c in sel] == [0.2, 0.4, 0.5, 0.3]
    assert [c.group_id for c in sel] == [1, 2, 0, 1]
    assert select_prefixes(cands, 0) == []
    full = select_prefixes(cands, 100)
    assert len(full) == 9 and {c.uid for c in full} == {c.uid for c in cands}
    assert [c.confidence for c in full] == [0.2, 0.4, 0.5, 0.3, 0.45, 0.6, 0.8, 0.9, 0.95]
    # the round order across groups by group id instead
    assert [c.group_id for c in select_prefixes(cands, 4, tie_break="group_id")] == [0, 1, 2, 0]
    assert select_prefixes(list(reversed(cands)), 4) == sel  # input order does not matter


def test_selection_ties_are_deterministic():
    cands = _grid({3: [0.5, 0.5], 1: [0.5], 2: [0.5]})
    assert [(c.group_id, c.uid) for c in select_prefixes(cands, 4)] == [(1, 2), (2, 3), (3, 0), (3, 1)]


def test_select_validation():
    cands = _grid({0: [0.5]})
    with pytest.raises(ValueError, match="budget"):
        select_prefixes(cands, -1)
    with pytest.raises(ValueError, match="tie_break"):
        select_prefixes(cands, 1, tie_break="random")
    with pytest.raises(ValueError, match="uid"):
        select_prefixes(cands + cands, 1)


def test_plan_resample():
    rollouts = [make_rollout(g, 10 * g + i, 0.0, [{"logprob": math.log(0.1 * (i + 1) + 0.05 * g)}])
                for g in range(3) for i in range(4)]
    plan = plan_resample(rollouts, 3, 4, AxpoConfig(ratio=0.5, k=2))  # P = floor(0.5*3*4/2) = 3
    assert plan.triggered == [0, 1, 2] and plan.budget == 3 and len(plan.candidates) == 12
    assert [c.uid for c in plan.selected] == [0, 10, 20]
    for cfg in (AxpoConfig(resample=False), AxpoConfig(algorithm="grpo"), AxpoConfig(algorithm="drgrpo")):
        off = plan_resample(rollouts, 3, 4, cfg)
        assert off.selected == [] and off.budget == 0 and off.triggered == [0, 1, 2]


def test_entropy_from_logits_matches_float64():
    logits = torch.randn(7, 11) * 3
    labels = torch.randint(0, 11, (7,))
    spans = [(0, 1), (2, 7), (0, 7), (4, 6)]
    out = entropy_from_logits(logits, labels, spans)
    p = torch.softmax(logits.double(), -1)
    ent = -(p * p.log()).sum(-1)
    expect = torch.stack([ent[s:e].mean() for s, e in spans])
    assert out.dtype == torch.float32 and out.shape == (4,)
    torch.testing.assert_close(out.double(), expect, rtol=1e-5, atol=1e-6)
    assert entropy_from_logits(logits, labels, []).shape == (0,)
    with pytest.raises(ValueError, match="spans"):
        entropy_from_logits(logits, labels, [(3, 3)])
    with pytest.raises(ValueError, match="spans"):
        entropy_from_logits(logits, labels, [(0, 8)])
    with pytest.raises(ValueError, match="logits"):
        entropy_from_logits(logits[None], labels, [(0, 1)])


@pytest.mark.parametrize("kw, name", [
    (dict(algorithm="ppo"), "algorithm"), (dict(ratio=-1.0), "ratio"), (dict(k=0), "k"),
    (dict(score="margin"), "score"), (dict(eps=-1e-6), "eps"), (dict(scale="mad"), "scale"),
    (dict(tie_break="random"), "tie_break"), (dict(algorithm="drgrpo", scale="std"), "scale"),
    (dict(algorithm="grpo", scale="none"), "scale"), (dict(resample=1), "resample"),
])
def test_config_validation(kw, name):
    with pytest.raises((ValueError, TypeError), match=name):
        AxpoConfig(**kw)


def test_config_scale():
    assert AxpoConfig().advantage_scale == "std"
    assert AxpoConfig(algorithm="grpo").advantage_scale == "std"
    assert AxpoConfig(algorithm="drgrpo").advantage_scale == "none"
    assert AxpoConfig(scale="none").advantage_scale == "none"
    assert AxpoConfig().resampling and not AxpoConfig(resample=False).resampling
    assert not AxpoConfig(algorithm="grpo").resampling
