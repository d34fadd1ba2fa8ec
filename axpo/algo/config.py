"""AxpoConfig: the knobs of the advantage step for one registered method (axpo.algo.methods)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .methods import SCALES, Method, get_method, method_names

__all__ = ["AxpoConfig", "SCORES", "TIE_BREAKS", "SCALES"]

SCORES = ("confidence", "entropy")
TIE_BREAKS = ("confidence", "group_id")


def _is_number(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)


@dataclass
class AxpoConfig:
    """Configuration of the advantage step.

    algorithm: the name of a registered method (axpo.algo.method_names(): "axpo", "grpo",
        "drgrpo", "grpo-matched", "axpo-random", ...); `method` is its entry.
    resample: for a resampling method; False turns the resample step off, which then gives
        exactly the GRPO advantages (or Dr.GRPO's with scale="none").
    ratio: extra rollouts as a fraction r in [0, 1] of the normal budget B * G (paper: 0.25); for
        grpo-matched, the group grows by that fraction instead.
    k: resamples K per selected prefix (paper: 4).
    score: uncertainty score ranking the candidate prefixes: "confidence" (mean probability of
        the sampled tokens of the first tool-call span; the paper's) or "entropy" (exact mean
        entropy over the same span; needs recorded entropies).
    eps: added to the group std before dividing (all advantage groups: original, Eq. 2, Eq. 4).
    scale: None: the method's ("std" for GRPO and the AXPO variants, "none" for Dr.GRPO). A
        resampling method may set "none" (Dr.GRPO-style AXPO: every group, Eq. 2 and Eq. 4
        included, uses r - mean); for the others it must agree with the method.
    tie_break: (inferred) order of the candidates of one breadth-first round across groups:
        "confidence" (default): most uncertain first, by PrefixCandidate.score (the confidence,
        or the negated entropy with score="entropy"), so a smaller budget keeps the most
        uncertain prefixes; "group_id": by group id. Remaining ties: group id, then uid.
    """
    algorithm: str = "axpo"
    resample: bool = True
    ratio: float = 0.25
    k: int = 4
    score: str = "confidence"
    eps: float = 1e-6
    scale: str | None = None
    tie_break: str = "confidence"

    def __post_init__(self):
        if self.algorithm not in method_names():
            raise ValueError(f"AxpoConfig.algorithm must be one of {list(method_names())}, got {self.algorithm!r}")
        if not isinstance(self.resample, bool):
            raise TypeError(f"AxpoConfig.resample must be a bool, got {self.resample!r}")
        if not _is_number(self.ratio) or not 0 <= self.ratio <= 1:
            raise ValueError(f"AxpoConfig.ratio must be a number in [0, 1], got {self.ratio!r}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"AxpoConfig.k must be an int >= 1, got {self.k!r}")
        if self.score not in SCORES:
            raise ValueError(f"AxpoConfig.score must be one of {SCORES}, got {self.score!r}")
        if not _is_number(self.eps) or self.eps < 0:
            raise ValueError(f"AxpoConfig.eps must be a finite number >= 0, got {self.eps!r}")
        if self.scale is not None and self.scale not in SCALES:
            raise ValueError(f"AxpoConfig.scale must be None or one of {SCALES}, got {self.scale!r}")
        method = self.method
        if self.scale is not None and self.scale != method.scale and not method.resamples:
            same = [m for m in method_names() if get_method(m).scale == self.scale and not get_method(m).resamples]
            raise ValueError(f"AxpoConfig.scale={self.scale!r} contradicts algorithm={self.algorithm!r} "
                             f"(scale {method.scale!r}): use algorithm={same[0] if same else 'another method'!r}")
        if self.tie_break not in TIE_BREAKS:
            raise ValueError(f"AxpoConfig.tie_break must be one of {TIE_BREAKS}, got {self.tie_break!r}")

    @property
    def method(self) -> Method:
        """The registered entry of `algorithm`."""
        return get_method(self.algorithm)

    @property
    def advantage_scale(self) -> str:
        """The `scale` passed to axpo.ops.group_advantages: "std" or "none"."""
        return self.scale if self.scale is not None else self.method.scale

    @property
    def resampling(self) -> bool:
        """Whether the resample step runs (a resampling method with resample on)."""
        return self.method.resamples and self.resample
