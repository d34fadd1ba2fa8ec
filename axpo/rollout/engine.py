"""The rollout engine interface.

An engine implements ONE model turn for a batch of conversations (`sample_turns`) and weight
loading; the multi-turn agent loop (tool calls, tool responses, rewards) is shared
(axpo.rollout.agent_loop), so a new engine is one new file:

    generate(prompts, sampling, n) -> n rollouts per prompt, with per-token log-probs
    resample(prefixes, k, sampling) -> k continuations per (source rollout, prefix length)
    load_weights(weights)            -> after each trainer update
    release()                        -> drop the prefixes' KV kept for resampling
    sleep() / shutdown()             -> free memory while training / for good
"""
from __future__ import annotations

import abc
import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch

from ..algo.records import Rollout
from ..tools import default_registry
from .chat import ChatFormat
from .reward import exact_match

__all__ = ["SamplingSettings", "Prompt", "TurnRequest", "TurnOutput", "RolloutEngine"]


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
class Prompt:
    """One question: text, images (PIL, shown before the text), the ground truth for the reward,
    and the group id its rollouts get (None: its index in the batch)."""
    question: str
    images: list = field(default_factory=list)
    answer: str | None = None
    group_id: int | None = None
    info: dict = field(default_factory=dict)


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


RewardFn = Callable[[str | None, str | None], float]


class RolloutEngine(abc.ABC):
    """Base of every engine: the agent loop on top of `sample_turns`.

    chat: the ChatFormat (tokenizer, images, tags). tools: an axpo.tools.ToolRegistry (None: the
    built-in default registry). reward_fn(answer, truth) -> float (default: exact match).
    """

    def __init__(self, chat: ChatFormat, *, tools=None, reward_fn: RewardFn | None = None):
        if tools is None:
            tools = default_registry()
        self.chat = chat
        self.tools = tools
        self.reward_fn = reward_fn or exact_match
        self.stats: Counter = Counter()  # prefill_tokens, prefill_tokens_saved, generated_tokens, ...
        self._uids = itertools.count()

    # -- what an engine implements ------------------------------------------------------------
    @abc.abstractmethod
    def sample_turns(self, requests: Sequence[TurnRequest], sampling: SamplingSettings,
                     generator: torch.Generator | None) -> list[TurnOutput]:
        """Samples one model turn per request: stop at an end-of-turn token, at the closing
        `</tool_call>` of a call opened in this turn, or at the length limits."""

    @abc.abstractmethod
    def load_weights(self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replaces the policy's weights (after a trainer update); drops retained KV."""

    def release(self) -> None:
        """Drops every retained KV (no-op for engines that keep none)."""

    def sleep(self) -> None:
        """Frees accelerator memory until the next rollout or `load_weights` (vLLM's sleep mode;
        no-op for engines without one). Called between rollout and training."""

    def shutdown(self) -> None:
        """Releases the engine's resources for good (vLLM's engine and its processes)."""

    def new_uid(self) -> int:
        return next(self._uids)

    def reset_uids(self, start: int = 0, stride: int = 1) -> None:
        """Restarts the uid counter at start, start + stride, ...: data-parallel ranks use
        (rank, world) so uids are unique across ranks and the same in a resumed run."""
        self._uids = itertools.count(start, stride)

    # -- the engine interface -----------------------------------------------------------------
    def generate(self, prompts: Sequence[Prompt], sampling: SamplingSettings, n: int,
                 *, retain_prefixes: bool = True) -> list[Rollout]:
        """n rollouts per prompt (grouped: prompt i's rollouts are [i*n, (i+1)*n)), scored.
        retain_prefixes: keep their first turn's KV for `resample`, until `release` or the next
        `generate` (which releases the previous batch's first)."""
        from .agent_loop import run_generate
        self.release()
        return run_generate(self, prompts, sampling, n, retain_prefixes)

    def resample(self, prefixes: Sequence[tuple[Rollout, int]], k: int,
                 sampling: SamplingSettings) -> list[list[Rollout]]:
        """k continuations of each (source rollout, prefix_len), from the fixed prefix
        source.token_ids[:prefix_len]; tools run as in a normal rollout; scored. Returned rollouts
        have stream CONTINUATION, source_uid and prefix_len set, the source's group_id."""
        from .agent_loop import run_resample
        return run_resample(self, prefixes, k, sampling)
