"""AXPO steps 1-4: trigger, candidate prefixes, uncertainty scores, budget, breadth-first selection.

A group triggers when its tool-using subgroup (ORIGINAL rollouts with >= 1 tool call) is
non-empty and all wrong (reward <= 0), whatever its no-tool rollouts scored. Each tool-using
rollout of a triggered group is a candidate source; its prefix is cut right after the opening
`<tool_call>` tag of its first tool call. Candidates are ranked most uncertain first and
allocated breadth-first across groups under the budget P = floor(r * B * G / K).

The method (axpo.algo.methods) picks the order (lowest confidence first, or a seeded random one)
and the cut of the selected prefixes (after the first `<tool_call>` tag, or the prompt's end for
fresh rollouts from the prompt).
"""
from __future__ import annotations

import dataclasses
import math
import random
from collections import defaultdict
from dataclasses import dataclass, field
from fractions import Fraction

import torch
from torch import Tensor

from axpo.ops import token_logprob_entropy

from . import _checks
from .config import TIE_BREAKS, AxpoConfig
from ..records import Rollout, Stream

__all__ = [
    "PrefixCandidate", "ResamplePlan", "triggered_groups", "span_confidence", "span_mean_entropy",
    "entropy_from_logits", "candidate_prefixes", "prefix_budget", "select_prefixes", "plan_resample",
]


def triggered_groups(rollouts) -> list[int]:
    """Group ids (sorted) whose tool-using subgroup is non-empty and entirely wrong.

    Args:
        rollouts: Rollout list; only Stream.ORIGINAL ones count, and each must have a reward.
    Returns:
        sorted list of group ids.
    """
    rollouts = _checks.rollout_list(rollouts, "rollouts")
    has_tool_use: set[int] = set()
    any_tool_correct: set[int] = set()
    for i, r in enumerate(rollouts):
        if r.stream != Stream.ORIGINAL:
            continue
        reward = _checks.reward_of(r, f"rollouts[{i}]")
        if r.uses_tools:
            has_tool_use.add(r.group_id)
            if _checks.is_correct(reward):
                any_tool_correct.add(r.group_id)
    return sorted(has_tool_use - any_tool_correct)


def _call_span(rollout: Rollout, call_index: int) -> tuple[int, int]:
    if not isinstance(rollout, Rollout):
        raise TypeError(f"rollout must be a Rollout, got {type(rollout).__name__}")
    if isinstance(call_index, bool) or not isinstance(call_index, int):
        raise TypeError(f"call_index must be an int, got {type(call_index).__name__}")
    if not 0 <= call_index < len(rollout.tool_calls):
        raise ValueError(f"call_index must be in [0, {len(rollout.tool_calls)}) (the rollout's tool calls; "
                         f"uid={rollout.uid}), got {call_index}")
    call = rollout.tool_calls[call_index]
    return call.start, call.end


def span_confidence(rollout: Rollout, call_index: int = 0) -> float:
    """Mean probability exp(logprob) of the sampled tokens of one tool-call span.

    The span is [start, end) of rollout.tool_calls[call_index], `<tool_call>` and `</tool_call>`
    tags included; read from rollout.logprobs [T] (the sampling log-probs). Returns a float in
    (0, 1] for finite log-probs.
    """
    start, end = _call_span(rollout, call_index)
    return float(rollout.logprobs[start:end].double().exp().mean())


def span_mean_entropy(rollout: Rollout, call_index: int = 0) -> float | None:
    """Mean of rollout.entropies [T] over the same span as span_confidence; None without entropies."""
    start, end = _call_span(rollout, call_index)
    if rollout.entropies is None:
        return None
    return float(rollout.entropies[start:end].double().mean())


def entropy_from_logits(logits: Tensor, labels: Tensor, spans) -> Tensor:
    """Per-span mean entropy from logits, through the fused axpo.ops.token_logprob_entropy.

    For callers that have logits (e.g. a trainer forward) but recorded no entropies. No gradient.

    Args:
        logits: [N, V] float; row t is the distribution token t was sampled from (for a causal LM,
            the logits at position t - 1: shift before calling).
        labels: [N] int64 token ids (the op needs them; the entropy does not depend on them).
        spans: list of (start, end) with 0 <= start < end <= N.
    Returns:
        [len(spans)] float32: mean entropy over each span.
    """
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [N, V], got shape {tuple(logits.shape)}")
    n = logits.shape[0]
    bounds = []
    for i, span in enumerate(spans):
        try:
            start, end = span
        except (TypeError, ValueError):
            raise TypeError(f"spans[{i}] must be a (start, end) pair, got {span!r}") from None
        if (isinstance(start, bool) or isinstance(end, bool) or not isinstance(start, int)
                or not isinstance(end, int) or not 0 <= start < end <= n):
            raise ValueError(f"spans[{i}] must be ints with 0 <= start < end <= {n} (logits rows), got {span!r}")
        bounds.append((start, end))
    with torch.no_grad():
        _, entropy = token_logprob_entropy(logits, labels)
    if not bounds:
        return torch.zeros(0, dtype=torch.float32, device=logits.device)
    # prefix sums in fp64: each span's mean is one subtraction, no loop over tokens
    csum = torch.zeros(n + 1, dtype=torch.float64, device=logits.device)
    csum[1:] = torch.cumsum(entropy.detach().double(), 0)
    se = torch.tensor(bounds, dtype=torch.int64, device=logits.device)
    return ((csum[se[:, 1]] - csum[se[:, 0]]) / (se[:, 1] - se[:, 0])).to(torch.float32)


@dataclass(frozen=True)
class PrefixCandidate:
    """A candidate source rollout and its prefix.

    group_id, uid: the source rollout's.
    prefix_len: tool_calls[0].open_end: the prefix is tokens [0, prefix_len), cut right after the
        first `<tool_call>` opening tag (plan_resample sets the prompt's length instead for a
        method that resamples from the prompt).
    confidence: span_confidence of the first tool call.
    entropy: span_mean_entropy of the first tool call, None without recorded entropies.
    score: the ranking key, LOWEST = MOST UNCERTAIN: the confidence (score="confidence"), or the
        negated mean entropy (score="entropy").
    """
    group_id: int
    uid: int
    prefix_len: int
    confidence: float
    entropy: float | None
    score: float


def candidate_prefixes(rollouts, groups, score: str = "confidence") -> list[PrefixCandidate]:
    """Every tool-using ORIGINAL rollout of the given groups, as a PrefixCandidate (input order).

    Args:
        rollouts: Rollout list (non-ORIGINAL ones are ignored).
        groups: group ids (usually triggered_groups(rollouts)).
        score: "confidence" | "entropy" (needs rollout.entropies).
    """
    rollouts = _checks.rollout_list(rollouts, "rollouts")
    if score not in ("confidence", "entropy"):
        raise ValueError(f"score must be 'confidence' or 'entropy', got {score!r}")
    wanted = set(groups)
    out = []
    for i, r in enumerate(rollouts):
        if r.stream != Stream.ORIGINAL or r.group_id not in wanted or not r.uses_tools:
            continue
        confidence = span_confidence(r)
        entropy = span_mean_entropy(r)
        if not math.isfinite(confidence) or (entropy is not None and not math.isfinite(entropy)):
            raise ValueError(f"rollouts[{i}] (uid={r.uid}) has non-finite log-probs or entropies "
                             "in its first tool-call span")
        if score == "entropy":
            if entropy is None:
                raise ValueError(f"score='entropy' needs per-token entropies but rollouts[{i}] (uid={r.uid}) "
                                 "has entropies=None: record entropies in the rollout engine, compute them "
                                 "with axpo.algo.entropy_from_logits, or use score='confidence'")
            key = -entropy
        else:
            key = confidence
        out.append(PrefixCandidate(group_id=r.group_id, uid=r.uid, prefix_len=r.tool_calls[0].open_end,
                                   confidence=confidence, entropy=entropy, score=key))
    return out


def prefix_budget(num_questions: int, group_size: int, k: int, ratio: float) -> int:
    """P = floor(ratio * num_questions * group_size / k), the number of prefixes per batch.

    The ratio is read as the decimal it prints as (Fraction(repr(ratio))), so that e.g.
    0.3 * 10 * 4 / 4 is 3, not floor(2.9999999999999996).
    """
    _checks.nonneg_int(num_questions, "num_questions")
    _checks.pos_int(group_size, "group_size")
    _checks.pos_int(k, "k")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio < 0:
        raise ValueError(f"ratio must be a finite number >= 0, got {ratio!r}")
    return math.floor(Fraction(repr(ratio)) * num_questions * group_size / k)


def select_prefixes(candidates, budget: int, *, tie_break: str = "confidence") -> list[PrefixCandidate]:
    """Breadth-first selection of at most `budget` candidates, in selection order.

    Round 1 takes each group's most uncertain candidate (lowest score), round 2 each group's
    second, and so on; within a round, groups are ordered by that candidate's score
    (tie_break="confidence") or by group id (tie_break="group_id"); remaining ties by group id,
    then uid. Deterministic.

    Args:
        candidates: PrefixCandidate list, uids unique.
        budget: int >= 0.
    Returns:
        min(budget, len(candidates)) candidates.
    """
    _checks.nonneg_int(budget, "budget")
    if tie_break not in TIE_BREAKS:
        raise ValueError(f"tie_break must be one of {TIE_BREAKS}, got {tie_break!r}")
    by_group: dict[int, list[PrefixCandidate]] = defaultdict(list)
    uids = set()
    for i, c in enumerate(candidates):
        if not isinstance(c, PrefixCandidate):
            raise TypeError(f"candidates[{i}] must be a PrefixCandidate, got {type(c).__name__}")
        if c.uid in uids:
            raise ValueError(f"candidates[{i}] uid {c.uid} is not unique")
        if not math.isfinite(c.score):
            raise ValueError(f"candidates[{i}] score must be finite, got {c.score!r}")
        uids.add(c.uid)
        by_group[c.group_id].append(c)
    queues = [sorted(cs, key=lambda c: (c.score, c.uid)) for cs in by_group.values()]
    if tie_break == "confidence":
        def order(c): return (c.score, c.group_id, c.uid)
    else:
        def order(c): return (c.group_id, c.uid)
    selected: list[PrefixCandidate] = []
    depth = 0
    while len(selected) < budget:
        round_ = sorted((q[depth] for q in queues if depth < len(q)), key=order)
        if not round_:
            break
        selected.extend(round_[: budget - len(selected)])
        depth += 1
    return selected


@dataclass
class ResamplePlan:
    """What the AXPO step resamples this batch.

    triggered: sorted triggered group ids.
    candidates: every candidate source of those groups (input order).
    budget: P (0 when resampling is off).
    selected: the chosen candidates, in selection order; K continuations each from
        token_ids[:prefix_len] of the source (for a method resampling from the prompt, prefix_len
        is the source's prompt length).
    """
    triggered: list[int] = field(default_factory=list)
    candidates: list[PrefixCandidate] = field(default_factory=list)
    budget: int = 0
    selected: list[PrefixCandidate] = field(default_factory=list)


def plan_resample(rollouts, num_questions: int, group_size: int, cfg: AxpoConfig, *,
                  seed: int | None = None) -> ResamplePlan:
    """Steps 1-4 on the scored ORIGINAL rollouts of a batch.

    Args:
        rollouts: Rollout list (ORIGINAL ones count), all scored.
        num_questions: B, questions in the batch; group_size: G, rollouts per question.
        cfg: AxpoConfig (method, ratio, k, score, tie_break).
        seed: the random order of a method with selection="random" (required there; a function
            of the step keeps runs reproducible); unused otherwise.
    Returns:
        ResamplePlan. With resampling off (a method without a resample step, or resample=False)
        the triggered groups and candidates are still filled in (for diagnostics) but budget is 0
        and nothing is selected. Candidates keep their confidence / entropy whatever the order.
    """
    if not isinstance(cfg, AxpoConfig):
        raise TypeError(f"cfg must be an AxpoConfig, got {type(cfg).__name__}")
    budget = prefix_budget(num_questions, group_size, cfg.k, cfg.ratio)
    triggered = triggered_groups(rollouts)
    candidates = candidate_prefixes(rollouts, triggered, score=cfg.score)
    if not cfg.resampling:
        return ResamplePlan(triggered=triggered, candidates=candidates, budget=0, selected=[])
    method = cfg.method
    ranked = candidates
    if method.selection == "random":
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int for method {method.name!r} (random prefix selection), got {seed!r}")
        rng = random.Random(seed)
        keys = {uid: rng.random() for uid in sorted(c.uid for c in candidates)}
        ranked = [dataclasses.replace(c, score=keys[c.uid]) for c in candidates]
    selected = select_prefixes(ranked, budget, tie_break=cfg.tie_break)
    if method.selection == "random":  # the records keep their real scores
        real = {c.uid: c for c in candidates}
        selected = [real[c.uid] for c in selected]
    if method.resample == "prompt":
        prompt_len = {r.uid: r.prompt_len for r in rollouts if r.stream == Stream.ORIGINAL}
        selected = [dataclasses.replace(c, prefix_len=prompt_len[c.uid]) for c in selected]
    return ResamplePlan(triggered=triggered, candidates=candidates, budget=budget, selected=selected)
