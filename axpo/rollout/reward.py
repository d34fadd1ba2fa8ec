"""Final-answer extraction and the default reward (binary exact match)."""
from __future__ import annotations

import re

__all__ = ["extract_answer", "exact_match"]

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def extract_answer(text: str) -> str | None:
    """The last `<answer>...</answer>` of the final turn, else the last `\\boxed{...}`, else None
    (a format error, which scores 0)."""
    for pattern in (_ANSWER, _BOXED):
        found = pattern.findall(text)
        if found:
            return found[-1].strip()
    return None


def _normalize(s: str) -> str:
    return " ".join(s.strip().lower().split())


def exact_match(answer: str | None, truth: str | None) -> float:
    """1.0 if the answer equals the ground truth (case and whitespace folded; numbers compared as
    numbers, so "4" == "4.0"), else 0.0. No answer or no ground truth: 0.0."""
    if answer is None or truth is None:
        return 0.0
    a, t = _normalize(answer), _normalize(str(truth))
    if a == t:
        return 1.0
    try:
        return float(float(a) == float(t))
    except ValueError:
        return 0.0
