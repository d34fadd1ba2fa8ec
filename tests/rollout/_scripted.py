"""Test doubles: an engine that replays scripted turns, and a logits processor that forces a
real model to write scripted turns (so the transformers engine's tool paths run for real)."""
from __future__ import annotations

import torch

from axpo.rollout import RolloutEngine, TurnOutput


def turn_index(chat, token_ids) -> int:
    """Model turns before the current one = tool responses in the conversation."""
    close = chat.encode("</tool_response>")
    return sum(1 for i in range(len(token_ids)) if token_ids[i:i + len(close)] == close)


class ScriptedEngine(RolloutEngine):
    """sample_turns returns script(request, turn_index) encoded, ending as the engine contract says."""

    def __init__(self, chat, script, **kw):
        super().__init__(chat, **kw)
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
        self.loaded_weights = dict(weights)  # a scripted engine has no model: keep what it was given


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
