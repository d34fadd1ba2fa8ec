"""Per-step diagnostics of the AXPO step (the spec's list, those computable from the records).

Rates whose denominator is empty this step are omitted (never NaN); their count keys are always
present. Engine / trainer figures (prefill tokens saved, clip fraction, approx KL, grad norm)
come in through `extra`.
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict

from . import _checks
from ..records import Rollout, Stream
from .selection import ResamplePlan

__all__ = ["step_diagnostics"]


def _mean(xs) -> float:
    return float(sum(xs) / len(xs))


def _call_key(rollout: Rollout) -> tuple:
    """(name, arguments) of the first tool call, arguments canonicalized (key order ignored)."""
    if not rollout.tool_calls:
        return (None, None)
    call = rollout.tool_calls[0]
    return (call.name, json.dumps(call.arguments, sort_keys=True, default=repr))


def step_diagnostics(rollouts, plan: ResamplePlan, continuations=(), extra: dict | None = None) -> dict[str, float]:
    """Scalars to log for one step.

    Args:
        rollouts: the step's ORIGINAL rollouts (scored).
        plan: the step's ResamplePlan (plan_resample).
        continuations: the CONTINUATION rollouts (scored), possibly empty.
        extra: more scalars (engine / trainer), merged in; a key clashing with a computed one is
            a ValueError.
    Returns (all floats; "n_*" are counts):
        n_rollouts, n_groups, tool_call_rate, pass1, n_rollouts_tool, pass1_tool, n_rollouts_no_tool,
        pass1_no_tool, n_groups_tool, all_wrong_rate_tool, n_groups_no_tool, all_wrong_rate_no_tool,
        n_triggered, triggered_frac, n_candidates, prefix_budget, prefixes_selected,
        n_continuations, prefixes_resampled, recovery_rate, triggered_groups_recovered_frac,
        confidence_mean/min/max (over candidates), confidence_selected_mean /
        confidence_rest_mean (over the selected candidates / the others, when there are any),
        entropy_mean/min/max (when every candidate has one), distinct_tool_calls_resampled,
        extra_rollout_tokens, tool_calls, tool_errors/<kind>.
    """
    rollouts = _checks.originals(rollouts, "rollouts")
    continuations = _checks.rollout_list(continuations, "continuations")
    if not isinstance(plan, ResamplePlan):
        raise TypeError(f"plan must be a ResamplePlan, got {type(plan).__name__}")
    for i, c in enumerate(continuations):
        if c.stream != Stream.CONTINUATION:
            raise ValueError(f"continuations[{i}] must have stream CONTINUATION, got {c.stream.value!r}")
        _checks.reward_of(c, f"continuations[{i}]")

    out: dict[str, float] = {}
    tool = [r for r in rollouts if r.uses_tools]
    no_tool = [r for r in rollouts if not r.uses_tools]
    out["n_rollouts"] = float(len(rollouts))
    groups = sorted({r.group_id for r in rollouts})
    out["n_groups"] = float(len(groups))
    if rollouts:
        out["tool_call_rate"] = len(tool) / len(rollouts)
        out["pass1"] = _mean([float(r.reward) for r in rollouts])
    for name, subset in (("tool", tool), ("no_tool", no_tool)):
        out[f"n_rollouts_{name}"] = float(len(subset))
        if subset:
            out[f"pass1_{name}"] = _mean([float(r.reward) for r in subset])
        # all-wrong rate of the subgroup, over the groups that have such a subgroup
        correct_by_group: dict[int, bool] = {}
        for r in subset:
            correct_by_group[r.group_id] = correct_by_group.get(r.group_id, False) or _checks.is_correct(r.reward)
        out[f"n_groups_{name}"] = float(len(correct_by_group))
        if correct_by_group:
            out[f"all_wrong_rate_{name}"] = _mean([0.0 if ok else 1.0 for ok in correct_by_group.values()])

    out["n_triggered"] = float(len(plan.triggered))
    if groups:
        out["triggered_frac"] = len(plan.triggered) / len(groups)
    out["n_candidates"] = float(len(plan.candidates))
    out["prefix_budget"] = float(plan.budget)
    out["prefixes_selected"] = float(len(plan.selected))
    out["n_continuations"] = float(len(continuations))

    cont_of: dict[int, list[Rollout]] = defaultdict(list)
    for c in continuations:
        cont_of[c.source_uid].append(c)
    out["prefixes_resampled"] = float(sum(1 for p in plan.selected if cont_of.get(p.uid)))
    if plan.selected:
        recovered = [p for p in plan.selected if any(_checks.is_correct(c.reward) for c in cont_of.get(p.uid, []))]
        out["recovery_rate"] = len(recovered) / len(plan.selected)
        if plan.triggered:
            out["triggered_groups_recovered_frac"] = len({p.group_id for p in recovered}) / len(plan.triggered)

    if plan.candidates:
        conf = [c.confidence for c in plan.candidates]
        out.update(confidence_mean=_mean(conf), confidence_min=float(min(conf)), confidence_max=float(max(conf)))
        chosen = {c.uid for c in plan.selected}
        for name, subset in (("selected", [c for c in plan.candidates if c.uid in chosen]),
                             ("rest", [c for c in plan.candidates if c.uid not in chosen])):
            if subset:  # the confidence of the prefixes chosen against the candidates left
                out[f"confidence_{name}_mean"] = _mean([c.confidence for c in subset])
        ent = [c.entropy for c in plan.candidates]
        if all(e is not None for e in ent):
            out.update(entropy_mean=_mean(ent), entropy_min=float(min(ent)), entropy_max=float(max(ent)))

    if cont_of:
        out["distinct_tool_calls_resampled"] = _mean(
            [len({_call_key(c) for c in cs}) / len(cs) for cs in cont_of.values()])
    out["extra_rollout_tokens"] = float(sum(len(c) - (c.prefix_len or 0) for c in continuations))

    errors: Counter = Counter()
    n_calls = 0
    for r in rollouts + continuations:
        n_calls += len(r.tool_calls)
        errors.update(call.error for call in r.tool_calls if call.error is not None)
    out["tool_calls"] = float(n_calls)
    for kind, n in sorted(errors.items()):
        out[f"tool_errors/{kind}"] = float(n)

    for key, value in (extra or {}).items():
        if key in out:
            raise ValueError(f"extra key {key!r} clashes with a computed diagnostic")
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"extra[{key!r}] must be a number, got {value!r}") from None
    return {k: float(v) for k, v in out.items()}
