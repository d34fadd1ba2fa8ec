"""SFT traces: token for token what the agent loop builds for the same model turns, labels masking
exactly the prompt and tool responses, model inputs accepted, batches deterministic."""
import json
import random

import numpy as np
import pytest

from axpo.models import ImagePreprocessor, batch_inputs, build_char_tokenizer, build_tiny_policy, policy_from_model
from axpo.rollout import ChatFormat, Prompt, SamplingSettings, extract_answer
from axpo.tasks import SftExample, SftTrace, Task, encode_trace, sft_batch
from axpo.tools import ToolContext, parse_tool_call

from ..rollout._scripted import ScriptedEngine

IGNORE = -100


@pytest.fixture(scope="module")
def chat(task):
    return ChatFormat(build_char_tokenizer(), ImagePreprocessor(patch_size=4, merge_size=2, min_pixels=64,
                                                                max_pixels=task.view_max_pixels))


def model_turns(ex: SftExample) -> list[list[int]]:
    """The runs of trained tokens."""
    runs, current = [], []
    for tok, lab in zip(ex.token_ids, ex.labels):
        if lab != IGNORE:
            current.append(tok)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def same_images(a, b):
    return len(a) == len(b) and all(x.size == y.size and (np.asarray(x) == np.asarray(y)).all() for x, y in zip(a, b))


@pytest.mark.parametrize("use_tool", [True, False])
def test_trace_is_what_the_agent_loop_builds(task, tools, chat, use_tool):
    """Replaying the trace's model turns through the agent loop gives the same tokens, the same
    trainable mask (= labels != -100) and the same images; the loop parses the same call and answer."""
    prompt = task.prompts("train", 7, 1)[0]
    trace = task.sft_trace(prompt, use_tool, random.Random(0))
    ex = encode_trace(chat, tools, prompt, trace)
    turns = [chat.decode(t) for t in model_turns(ex)]
    assert len(turns) == (2 if use_tool else 1)
    engine = ScriptedEngine(chat, lambda req, t: turns[t], tools=tools)
    [rollout] = engine.generate([prompt], SamplingSettings(max_new_tokens=1000, max_total_tokens=4000), n=1)
    assert rollout.token_ids.tolist() == ex.token_ids
    assert rollout.trainable.tolist() == [lab != IGNORE for lab in ex.labels]
    assert all(lab in (IGNORE, tok) for tok, lab in zip(ex.token_ids, ex.labels))
    assert same_images(rollout.images, ex.images)
    assert rollout.answer == prompt.answer and rollout.reward == 1.0 and rollout.finish_reason == "stop"
    if use_tool:
        [call] = rollout.tool_calls
        assert call.error is None and {"name": call.name, "arguments": call.arguments} == trace.tool_call
        assert len(ex.images) == 2
    else:
        assert rollout.tool_calls == [] and len(ex.images) == 1


def test_trace_text(task, tools, chat):
    prompt = task.prompts("train", 2, 1)[0]
    trace = task.sft_trace(prompt, True, random.Random(0))
    ex = encode_trace(chat, tools, prompt, trace)
    first, last = (chat.decode(t) for t in model_turns(ex))
    call_json = json.dumps(trace.tool_call)
    assert first == f"<think>{trace.think}</think><tool_call>{call_json}</tool_call>"
    body = first[first.index("<tool_call>") + len("<tool_call>"):-len("</tool_call>")]
    parsed = parse_tool_call(body)
    assert (parsed.name, parsed.arguments) == (trace.tool_call["name"], trace.tool_call["arguments"])
    assert last == f"<answer>{prompt.answer}</answer><|im_end|>" and extract_answer(last) == prompt.answer
    # the untrained parts: the prompt exactly, then the tool response exactly
    n = len(chat.prompt(prompt.question, prompt.images))
    assert ex.token_ids[:n] == chat.prompt(prompt.question, prompt.images) and set(ex.labels[:n]) == {IGNORE}
    masked = [i for i, lab in enumerate(ex.labels) if lab == IGNORE and i >= n]
    response = chat.tool_response(tools.execute(call_json, ToolContext(images=list(prompt.images))).text, ex.images[1:])
    assert [ex.token_ids[i] for i in masked] == response and masked == list(range(masked[0], masked[0] + len(response)))


def test_batch_inputs_accepts_examples(task, tools):
    model, tok = build_tiny_policy(vision=True, seed=0)
    policy = policy_from_model(model, tok)
    policy.image_processor.max_pixels = task.view_max_pixels
    chat = ChatFormat(tok, policy.image_processor)
    prompt = task.prompts("train", 0, 1)[0]
    for use_tool in (True, False):
        ex = encode_trace(chat, tools, prompt, task.sft_trace(prompt, use_tool, random.Random(0)))
        inputs = batch_inputs(policy, [ex.token_ids], [ex.images], pad_id=chat.pad_id, left_pad=False)
        assert inputs["image_grid_thw"].shape[0] == (2 if use_tool else 1)
        assert int(inputs["mm_token_type_ids"].sum()) == sum(policy.image_processor.num_image_tokens(im)
                                                             for im in ex.images)


def test_failing_or_malformed_tool_call_is_refused(task, tools, chat):
    prompt = task.prompts("train", 0, 1)[0]
    with pytest.raises(ValueError, match="failed"):
        encode_trace(chat, tools, prompt, SftTrace("x", {"name": "zoom", "arguments": {"bbox_2d": [5, 5, 1, 1]}}, "1"))
    with pytest.raises(ValueError, match="tool_call"):
        encode_trace(chat, tools, prompt, SftTrace("x", {"name": "zoom"}, "1"))
    with pytest.raises(TypeError, match="SftTrace"):
        encode_trace(chat, tools, prompt, {"think": "x"})


def test_sft_batch_is_deterministic(task, tools, chat):
    a = sft_batch(task, chat, tools, step=3, batch_size=6, tool_fraction=0.5, seed=1)
    b = sft_batch(task, chat, tools, step=3, batch_size=6, tool_fraction=0.5, seed=1)
    assert len(a) == 6
    assert [x.token_ids for x in a] == [x.token_ids for x in b] and [x.labels for x in a] == [x.labels for x in b]
    assert all(same_images(x.images, y.images) for x, y in zip(a, b))
    # examples [18, 24) of the split
    questions = [p.question for p in task.prompts("train", 18, 6)]
    assert all(q in chat.decode(x.token_ids) for q, x in zip(questions, a))
    other_step = sft_batch(task, chat, tools, step=4, batch_size=6, tool_fraction=0.5, seed=1)
    assert [x.token_ids for x in a] != [x.token_ids for x in other_step]


def test_tool_fraction(task, tools, chat):
    for fraction in (0.0, 1.0):
        batch = sft_batch(task, chat, tools, step=0, batch_size=8, tool_fraction=fraction, seed=0)
        assert {len(x.images) for x in batch} == {2 if fraction else 1}
    uses = [len(x.images) == 2 for step in range(6)
            for x in sft_batch(task, chat, tools, step=step, batch_size=50, tool_fraction=0.3, seed=0)]
    assert abs(sum(uses) / len(uses) - 0.3) < 0.07


class _Finite(Task):
    """Five numbered prompts; tool traces never, direct traces except for odd indices when `strict`."""
    name, splits = "finite", ("train",)

    def __init__(self, strict=False):
        self.strict = strict

    def size(self, split):
        self.check_split(split)
        return 5

    def prompts(self, split, start, count, *, wrap=False):
        return [Prompt(f"q{i}", [], str(i), info={"i": i}) for i in self.indices(split, start, count, wrap)]

    def sft_trace(self, prompt, use_tool, rng):
        if use_tool or (self.strict and prompt.info["i"] % 2):
            return None
        return SftTrace("", None, prompt.answer)


def test_sft_batch_wraps_falls_back_and_skips(tools):
    chat = ChatFormat(build_char_tokenizer())
    batch = sft_batch(_Finite(), chat, tools, step=1, batch_size=4, tool_fraction=1.0, seed=0)
    assert [chat.decode(x.token_ids).split("\n")[1][:2] for x in batch] == ["q4", "q0", "q1", "q2"]
    assert all(x.images == [] for x in batch)  # no tool trace: fell back to direct answers
    batch = sft_batch(_Finite(strict=True), chat, tools, step=0, batch_size=5, tool_fraction=0.5, seed=0)
    assert len(batch) == 3  # odd prompts have no trace of either kind
    assert _Finite().prompts("train", 4, 3, wrap=True)[1].question == "q0"
    with pytest.raises(ValueError, match="start \\+ count"):
        _Finite().prompts("train", 4, 3)


@pytest.mark.parametrize("kwargs, name", [
    (dict(step=-1), "step"), (dict(batch_size=0), "batch_size"), (dict(tool_fraction=1.5), "tool_fraction"),
    (dict(seed=None), "seed"), (dict(split="dev"), "split"),
])
def test_sft_batch_checks_arguments(task, tools, chat, kwargs, name):
    args = dict(step=0, batch_size=2, tool_fraction=0.5, seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        sft_batch(task, chat, tools, **args)
