"""Test doubles: an engine that replays scripted turns, and a logits processor that forces a
real model to write scripted turns (so the transformers engine's tool paths run for real)."""
from __future__ import annotations

import torch

from axpo.rollout import AgentLoop, Sampler, TurnOutput


def turn_index(chat, token_ids) -> int:
    """Model turns before the current one = tool responses in the conversation."""
    close = chat.encode("</tool_response>")
    return sum(1 for i in range(len(token_ids)) if token_ids[i:i + len(close)] == close)


class ScriptedSampler(Sampler):
    """sample_turns returns script(request, turn_index) encoded, ending as the sampler contract says."""

    def __init__(self, chat, script):
        super().__init__(chat)
        self.script = script
        self.requests = []

    def sample_turns(self, requests, sampling, generator):
        self.requests.append(list(requests))
        outs = []
        for r in requests:
            ids = self.chat.encode(self.script(r, turn_index(self.chat, r.token_ids)))[:sampling.max_new_tokens]
            text = self.chat.decode(ids)
            if ids and ids[-1] in self.chat.eos_ids:
                finish = "eos"
            elif text.endswith("</tool_call>") and ("<tool_call>" in text or r.in_tool_call):
                finish = "tool_call"
            else:
                finish = "length"
            outs.append(TurnOutput(ids, [-0.5] * len(ids), [0.25] * len(ids), finish))
        return outs

    def load_weights(self, weights):
        self.loaded_weights = dict(weights)  # a scripted sampler has no model: keep what it was given


class ScriptedEngine(AgentLoop):
    """The agent loop over a ScriptedSampler (its requests and loaded weights exposed)."""

    def __init__(self, chat, script, **kw):
        super().__init__(ScriptedSampler(chat, script), **kw)

    @property
    def requests(self):
        return self.sampler.requests

    @property
    def loaded_weights(self):
        return self.sampler.loaded_weights


class ForceScript:
    """Logits processor: in model turn t, force the tokens of scripts[t] (then free sampling)."""

    def __init__(self, chat, scripts, bias: float = 40.0):
        self.chat = chat
        self.scripts = [chat.encode(s) for s in scripts]
        self.header = chat.encode("<|im_start|>assistant\n")
        self.bias = bias

    def __call__(self, rows, logits):
        logits = logits.clone()
        h = len(self.header)
        for b, row in enumerate(rows):
            t = turn_index(self.chat, row)
            if t >= len(self.scripts):
                continue
            start = max(i + h for i in range(len(row) - h + 1) if row[i:i + h] == self.header)
            j = len(row) - start
            if j < len(self.scripts[t]):
                logits[b, self.scripts[t][j]] += self.bias
        return logits
