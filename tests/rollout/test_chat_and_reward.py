import numpy as np
import pytest
from PIL import Image

from axpo.models import ImagePreprocessor, build_char_tokenizer
from axpo.rollout import ChatFormat, exact_match, extract_answer


@pytest.fixture(scope="module")
def chat():
    return ChatFormat(build_char_tokenizer(), ImagePreprocessor(patch_size=4, merge_size=2, min_pixels=64,
                                                                max_pixels=4096))


def test_prompt_places_expanded_image_tokens_before_the_question(chat):
    image = Image.fromarray(np.zeros((32, 48, 3), np.uint8))
    ids = chat.prompt("Q?", [image, image])
    text = chat.decode(ids)
    n = chat.image_processor.num_image_tokens(image)
    assert n == (32 // 4) * (48 // 4) // 4
    assert ids.count(chat.image_pad) == 2 * n
    assert text.startswith("<|im_start|>user\n<|vision_start|>") and text.endswith("Q?<|im_end|>\n<|im_start|>assistant\n")


def test_system_prompt_lists_tools_in_qwen3_format(chat):
    spec = {"type": "function", "function": {"name": "zoom", "parameters": {"type": "object"}}}
    with_tools = ChatFormat(chat.tokenizer, None, tool_specs=[spec])
    text = with_tools.decode(with_tools.prompt("hi"))
    assert text.startswith("<|im_start|>system\n") and '"name": "zoom"' in text and "<tools>" in text
    assert ChatFormat(chat.tokenizer).decode(ChatFormat(chat.tokenizer).prompt("hi")).startswith("<|im_start|>user")


def test_tool_response_is_a_user_turn_holding_the_result_and_its_images(chat):
    image = Image.fromarray(np.zeros((16, 16, 3), np.uint8))
    ids = chat.tool_response("done", [image])
    text = chat.decode(ids)
    assert text.startswith("<|im_end|>\n<|im_start|>user\n<tool_response>\n<|vision_start|>")
    assert text.endswith("done\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    assert ids.count(chat.image_pad) == chat.image_processor.num_image_tokens(image)


def test_text_only_chat_refuses_images():
    chat = ChatFormat(build_char_tokenizer())
    with pytest.raises(ValueError, match="no vision tower"):
        chat.prompt("q", [Image.new("RGB", (8, 8))])


def test_extract_answer_and_exact_match():
    assert extract_answer("<think>a</think><answer> 7 </answer>") == "7"
    assert extract_answer("<answer>1</answer> then <answer>2</answer>") == "2"
    assert extract_answer("so \\boxed{42}.") == "42"
    assert extract_answer("no answer here") is None
    assert exact_match("4.0", "4") == 1.0 and exact_match(" Cat ", "cat") == 1.0
    assert exact_match("5", "4") == 0.0 and exact_match(None, "4") == 0.0 and exact_match("x", None) == 0.0
