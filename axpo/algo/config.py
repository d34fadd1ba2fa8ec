"""AxpoConfig: the knobs of the AXPO step (and of the GRPO / Dr.GRPO baselines it must match)."""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["AxpoConfig", "ALGORITHMS", "SCORES", "TIE_BREAKS", "SCALES"]

ALGORITHMS = ("axpo", "grpo", "drgrpo")
SCORES = ("confidence", "entropy")
TIE_BREAKS = ("confidence", "group_id")
SCALES = ("std", "none")


def _is_number(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)


@dataclass
class AxpoConfig:
    """Configuration of the advantage step.

    algorithm: "axpo" (GRPO advantages plus the resample step), "grpo" (std-normalized group
        advantages), or "drgrpo" (Dr.GRPO: r - mean, no std scaling).
    resample: AXPO only; False turns the resample step off, which then gives exactly the GRPO
        advantages (or Dr.GRPO's with scale="none").
    ratio: extra rollouts as a fraction r of the normal budget B * G (paper: 0.25).
    k: resamples K per selected prefix (paper: 4).
    score: uncertainty score ranking the candidate prefixes: "confidence" (mean probability of
        the sampled tokens of the first tool-call span; the paper's) or "entropy" (exact mean
        entropy over the same span; needs recorded entropies).
    eps: added to the group std before dividing (all advantage groups: original, Eq. 2, Eq. 4).
    scale: None: "std" for "grpo" and "axpo", "none" for "drgrpo". For "axpo" it may be set
        to "none" (Dr.GRPO-style AXPO: every group, Eq. 2 and Eq. 4 included, uses r - mean);
        for "grpo" / "drgrpo" it must agree with the algorithm.
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
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"AxpoConfig.algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if not isinstance(self.resample, bool):
            raise TypeError(f"AxpoConfig.resample must be a bool, got {self.resample!r}")
        if not _is_number(self.ratio) or self.ratio < 0:
            raise ValueError(f"AxpoConfig.ratio must be a finite number >= 0, got {self.ratio!r}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"AxpoConfig.k must be an int >= 1, got {self.k!r}")
        if self.score not in SCORES:
            raise ValueError(f"AxpoConfig.score must be one of {SCORES}, got {self.score!r}")
        if not _is_number(self.eps) or self.eps < 0:
            raise ValueError(f"AxpoConfig.eps must be a finite number >= 0, got {self.eps!r}")
        if self.scale is not None and self.scale not in SCALES:
            raise ValueError(f"AxpoConfig.scale must be None or one of {SCALES}, got {self.scale!r}")
        if self.algorithm == "grpo" and self.scale == "none":
            raise ValueError("AxpoConfig.scale='none' contradicts algorithm='grpo' (std-normalized): "
                             "use algorithm='drgrpo'")
        if self.algorithm == "drgrpo" and self.scale == "std":
            raise ValueError("AxpoConfig.scale='std' contradicts algorithm='drgrpo' (no std scaling): "
                             "use algorithm='grpo'")
        if self.tie_break not in TIE_BREAKS:
            raise ValueError(f"AxpoConfig.tie_break must be one of {TIE_BREAKS}, got {self.tie_break!r}")

    @property
    def advantage_scale(self) -> str:
        """The `scale` passed to axpo.ops.group_advantages: "std" or "none"."""
        if self.scale is not None:
            return self.scale
        return "none" if self.algorithm == "drgrpo" else "std"

    @property
    def resampling(self) -> bool:
        """Whether the AXPO resample step runs (algorithm "axpo" with resample on)."""
        return self.algorithm == "axpo" and self.resample
