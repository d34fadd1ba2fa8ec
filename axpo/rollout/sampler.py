"""What a rollout engine implements: a `Sampler` samples ONE model turn for a batch of
conversations given as token ids, loads weights, releases retained KV, sleeps. The multi-turn
conversation (prompts, tool calls, tool responses, limits, records, rewards) is the agent loop's
(axpo.rollout.agent_loop.AgentLoop), so a new engine is one sampler file. The pieces every sampler
needs are here, once (the turn's stop rule `TurnStop`, its token budget `turn_budget`, the weight
check `checked_weights`), or on its ChatFormat (end-of-turn ids, tool-call tags, and the vision
placeholders it must never sample, `vision_placeholder_ids`):

    sample_turns(requests, sampling, generator) -> one TurnOutput per TurnRequest
    load_weights(weights)            -> after each trainer update (drops retained KV)
    release()                        -> drop the prefixes' KV kept for resampling
    sleep() / shutdown()             -> free memory while training / for good
"""
from __future__ import annotations

import abc
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import torch

from .chat import ChatFormat

__all__ = ["SamplingSettings", "TurnRequest", "TurnOutput", "Sampler", "TurnStop", "turn_budget",
           "checked_weights"]


@dataclass
class SamplingSettings:
    """temperature: 0 = greedy. The recorded log-probs and entropies are those of
        softmax(logits / temperature) (of softmax(logits) when greedy; top-k / top-p truncation
        is not reflected, as in verl).
    top_k: 0 = off. top_p: 1.0 = off.
    max_new_tokens: per model turn. max_turns: model turns per rollout (each tool call ends one).
    max_total_tokens: the whole conversation (prompt, turns, tool responses).
    seed: None = not reproducible; an int makes generate/resample reproducible for the same
        inputs, weights and batch.
    """
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 256
    max_turns: int = 3
    max_total_tokens: int = 4096
    seed: int | None = None

    def __post_init__(self):
        checks = [("temperature", self.temperature >= 0, "a float >= 0"),
                  ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an int >= 0"),
                  ("top_p", 0 < self.top_p <= 1, "a float in (0, 1]"),
                  ("max_new_tokens", isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "an int >= 1"),
                  ("max_turns", isinstance(self.max_turns, int) and self.max_turns >= 1, "an int >= 1"),
                  ("max_total_tokens", isinstance(self.max_total_tokens, int) and self.max_total_tokens >= 1, "an int >= 1")]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"SamplingSettings.{name} must be {expected}, got {getattr(self, name)!r}")


@dataclass
class TurnRequest:
    """One model turn to sample.

    key: the rollout's uid. token_ids: the whole conversation so far. images: the images whose
    `<|image_pad|>` runs appear in token_ids, in order.
    retain: keep this conversation's KV (its tokens and the turn's) so later requests can fork it.
    fork_from: (key of a retained request, n): token_ids[:n] equal that conversation's first n
        tokens, so an engine may reuse their KV instead of recomputing them.
    in_tool_call: token_ids ends inside an opened `<tool_call>` (a resample prefix), so a
        `</tool_call>` ends the turn even though the opening tag was not sampled in it.
    """
    key: int
    token_ids: list[int]
    images: list = field(default_factory=list)
    retain: bool = False
    fork_from: tuple[int, int] | None = None
    in_tool_call: bool = False


@dataclass
class TurnOutput:
    """The sampled turn. finish: "tool_call" (ended with the closing tag of a call opened in this
    turn), "eos" (end of turn), or "length" (max_new_tokens / max_total_tokens)."""
    token_ids: list[int]
    logprobs: list[float]
    entropies: list[float] | None
    finish: str


Weights = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


class Sampler(abc.ABC):
    """Samples model turns. chat: the ChatFormat whose tokens the conversations are written in
    (its end-of-turn ids and tool-call tags define where a turn stops). stats: counters
    (prefill_tokens, prefill_tokens_saved, generated_tokens, ...)."""

    def __init__(self, chat: ChatFormat):
        self.chat = chat
        self.stats: Counter = Counter()

    @abc.abstractmethod
    def sample_turns(self, requests: Sequence[TurnRequest], sampling: SamplingSettings,
                     generator: torch.Generator | None) -> list[TurnOutput]:
        """Samples one model turn per request: stop where `TurnStop` says, or at `turn_budget`."""

    @abc.abstractmethod
    def load_weights(self, weights: Weights) -> None:
        """Replaces the policy's weights (after a trainer update); drops retained KV."""

    def release(self) -> None:
        """Drops every retained KV (no-op for samplers that keep none)."""

    def sleep(self) -> None:
        """Frees accelerator memory until the next turn or `load_weights` (vLLM's sleep mode;
        no-op for samplers without one). Called between rollout and training."""

    def shutdown(self) -> None:
        """Releases the sampler's resources for good (vLLM's engine and its processes)."""


def turn_budget(request: TurnRequest, sampling: SamplingSettings, max_model_len: int | None = None) -> int:
    """Tokens the turn may sample: max_new_tokens, within max_total_tokens (and the engine's
    max_model_len) for the whole conversation. <= 0: the turn ends at once with "length"."""
    n = len(request.token_ids)
    budget = min(sampling.max_new_tokens, sampling.max_total_tokens - n)
    return budget if max_model_len is None else min(budget, max_model_len - n)


class TurnStop:
    """The stop rule of one model turn, fed the sampled tokens one at a time: an end-of-turn
    token ends it ("eos"); the closing `</tool_call>` ends it ("tool_call") only if a call was
    opened in this turn (or the request's tokens end inside an opened call: a resample prefix),
    so a stray closing tag is ordinary text. The opening tag may straddle the request's last
    tokens and the first sampled ones."""

    def __init__(self, chat: ChatFormat, request: TurnRequest):
        self.eos_ids = chat.eos_ids
        self.open, self.close = list(chat.tool_call_open), list(chat.tool_call_close)
        self.tail = list(request.token_ids[len(request.token_ids) - len(self.open) + 1:]) if len(self.open) > 1 else []
        self.open_seen = request.in_tool_call
        self.tokens: list[int] = []

    def push(self, token: int) -> str | None:
        """Appends a sampled token: "eos" / "tool_call" if it ends the turn, else None."""
        self.tokens.append(token)
        if token in self.eos_ids:
            return "eos"
        if self.open_seen and self.tokens[-len(self.close):] == self.close:
            return "tool_call"
        if not self.open_seen and (self.tail + self.tokens)[-len(self.open):] == self.open:
            self.open_seen = True
        return None


def checked_weights(weights: Weights, shapes: Mapping[str, tuple[int, ...]], where: str = "") -> list[tuple[str, torch.Tensor]]:
    """weights as (name, tensor) pairs, each name one of `shapes` and of that shape; a ValueError
    naming the first unknown name or wrong shape otherwise. where: appended to the unknown-name
    message (e.g. which checkpoint the names come from)."""
    items = list(weights.items() if isinstance(weights, Mapping) else weights)
    unknown = sorted({name for name, _ in items} - set(shapes))
    if unknown:
        raise ValueError(f"weights: unknown parameter names {unknown[:5]}{' ...' if len(unknown) > 5 else ''}{where}")
    for name, value in items:
        if tuple(value.shape) != tuple(shapes[name]):
            raise ValueError(f"weights[{name!r}] must have shape {tuple(shapes[name])}, got {tuple(value.shape)}")
    return items
