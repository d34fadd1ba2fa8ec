"""The plain records every layer shares: a question (`Prompt`) goes into the agent loop, a scored
`Rollout` comes out, and `axpo.algo`, the trainer and the integrations consume it. No engine, no
tokenizer, no I/O: this module imports nothing of axpo.

Token-level layout of one rollout:

    [ prompt (trainable 0) | model turn 1 (1) | tool response 1 (0) | model turn 2 (1) | ... ]

`logprobs[t]` is the sampling log-probability of token t for model tokens and 0.0 elsewhere;
`entropies[t]` (optional) the sampling distribution's entropy at token t, same convention.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["Prompt", "Stream", "Turn", "ToolCallRecord", "Rollout"]


@dataclass
class Prompt:
    """One question: text, images (PIL, shown before the text), the ground truth for the reward,
    and the group id its rollouts get (None: its index in the batch)."""
    question: str
    images: list = field(default_factory=list)
    answer: str | None = None
    group_id: int | None = None
    info: dict = field(default_factory=dict)


class Stream(str, enum.Enum):
    """Which stream of the AXPO step a rollout (or a training sample) belongs to."""
    ORIGINAL = "original"            # a normal rollout of its group
    SOURCE_PREFIX = "source_prefix"  # a selected source: only its prefix is trained (Eq. 4)
    CONTINUATION = "continuation"    # a resample from a fixed prefix: only the continuation is trained (Eq. 2)


@dataclass(frozen=True)
class Turn:
    """Tokens [start, end) of one turn. role: "prompt" | "model" | "tool"."""
    role: str
    start: int
    end: int


@dataclass
class ToolCallRecord:
    """One tool call of a rollout.

    start, end: token span [start, end) from the first token of the `<tool_call>` tag to one past
        the last token of `</tool_call>` (both tags included: the confidence-score span).
    open_end: one past the last token of the opening `<tool_call>` tag (the AXPO prefix cut).
    name, arguments: the parsed call (None when the call could not be parsed).
    result: the text returned to the model (the tool's output or the error message).
    error: None, or the error kind (see axpo.tools.ERROR_KINDS).
    num_images: images the tool returned (inserted into the next turn).
    """
    start: int
    end: int
    open_end: int
    name: str | None = None
    arguments: dict | None = None
    result: str = ""
    error: str | None = None
    num_images: int = 0


def _as_1d(x, dtype: torch.dtype, name: str) -> Tensor:
    t = x if isinstance(x, Tensor) else torch.as_tensor(x, dtype=dtype)
    if t.dim() != 1:
        raise ValueError(f"Rollout.{name} must be 1-D, got shape {tuple(t.shape)}")
    return t.to(dtype)


@dataclass
class Rollout:
    """One rollout (one stream) with everything the AXPO step and the trainer need.

    token_ids: int64 [T], the whole conversation (prompt + every turn).
    logprobs: float32 [T], the sampled tokens' log-probs (0.0 on non-model tokens).
    trainable: bool [T], True on model-generated tokens only.
    turns: the turns in order (prompt, model, tool, model, ...).
    tool_calls: every tool call, in order.
    images: the images of the conversation in order (the prompt's, then those tools returned).
    reward: the scalar reward (None until scored).
    group_id: the question's group.
    stream: see `Stream`.
    uid: unique id of this rollout within a step.
    source_uid: for CONTINUATION / SOURCE_PREFIX: the uid of the source rollout.
    prefix_len: for CONTINUATION / SOURCE_PREFIX: tokens [0, prefix_len) are the fixed prefix
        (prompt + model tokens up to and including the first `<tool_call>` opening tag).
    entropies: float32 [T] or None, the sampling entropy per model token.
    answer: the extracted final answer (None when there is none).
    finish_reason: "stop" (end of turn with an answer), "length", or "max_turns".
    info: free-form extras (e.g. the question, the ground truth).
    """
    token_ids: Tensor
    logprobs: Tensor
    trainable: Tensor
    group_id: int
    uid: int = 0
    turns: list[Turn] = field(default_factory=list)
    tool_calls: list[ToolCallRecord] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)
    reward: float | None = None
    stream: Stream = Stream.ORIGINAL
    source_uid: int | None = None
    prefix_len: int | None = None
    entropies: Tensor | None = None
    answer: str | None = None
    finish_reason: str = "stop"
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        self.token_ids = _as_1d(self.token_ids, torch.int64, "token_ids")
        self.logprobs = _as_1d(self.logprobs, torch.float32, "logprobs")
        self.trainable = _as_1d(self.trainable, torch.bool, "trainable")
        n = self.token_ids.shape[0]
        for name in ("logprobs", "trainable"):
            if getattr(self, name).shape[0] != n:
                raise ValueError(f"Rollout.{name} must have {n} entries like token_ids, "
                                 f"got {getattr(self, name).shape[0]}")
        if self.entropies is not None:
            self.entropies = _as_1d(self.entropies, torch.float32, "entropies")
            if self.entropies.shape[0] != n:
                raise ValueError(f"Rollout.entropies must have {n} entries like token_ids, "
                                 f"got {self.entropies.shape[0]}")
        self.stream = Stream(self.stream)
        for i, c in enumerate(self.tool_calls):
            if not (0 <= c.start < c.open_end <= c.end <= n):
                raise ValueError(f"Rollout.tool_calls[{i}] span (start={c.start}, open_end={c.open_end}, "
                                 f"end={c.end}) must satisfy 0 <= start < open_end <= end <= {n}")
        if self.prefix_len is not None and not (0 < self.prefix_len <= n):
            raise ValueError(f"Rollout.prefix_len must be in (0, {n}], got {self.prefix_len}")

    def __len__(self) -> int:
        return self.token_ids.shape[0]

    @property
    def uses_tools(self) -> bool:
        return len(self.tool_calls) > 0

    @property
    def prompt_len(self) -> int:
        return self.turns[0].end if self.turns and self.turns[0].role == "prompt" else 0
