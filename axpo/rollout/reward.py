"""Final-answer extraction and the rewards (`REWARDS`: name -> reward function factory).

The answer is read from the final model turn after its thinking: a `<think>...</think>` block
(Qwen3 / Qwen3-VL-Thinking write one; the Thinking templates open it in the prompt, so the turn
may hold only its closing tag) is never searched, so a draft `\\boxed{5}` in the reasoning does
not count. Then the last `<answer>...</answer>`, else the last `\\boxed{...}` (one level of nested
braces, e.g. `\\boxed{\\frac{1}{2}}`), else, with free_text=True, the whole text after the
thinking (models that answer in prose), else None: a format error, which scores 0. A turn whose
thinking never closed has no answer.

Rewards, reward(answer, truth) -> float in {0, 1}; no answer or no truth scores 0:
    exact    case and whitespace folded; numbers compared as numbers ("4" == "4.0")
    numeric  the answer's last number (commas, "$", "%" and units around it ignored) within
             `tolerance` of the truth's, relative to max(1, |truth|)
    choice   the multiple-choice letter: "B", "(B)", "B.", "Answer: B", "B) dog" all read as B
"""
from __future__ import annotations

import functools
import re
from typing import Callable

__all__ = ["extract_answer", "exact_match", "numeric_match", "choice_match", "REWARDS", "make_reward"]

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
_END_TOKENS = re.compile(r"(<\|im_end\|>|<\|endoftext\|>)+\s*$")
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")
_CHOICE = re.compile(r"^\(?([A-Za-z])(?:[).:\]]|\s|$)")
_CHOICE_PREFIX = re.compile(r"^(?:the\s+)?(?:correct\s+)?(?:answer|option|choice)(?:\s+is)?\s*[:\-]?\s*", re.I)


def _after_thinking(text: str) -> str | None:
    """The text after the last `</think>`; None if a `<think>` is still open."""
    if "</think>" in text:
        return text[text.rindex("</think>") + len("</think>"):]
    return None if "<think>" in text else text


def extract_answer(text: str, free_text: bool = False) -> str | None:
    """The final answer of a model turn's text (module docstring)."""
    text = _after_thinking(text)
    if text is None:
        return None
    for pattern in (_ANSWER, _BOXED):
        found = pattern.findall(text)
        if found:
            return found[-1].strip()
    if free_text:
        text = _END_TOKENS.sub("", text).strip()
        return text or None
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


def _last_number(text: str) -> float | None:
    found = _NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def numeric_match(answer: str | None, truth: str | None, tolerance: float = 1e-6) -> float:
    """1.0 if the answer's last number is within tolerance * max(1, |truth|) of the truth's."""
    if answer is None or truth is None:
        return 0.0
    a, t = _last_number(answer), _last_number(str(truth))
    if a is None or t is None:
        return 0.0
    return float(abs(a - t) <= tolerance * max(1.0, abs(t)))


def _choice_letter(text: str) -> str | None:
    m = _CHOICE.match(_CHOICE_PREFIX.sub("", text.strip()))
    return m.group(1).upper() if m else None


def choice_match(answer: str | None, truth: str | None) -> float:
    """1.0 if the answer's multiple-choice letter is the truth's."""
    if answer is None or truth is None:
        return 0.0
    a, t = _choice_letter(answer), _choice_letter(str(truth))
    return float(a is not None and a == t)


# name -> factory(tolerance) of reward(answer, truth); config task.reward names one
REWARDS: dict[str, Callable[[float], Callable[[str | None, str | None], float]]] = {
    "exact": lambda tolerance: exact_match,
    "numeric": lambda tolerance: functools.partial(numeric_match, tolerance=tolerance),
    "choice": lambda tolerance: choice_match,
}


def make_reward(name: str, tolerance: float = 1e-6) -> Callable[[str | None, str | None], float]:
    """The reward function registered as `name` in REWARDS."""
    if name not in REWARDS:
        raise ValueError(f"reward must be one of {sorted(REWARDS)}, got {name!r}")
    return REWARDS[name](tolerance)
