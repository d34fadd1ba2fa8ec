"""Argument checks shared by axpo.algo: each error names the argument and what was expected."""
from __future__ import annotations

import math

from ..records import Rollout, Stream


def is_correct(reward: float) -> bool:
    """A rollout counts as correct when its reward is > 0 (binary rewards: reward 1)."""
    return reward > 0


def rollout_list(rollouts, name: str) -> list[Rollout]:
    """A list of Rollout (any iterable accepted), else TypeError naming `name`."""
    if isinstance(rollouts, Rollout) or not hasattr(rollouts, "__iter__"):
        raise TypeError(f"{name} must be a list of Rollout, got {type(rollouts).__name__}")
    out = list(rollouts)
    for i, r in enumerate(out):
        if not isinstance(r, Rollout):
            raise TypeError(f"{name}[{i}] must be a Rollout, got {type(r).__name__}")
    return out


def reward_of(r: Rollout, name: str) -> float:
    """The rollout's reward as a finite float, else ValueError naming the rollout."""
    if r.reward is None:
        raise ValueError(f"{name} (uid={r.uid}, group_id={r.group_id}) has no reward: score it first")
    if isinstance(r.reward, bool) or not isinstance(r.reward, (int, float)) or not math.isfinite(r.reward):
        raise ValueError(f"{name} (uid={r.uid}) reward must be a finite number, got {r.reward!r}")
    return float(r.reward)


def originals(rollouts, name: str) -> list[Rollout]:
    """Rollouts that must all be ORIGINAL, scored, with unique uids."""
    out = rollout_list(rollouts, name)
    seen = set()
    for i, r in enumerate(out):
        if r.stream != Stream.ORIGINAL:
            raise ValueError(f"{name}[{i}] must have stream ORIGINAL, got {r.stream.value!r}")
        reward_of(r, f"{name}[{i}]")
        if r.uid in seen:
            raise ValueError(f"{name}[{i}] uid {r.uid} is not unique: uids identify rollouts within a step")
        seen.add(r.uid)
    return out


def nonneg_int(x, name: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < 0:
        raise ValueError(f"{name} must be an int >= 0, got {x!r}")
    return x


def pos_int(x, name: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < 1:
        raise ValueError(f"{name} must be an int >= 1, got {x!r}")
    return x
