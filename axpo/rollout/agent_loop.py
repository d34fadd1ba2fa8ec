"""The multi-turn tool agent loop: `AgentLoop` over a `Sampler` is a rollout engine.

    engine = AgentLoop(sampler, tools=registry, reward_fn=exact_match)
    generate(prompts, sampling, n) -> n rollouts per prompt, with per-token log-probs
    resample(prefixes, k, sampling) -> k continuations per (source rollout, prefix length)
    load_weights / release / sleep / shutdown -> the sampler's

The loop owns the conversation (prompts and tool-response turns through the sampler's
ChatFormat, the tool calls, the turn and length limits, the records, answers and rewards); a
sampler only samples model turns, so a new engine is one Sampler subclass.

Each round asks the sampler for one model turn of every unfinished rollout, then, per rollout:
a turn that ends with `</tool_call>` has the call between the tags parsed and run (any failure is
returned to the model as an error message, never raised), the tool's response (text and images)
is appended as a new, untrained turn and the rollout continues, up to `max_turns` model turns; a
turn that ends with end-of-turn finishes the rollout, whose final answer is extracted and scored.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..records import Prompt, Rollout, Stream, ToolCallRecord, Turn
from ..tools import ToolContext, default_registry
from .chat import valid_text
from .reward import exact_match, extract_answer
from .sampler import Sampler, SamplingSettings, TurnOutput, TurnRequest, Weights

__all__ = ["AgentLoop", "RewardFn"]

RewardFn = Callable[[str | None, str | None], float]


@dataclass
class _Episode:
    uid: int
    group_id: int
    tokens: list[int]
    logprobs: list[float]
    entropies: list[float]
    trainable: list[bool]
    turns: list[Turn]
    images: list
    info: dict
    turn_start: int                      # first token of the model turn in progress
    model_turns: int = 0
    tool_calls: list[ToolCallRecord] = field(default_factory=list)
    stream: Stream = Stream.ORIGINAL
    source_uid: int | None = None
    prefix_len: int | None = None
    retain: bool = False                 # next request keeps its KV (first turn of an original)
    fork_from: tuple[int, int] | None = None
    in_tool_call: bool = False           # the tokens end inside an opened <tool_call> (resample prefix)
    done: bool = False
    finish_reason: str = "stop"
    answer: str | None = None
    has_entropy: bool = True


def _find_last(seq: list[int], tag: tuple[int, ...], lo: int, hi: int) -> int:
    """Start of the last occurrence of `tag` fully inside seq[lo:hi], or -1."""
    n = len(tag)
    for i in range(hi - n, lo - 1, -1):
        if tuple(seq[i:i + n]) == tag:
            return i
    return -1


def _generator(sampling: SamplingSettings) -> torch.Generator | None:
    return None if sampling.seed is None else torch.Generator().manual_seed(int(sampling.seed))


class AgentLoop:
    """A rollout engine: the conversation logic over a sampler of model turns.

    sampler: an axpo.rollout Sampler (TransformersSampler, VllmSampler, or your own).
    tools: an axpo.tools.ToolRegistry (None: the built-in default registry).
    reward_fn(answer, truth) -> float (default: exact match; axpo.rollout.reward.REWARDS has others).
    answer_fn(final turn's text) -> the answer or None (default: extract_answer; e.g.
        functools.partial(extract_answer, free_text=True) for models answering in prose).
    """

    def __init__(self, sampler: Sampler, *, tools=None, reward_fn: RewardFn | None = None,
                 answer_fn: Callable[[str], str | None] | None = None):
        if not isinstance(sampler, Sampler):
            raise TypeError(f"sampler must be an axpo.rollout.Sampler, got {type(sampler).__name__}")
        self.sampler = sampler
        self.tools = default_registry() if tools is None else tools
        self.reward_fn = reward_fn or exact_match
        self.answer_fn = answer_fn or extract_answer
        self._uids = itertools.count()

    @property
    def chat(self):
        return self.sampler.chat

    @property
    def stats(self):
        return self.sampler.stats

    def load_weights(self, weights: Weights) -> None:
        """Replaces the policy's weights (after a trainer update); drops retained KV."""
        self.sampler.load_weights(weights)

    def release(self) -> None:
        self.sampler.release()

    def sleep(self) -> None:
        self.sampler.sleep()

    def shutdown(self) -> None:
        self.sampler.shutdown()

    def new_uid(self) -> int:
        return next(self._uids)

    def reset_uids(self, start: int = 0, stride: int = 1) -> None:
        """Restarts the uid counter at start, start + stride, ...: data-parallel ranks use
        (rank, world) so uids are unique across ranks and the same in a resumed run."""
        self._uids = itertools.count(start, stride)

    def generate(self, prompts: Sequence[Prompt], sampling: SamplingSettings, n: int,
                 *, retain_prefixes: bool = True) -> list[Rollout]:
        """n rollouts per prompt (grouped: prompt i's rollouts are [i*n, (i+1)*n)), scored.
        retain_prefixes: keep their first turn's KV for `resample`, until `release` or the next
        `generate` (which releases the previous batch's first)."""
        self.release()
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        episodes = []
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, Prompt):
                raise TypeError(f"prompts[{i}] must be an axpo.rollout.Prompt, got {type(prompt).__name__}")
            ids = self.chat.prompt(prompt.question, prompt.images)
            group_id = i if prompt.group_id is None else int(prompt.group_id)
            info = dict(prompt.info, question=prompt.question, truth=prompt.answer, num_prompt_images=len(prompt.images))
            for _ in range(n):
                episodes.append(_Episode(uid=self.new_uid(), group_id=group_id, tokens=list(ids),
                                         logprobs=[0.0] * len(ids), entropies=[0.0] * len(ids),
                                         trainable=[False] * len(ids), turns=[Turn("prompt", 0, len(ids))],
                                         images=list(prompt.images), info=info, turn_start=len(ids),
                                         retain=retain_prefixes))
        self._run(episodes, sampling)
        return [self._to_rollout(ep) for ep in episodes]

    def resample(self, prefixes: Sequence[tuple[Rollout, int]], k: int,
                 sampling: SamplingSettings) -> list[list[Rollout]]:
        """k continuations of each (source rollout, prefix_len), from the fixed prefix
        source.token_ids[:prefix_len]; tools run as in a normal rollout; scored. Returned rollouts
        have stream CONTINUATION, source_uid and prefix_len set, the source's group_id."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        groups = []
        for i, item in enumerate(prefixes):
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], Rollout)):
                raise TypeError(f"prefixes[{i}] must be a (Rollout, prefix_len) pair, got {type(item).__name__}")
            groups.append([self._prefix_episode(item[0], item[1], i) for _ in range(k)])
        self._run([ep for g in groups for ep in g], sampling)
        return [[self._to_rollout(ep) for ep in g] for g in groups]

    def _append_turn(self, ep: _Episode, out: TurnOutput, sampling: SamplingSettings) -> None:
        chat = self.chat
        ep.tokens += out.token_ids
        ep.logprobs += out.logprobs
        ep.trainable += [True] * len(out.token_ids)
        if out.entropies is None:
            ep.has_entropy = False
            ep.entropies += [0.0] * len(out.token_ids)
        else:
            ep.entropies += out.entropies
        end = len(ep.tokens)
        ep.turns.append(Turn("model", ep.turn_start, end))
        ep.model_turns += 1
        if out.finish == "eos":
            ep.done, ep.finish_reason = True, "stop"
            ep.answer = self.answer_fn(chat.turn_opening + chat.decode(ep.tokens[ep.turn_start:end]))
            return
        if out.finish != "tool_call":
            ep.done, ep.finish_reason = True, "length"
            return
        close_start = end - len(chat.tool_call_close)
        open_start = _find_last(ep.tokens, chat.tool_call_open, ep.turn_start, close_start)
        if open_start < 0:  # a sampler contract violation, not model behaviour
            raise RuntimeError("sampler reported finish='tool_call' but the turn has no opening <tool_call> tag")
        open_end = open_start + len(chat.tool_call_open)
        result = self.tools.execute(chat.decode(ep.tokens[open_end:close_start]), ToolContext(images=list(ep.images)))
        new_images = list(result.images)
        text = result.text
        if new_images and chat.image_processor is None:
            text += f"\n[{len(new_images)} image(s) omitted: this model reads text only]"
            new_images = []
        call = result.call
        text = valid_text(text)  # model-written strings may hold lone surrogates (JSON escapes)
        ep.tool_calls.append(ToolCallRecord(start=open_start, end=end, open_end=open_end,
                                            name=valid_text(call.name) if call is not None else None,
                                            arguments=dict(call.arguments) if call is not None else None,
                                            result=text, error=result.error, num_images=len(new_images)))
        if ep.model_turns >= sampling.max_turns:
            ep.done, ep.finish_reason = True, "max_turns"
            return
        response = chat.tool_response(text, new_images)
        start = len(ep.tokens)
        ep.tokens += response
        ep.logprobs += [0.0] * len(response)
        ep.entropies += [0.0] * len(response)
        ep.trainable += [False] * len(response)
        ep.turns.append(Turn("tool", start, len(ep.tokens)))
        ep.images += new_images
        ep.turn_start = len(ep.tokens)
        if len(ep.tokens) >= sampling.max_total_tokens:
            ep.done, ep.finish_reason = True, "length"

    def _run(self, episodes: list[_Episode], sampling: SamplingSettings) -> None:
        generator = _generator(sampling)
        while True:
            active = [ep for ep in episodes if not ep.done]
            if not active:
                return
            requests = [TurnRequest(ep.uid, list(ep.tokens), list(ep.images), retain=ep.retain,
                                    fork_from=ep.fork_from, in_tool_call=ep.in_tool_call) for ep in active]
            outputs = self.sampler.sample_turns(requests, sampling, generator)
            if len(outputs) != len(requests):
                raise RuntimeError(f"sampler returned {len(outputs)} turns for {len(requests)} requests")
            for ep, out in zip(active, outputs):
                ep.retain, ep.fork_from, ep.in_tool_call = False, None, False
                self._append_turn(ep, out, sampling)

    def _to_rollout(self, ep: _Episode) -> Rollout:
        reward = float(self.reward_fn(ep.answer, ep.info.get("truth")))
        return Rollout(token_ids=ep.tokens, logprobs=ep.logprobs, trainable=ep.trainable, group_id=ep.group_id,
                       uid=ep.uid, turns=list(ep.turns), tool_calls=list(ep.tool_calls), images=list(ep.images),
                       reward=reward, stream=ep.stream, source_uid=ep.source_uid, prefix_len=ep.prefix_len,
                       entropies=ep.entropies if ep.has_entropy else None, answer=ep.answer,
                       finish_reason=ep.finish_reason, info=dict(ep.info))

    def _prefix_episode(self, source: Rollout, prefix_len: int, index: int) -> _Episode:
        n = len(source)
        if isinstance(prefix_len, bool) or not isinstance(prefix_len, int) or not 0 < prefix_len <= n:
            raise ValueError(f"prefixes[{index}]: prefix_len must be an int in (0, {n}], got {prefix_len!r}")
        num_images = int(source.info.get("num_prompt_images", len(source.images)))
        if prefix_len == source.prompt_len:  # a fresh rollout of the question (reusing the prompt's KV)
            return _Episode(uid=self.new_uid(), group_id=source.group_id, tokens=source.token_ids[:prefix_len].tolist(),
                            logprobs=[0.0] * prefix_len, entropies=[0.0] * prefix_len, trainable=[False] * prefix_len,
                            turns=[source.turns[0]], images=list(source.images[:num_images]), info=dict(source.info),
                            turn_start=prefix_len, stream=Stream.CONTINUATION, source_uid=source.uid,
                            prefix_len=prefix_len, fork_from=(source.uid, prefix_len))
        turn = next((t for t in source.turns if t.start < prefix_len <= t.end), None)
        if turn is None or turn.role != "model" or prefix_len == turn.end:
            raise ValueError(f"prefixes[{index}]: prefix_len {prefix_len} must be the prompt's length "
                             f"({source.prompt_len}) or cut inside a model turn of rollout uid={source.uid} (AXPO cuts "
                             f"right after the first <tool_call> tag)")
        turns = [t for t in source.turns if t.end <= turn.start]
        # images shown before the cut: the prompt's, plus those of tool turns before it
        num_images += sum(c.num_images for c in source.tool_calls if c.end <= turn.start)
        ent = source.entropies
        return _Episode(uid=self.new_uid(), group_id=source.group_id,
                        tokens=source.token_ids[:prefix_len].tolist(), logprobs=source.logprobs[:prefix_len].tolist(),
                        entropies=ent[:prefix_len].tolist() if ent is not None else [0.0] * prefix_len,
                        trainable=source.trainable[:prefix_len].tolist(), turns=turns,
                        images=list(source.images[:num_images]), info=dict(source.info), turn_start=turn.start,
                        model_turns=sum(t.role == "model" for t in turns),
                        tool_calls=[c for c in source.tool_calls if c.end <= turn.start],
                        stream=Stream.CONTINUATION, source_uid=source.uid, prefix_len=prefix_len,
                        fork_from=(source.uid, prefix_len), has_entropy=ent is not None,
                        in_tool_call=_find_last(source.token_ids[:prefix_len].tolist(), self.chat.tool_call_open,
                                                turn.start, prefix_len) >= 0)
