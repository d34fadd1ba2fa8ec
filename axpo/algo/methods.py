"""The RL methods, one registered entry each: what a method means is declared here and nowhere else.

A `Method` says how group advantages are scaled, how the policy loss aggregates, how many
rollouts a question gets, and whether and how the AXPO step resamples: from which cut (after the
first `<tool_call>` tag, or from the prompt), which prefixes (lowest confidence first, or at
random), whether the source gets the Eq. 4 prefix credit, and in which group the continuations
are normalized. Selection (`plan_resample`), advantages (`assemble_advantages`) and the trainer
read these fields; config validation, the command line and `axpo compare` list their choices
with `method_names()`. A new variant is one `register_method(Method(...))` plus its test.

Entries: grpo, drgrpo, axpo, and the paper's control and ablations: grpo-matched (GRPO with
AXPO's rollout budget spent on larger groups), axpo-random, axpo-no-credit, axpo-no-fix,
axpo-shared-group.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from axpo.ops.reference_policy_loss import AGG_MODES as LOSS_AGGS  # axpo.ops.policy_loss's `agg`

__all__ = ["Method", "register_method", "get_method", "method_names", "SCALES", "LOSS_AGGS", "RESAMPLE_FROM",
           "SELECTIONS", "CONTINUATION_GROUPS"]

SCALES = ("std", "none")
RESAMPLE_FROM = ("tool_call", "prompt")
SELECTIONS = ("uncertainty", "random")
CONTINUATION_GROUPS = ("own", "original")


@dataclass(frozen=True)
class Method:
    """One RL method.

    name: the registry key (rl.algorithm, --methods).
    summary: one line for help texts and reports.
    scale: group advantages: "std" ((r - mean) / (std + eps), GRPO) or "none" (r - mean, Dr.GRPO).
    loss_agg: the default aggregation of axpo.ops.policy_loss (rl.loss_agg overrides it).
    matched_group: GRPO with the AXPO budget spent on larger groups: G * (1 + ratio) rollouts
        per question (rounded half up), no resample step.
    resample: None (no resample step), or where the K resamples of a selected source start:
        "tool_call" (AXPO: the fixed prefix ends right after its first `<tool_call>` tag) or
        "prompt" (fresh rollouts of the triggered question: nothing of the source is kept).
    selection: which candidate sources get the budget: "uncertainty" (lowest confidence / highest
        entropy first, breadth-first over groups) or "random" (a seeded random order, still
        breadth-first).
    prefix_credit: Eq. 3-4: the source's prefix tokens are trained with the group advantage
        recomputed with its reward replaced by r_prefix, its failed continuation masked out.
        False: the source stays an ordinary rollout with its GRPO advantage.
    continuation_group: "own" (Eq. 2: normalized over the K resamples of the same source) or
        "original" (normalized with the statistics of the source's whole group: its original
        rollouts plus every resample of that group; the originals keep their own advantages).
    """
    name: str
    summary: str
    scale: str = "std"
    loss_agg: str = "token-mean"
    matched_group: bool = False
    resample: str | None = None
    selection: str = "uncertainty"
    prefix_credit: bool = True
    continuation_group: str = "own"

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or self.name != self.name.strip():
            raise ValueError(f"Method.name must be a non-empty string without surrounding spaces, got {self.name!r}")
        for field, value, options in (("scale", self.scale, SCALES), ("loss_agg", self.loss_agg, LOSS_AGGS),
                                      ("resample", self.resample, (None,) + RESAMPLE_FROM),
                                      ("selection", self.selection, SELECTIONS),
                                      ("continuation_group", self.continuation_group, CONTINUATION_GROUPS)):
            if value not in options:
                raise ValueError(f"Method {self.name!r}: {field} must be one of {list(options)}, got {value!r}")
        if not isinstance(self.matched_group, bool) or not isinstance(self.prefix_credit, bool):
            raise TypeError(f"Method {self.name!r}: matched_group and prefix_credit must be bools")
        if self.matched_group and self.resample is not None:
            raise ValueError(f"Method {self.name!r}: matched_group spends the budget on larger groups, "
                             "so it cannot also resample (resample must be None)")
        if self.resample == "prompt" and self.prefix_credit:
            raise ValueError(f"Method {self.name!r}: resample='prompt' keeps no prefix to credit: "
                             "prefix_credit must be False")

    @property
    def resamples(self) -> bool:
        return self.resample is not None

    def group_size(self, group_size: int, ratio: float) -> int:
        """Rollouts per question: G, or round(G * (1 + ratio)) for matched_group (ratio read as the
        decimal it prints as, as prefix_budget does)."""
        if not self.matched_group:
            return group_size
        return math.floor(Fraction(group_size) * (1 + Fraction(repr(ratio))) + Fraction(1, 2))


_METHODS: dict[str, Method] = {}


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Adds `method` to the registry under method.name (an existing name needs replace=True)."""
    if not isinstance(method, Method):
        raise TypeError(f"method must be an axpo.algo.Method, got {type(method).__name__}")
    if method.name in _METHODS and not replace:
        raise ValueError(f"a method named {method.name!r} is already registered (pass replace=True to redefine it)")
    _METHODS[method.name] = method
    return method


def method_names() -> tuple[str, ...]:
    """The registered method names, in registration order."""
    return tuple(_METHODS)


def get_method(name: str) -> Method:
    """The registered method called `name`; a ValueError listing the registered ones otherwise."""
    if not isinstance(name, str) or name not in _METHODS:
        raise ValueError(f"method must be one of {list(_METHODS)}, got {name!r}")
    return _METHODS[name]


register_method(Method("grpo", "GRPO: std-normalized group advantages, token-mean loss"))
register_method(Method("drgrpo", "Dr.GRPO: r - mean (no std), token sums over a constant length",
                       scale="none", loss_agg="seq-mean-token-sum-norm"))
register_method(Method("axpo", "AXPO: GRPO plus K resamples of the lowest-confidence failed tool calls "
                               "from their fixed thinking prefix (Eq. 2-4)", resample="tool_call"))
register_method(Method("grpo-matched", "GRPO with AXPO's extra budget as larger groups: G * (1 + r) rollouts "
                                       "per question", matched_group=True))
register_method(Method("axpo-random", "AXPO with prefixes chosen at random instead of lowest confidence first",
                       resample="tool_call", selection="random"))
register_method(Method("axpo-no-credit", "AXPO without the Eq. 4 prefix credit: the source keeps its GRPO "
                                         "advantage", resample="tool_call", prefix_credit=False))
register_method(Method("axpo-no-fix", "AXPO's budget spent on fresh rollouts of the triggered questions from the "
                                      "prompt (no fixed prefix)", resample="prompt", prefix_credit=False))
register_method(Method("axpo-shared-group", "AXPO with the continuations normalized inside the original group "
                                            "instead of their own", resample="tool_call",
                       continuation_group="original"))
