"""Qwen3-VL-Thinking's output shape through the agent loop: the Thinking template opens `<think>`
in the prompt, the model closes it, calls a tool (`<tool_call>\\n{json}\\n</tool_call>`), reads the
response, reasons again and answers in `\\boxed{}` or free text. Stop rules, the tool call, answer
extraction (never from inside the reasoning), rewards, and the AXPO prefix cut (right after the
first `<tool_call>`, the reasoning before it included) are checked on text of that shape."""
import functools
import json

import pytest
from PIL import Image

from axpo.algo import Stream, candidate_prefixes
from axpo.models import ImagePreprocessor
from axpo.rollout import ChatFormat, Prompt, SamplingSettings, extract_answer
from axpo.rollout.reward import choice_match, make_reward, numeric_match
from axpo.tools import default_registry

from ._scripted import ScriptedEngine
from ._template import build_qwen_like_tokenizer

CALL = json.dumps({"name": "zoom", "arguments": {"bbox_2d": [0, 0, 16, 16]}})
TURN1 = f"The cell is small; a draft guess is \\boxed{{5}}. I should zoom.\n</think>\n\n<tool_call>\n{CALL}\n</tool_call>"
TURN2 = "The crop shows a 7, not the <answer>5</answer> I guessed.\n</think>\n\nThe digit is \\boxed{7}.<|im_end|>"


@pytest.fixture(scope="module")
def chat():
    processor = ImagePreprocessor(patch_size=4, merge_size=2, min_pixels=64, max_pixels=32 * 32)
    tools = default_registry(python=False)
    return ChatFormat.for_tokenizer(build_qwen_like_tokenizer(thinking=True), processor, tool_specs=tools.specs())


def _run(chat, turns, **engine_options):
    engine = ScriptedEngine(chat, lambda req, t: turns[min(t, len(turns) - 1)], tools=default_registry(python=False),
                            **engine_options)
    prompt = Prompt("Which digit is in the top-left cell?", [Image.new("RGB", (32, 32), (255, 0, 0))], answer="7")
    return engine, engine.generate([prompt], SamplingSettings(max_new_tokens=200, max_total_tokens=4000), n=1)[0]


def test_a_thinking_rollout_stops_calls_answers_and_cuts_where_axpo_expects(chat):
    assert chat.thinks_in_prompt
    engine, r = _run(chat, [TURN1, TURN2])
    # the prompt ends inside the opened reasoning block
    assert chat.decode(r.token_ids[:r.prompt_len]).endswith("<|im_start|>assistant\n<think>\n")
    # turn 1 stopped at </tool_call>; the call inside the newlines parsed and ran
    assert [t.role for t in r.turns] == ["prompt", "model", "tool", "model"]
    assert chat.decode(r.token_ids[r.turns[1].start:r.turns[1].end]) == TURN1
    [call] = r.tool_calls
    assert call.name == "zoom" and call.error is None and call.num_images == 1
    # the answer is the boxed one after the reasoning, not the drafts inside it
    assert r.finish_reason == "stop" and r.answer == "7" and r.reward == 1.0
    # AXPO's cut: right after the first <tool_call>, the whole reasoning before it in the prefix
    [cand] = candidate_prefixes([r], [r.group_id])
    assert chat.decode(r.token_ids[r.prompt_len:cand.prefix_len]) == TURN1[:TURN1.index("<tool_call>") + 11]
    # a continuation from that cut is in the open call: its </tool_call> ends the turn
    [[cont]] = engine.resample([(r, cand.prefix_len)], 1, SamplingSettings(max_new_tokens=200, max_total_tokens=4000))
    assert engine.requests[-2][0].in_tool_call and cont.stream == Stream.CONTINUATION


def test_unclosed_thinking_has_no_answer(chat):
    _, r = _run(chat, ["Still thinking about \\boxed{7} and <answer>7</answer><|im_end|>"])
    assert r.answer is None and r.reward == 0.0
    assert extract_answer("still thinking \\boxed{7}") == "7"  # no reasoning block at all: searched whole


def test_free_text_answers_and_the_configurable_rewards(chat):
    prose = "The crop is clear.\n</think>\n\nThe digit in the top-left cell is 7.<|im_end|>"
    _, r = _run(chat, [prose])
    assert r.answer is None  # no tag: a format error by default
    _, r = _run(chat, [prose], answer_fn=functools.partial(extract_answer, free_text=True),
                reward_fn=make_reward("numeric"))
    assert r.answer == "The digit in the top-left cell is 7." and r.reward == 1.0
    assert numeric_match("about 3.14159", "3.1416", tolerance=1e-4) == 1.0
    assert numeric_match("3.2", "3.1416", tolerance=1e-4) == 0.0
    assert numeric_match("$1,234.50 total", "1234.5") == 1.0 and numeric_match("none", "1") == 0.0
    for text in ("B", "(B)", "B.", "Answer: B", "b) a dog", "The answer is B", "\\boxed{B}"):
        assert choice_match(extract_answer(text, free_text=True), "B") == 1.0, text
    assert choice_match("C", "B") == 0.0 and choice_match("", "B") == 0.0
    with pytest.raises(ValueError, match="reward must be one of"):
        make_reward("fuzzy")
