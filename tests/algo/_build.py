"""Rollout builders for the axpo.algo tests: realistic token layouts without an engine.

Layout of make_rollout (each call ends its model turn; a tool turn follows it):
    [prompt | think, <tool_call> body </tool_call> | tool response | think, <tool_call> ... | think, answer]
Model tokens are trainable with random log-probs in [-2, -0.05); prompt and tool tokens are not
and have log-prob 0.
"""
from __future__ import annotations

import torch

from axpo.records import Rollout, Stream, ToolCallRecord, Turn

VOCAB = 50


class _Writer:
    """Appends token segments, keeping ids, log-probs, entropies and the trainable mask."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)
        self.ids, self.lps, self.ents, self.train = [], [], [], []

    @property
    def pos(self) -> int:
        return len(self.ids)

    def add(self, n: int, model: bool, logprob: float | None = None, entropy: float | None = None):
        self.ids += torch.randint(0, VOCAB, (n,), generator=self.gen).tolist()
        if model:
            lp = (torch.rand(n, generator=self.gen) * -1.95 - 0.05).tolist() if logprob is None else [logprob] * n
            ent = (torch.rand(n, generator=self.gen) * 3).tolist() if entropy is None else [entropy] * n
        else:
            lp, ent = [0.0] * n, [0.0] * n
        self.lps += lp
        self.ents += ent
        self.train += [model] * n

    def call(self, spec: dict) -> ToolCallRecord:
        """Writes one tool call (open tag, body, close tag); spec keys: name, arguments, error,
        open_len, body_len, close_len, logprob, entropy (constants over the span)."""
        start = self.pos
        kw = dict(logprob=spec.get("logprob"), entropy=spec.get("entropy"))
        self.add(spec.get("open_len", 2), True, **kw)
        open_end = self.pos
        self.add(spec.get("body_len", 3), True, **kw)
        self.add(spec.get("close_len", 2), True, **kw)
        return ToolCallRecord(start=start, end=self.pos, open_end=open_end, name=spec.get("name", "zoom"),
                              arguments=spec.get("arguments", {"x": 1}), result="ok", error=spec.get("error"))


def make_rollout(group_id: int, uid: int, reward: float | None, calls=(), *, prompt_len: int = 3,
                 think_len: int = 2, tool_len: int = 2, answer_len: int = 2, entropies: bool = True,
                 seed: int | None = None) -> Rollout:
    """An ORIGINAL rollout; `calls` is a list of tool-call specs (see _Writer.call) or an int count."""
    if isinstance(calls, int):
        calls = [{} for _ in range(calls)]
    w = _Writer(seed if seed is not None else 1000 * group_id + uid)
    turns, records = [], []
    w.add(prompt_len, False)
    turns.append(Turn("prompt", 0, w.pos))
    for spec in calls:
        start = w.pos
        w.add(think_len, True)
        records.append(w.call(spec))
        turns.append(Turn("model", start, w.pos))
        start = w.pos
        w.add(tool_len, False)
        turns.append(Turn("tool", start, w.pos))
    start = w.pos
    w.add(think_len, True)
    w.add(answer_len, True)
    turns.append(Turn("model", start, w.pos))
    return Rollout(token_ids=w.ids, logprobs=w.lps, trainable=w.train, group_id=group_id, uid=uid,
                   turns=turns, tool_calls=records, reward=reward,
                   entropies=w.ents if entropies else None)


def make_continuation(source: Rollout, uid: int, reward: float | None, call: dict | None = None, *,
                      tool_len: int = 2, answer_len: int = 3, seed: int | None = None) -> Rollout:
    """A CONTINUATION of `source` from its prefix (cut after the first `<tool_call>` opening tag):
    the rest of the tool call (body + close tag), a tool response, then a final answer turn."""
    call = call or {}
    first = source.tool_calls[0]
    p = first.open_end
    w = _Writer(seed if seed is not None else 7919 * uid + 13)
    w.ids = source.token_ids[:p].tolist()
    w.lps = source.logprobs[:p].tolist()
    w.ents = (source.entropies[:p].tolist() if source.entropies is not None else [0.0] * p)
    w.train = source.trainable[:p].tolist()
    kw = dict(logprob=call.get("logprob"), entropy=call.get("entropy"))
    w.add(call.get("body_len", 3), True, **kw)
    w.add(call.get("close_len", 2), True, **kw)
    record = ToolCallRecord(start=first.start, end=w.pos, open_end=p, name=call.get("name", "zoom"),
                            arguments=call.get("arguments", {"x": 1}), result="ok", error=call.get("error"))
    model_start = source.turns[1].start
    turns = [source.turns[0], Turn("model", model_start, w.pos)]
    start = w.pos
    w.add(tool_len, False)
    turns.append(Turn("tool", start, w.pos))
    start = w.pos
    w.add(answer_len, True)
    turns.append(Turn("model", start, w.pos))
    return Rollout(token_ids=w.ids, logprobs=w.lps, trainable=w.train, group_id=source.group_id, uid=uid,
                   turns=turns, tool_calls=[record], reward=reward, stream=Stream.CONTINUATION,
                   source_uid=source.uid, prefix_len=p,
                   entropies=w.ents if source.entropies is not None else None)


def make_fresh(source: Rollout, uid: int, reward: float | None, calls=1, *, seed: int | None = None) -> Rollout:
    """A CONTINUATION of `source` from its prompt (axpo-no-fix: a fresh rollout of the question):
    the same prompt tokens, then a whole new rollout with `calls` tool calls."""
    fresh = make_rollout(source.group_id, uid, reward, calls, prompt_len=source.prompt_len,
                         seed=seed if seed is not None else 7919 * uid + 29)
    fresh.token_ids[:source.prompt_len] = source.token_ids[:source.prompt_len]
    fresh.stream, fresh.source_uid, fresh.prefix_len = Stream.CONTINUATION, source.uid, source.prompt_len
    return fresh
