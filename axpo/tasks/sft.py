"""Supervised warm-start data: a task's traces as token ids with labels, exactly as a rollout
with the same choices would contain them.

A trace becomes: the prompt (chat.prompt) + a model turn reasoning trace.think and either
`<tool_call>{json}</tool_call>` (the turn ends at the closing tag, as the engines stop there), the
tool's response from actually running the call (chat.tool_response: it closes the model turn
and opens the next one; its images join the conversation), then the model turn
`<answer>..</answer><|im_end|>`; or directly `<answer>..</answer><|im_end|>`. Model turns are
written by chat.model_turn (the hand-built format: `<think>..</think>` then the content; a chat
template: as it renders an assistant message, e.g. a Thinking model's `..\n</think>\n\n`). Model turns are
trained; the prompt and tool responses are not (label -100), matching the rollout's trainable mask.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass

from ..records import Prompt
from ..tools import ToolContext
from .base import SftTrace, Task, _check_int

__all__ = ["SftExample", "encode_trace", "sft_batch", "IGNORE_INDEX"]

IGNORE_INDEX = -100


@dataclass
class SftExample:
    """token_ids: the conversation. labels: the token id where trained (model turns), -100 elsewhere
    (prompt, tool responses). images: the PIL images whose `<|image_pad|>` runs appear in token_ids,
    in order (the prompt's, then those the tools returned)."""
    token_ids: list[int]
    labels: list[int]
    images: list


def encode_trace(chat, tools, prompt: Prompt, trace: SftTrace) -> SftExample:
    """The token ids and labels of `trace` answering `prompt`.

    chat: an axpo.rollout.ChatFormat. tools: the ToolRegistry that runs trace.tool_call (the same
    the rollouts use, so the response is what the model will see). A tool call that fails is a
    ValueError: a trace must not teach a failing call.
    """
    if not isinstance(trace, SftTrace):
        raise TypeError(f"trace must be an SftTrace, got {type(trace).__name__}")
    ids = list(chat.prompt(prompt.question, prompt.images))
    labels = [IGNORE_INDEX] * len(ids)
    images = list(prompt.images)
    answer_text = f"<answer>{trace.answer}</answer>"
    if trace.tool_call is None:
        turn = chat.encode(chat.model_turn(trace.think, answer_text)) + [chat.im_end]
        return SftExample(ids + turn, labels + turn, images)
    call = trace.tool_call
    if not (isinstance(call, dict) and isinstance(call.get("name"), str) and isinstance(call.get("arguments"), dict)):
        raise ValueError(f'trace.tool_call must be {{"name": str, "arguments": dict}} or None, got {call!r}')
    call_text = json.dumps({"name": call["name"], "arguments": call["arguments"]})
    turn = chat.encode(chat.model_turn(trace.think, f"<tool_call>{call_text}</tool_call>"))
    result = tools.execute(call_text, ToolContext(images=list(images)))
    if result.error is not None:
        raise ValueError(f"trace.tool_call failed when run: {result.text}")
    new_images, text = list(result.images), result.text
    if new_images and chat.image_processor is None:  # as the agent loop does for text-only models
        text += f"\n[{len(new_images)} image(s) omitted: this model reads text only]"
        new_images = []
    response = chat.tool_response(text, new_images)
    answer = chat.encode(chat.model_turn(None, answer_text)) + [chat.im_end]
    ids += turn + response + answer
    labels += turn + [IGNORE_INDEX] * len(response) + answer
    return SftExample(ids, labels, images + new_images)


def sft_batch(task: Task, chat, tools, *, step: int, batch_size: int, tool_fraction: float, seed: int,
              split: str = "train") -> list[SftExample]:
    """The SFT examples of one step: examples [step * batch_size, (step + 1) * batch_size) of
    `split` (wrapping around a finite split), each a tool-using trace with probability
    tool_fraction (drawn from an rng seeded by (seed, step, i)), else a direct answer. A trace the
    task cannot write (None) falls back to the other kind; a prompt with neither is skipped, so
    the batch may be shorter than batch_size. Deterministic in (task, seed, step)."""
    _check_int(step, "step", 0)
    _check_int(batch_size, "batch_size", 1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if isinstance(tool_fraction, bool) or not isinstance(tool_fraction, (int, float)) or not 0 <= tool_fraction <= 1:
        raise ValueError(f"tool_fraction must be a number in [0, 1], got {tool_fraction!r}")
    prompts = task.prompts(split, step * batch_size, batch_size, wrap=True)
    examples = []
    for i, prompt in enumerate(prompts):
        rng = random.Random(f"sft:{seed}:{step}:{i}")
        use_tool = rng.random() < tool_fraction
        trace = task.sft_trace(prompt, use_tool, rng)
        if trace is None:
            trace = task.sft_trace(prompt, not use_tool, rng)
        if trace is not None:
            examples.append(encode_trace(chat, tools, prompt, trace))
    return examples
