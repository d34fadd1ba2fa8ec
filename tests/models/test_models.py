"""Image preprocessing (against transformers' Qwen2-VL processor), the tiny tokenizer and
policies, and loading from a locally saved directory."""
import numpy as np
import pytest
import torch
from PIL import Image

from axpo.models import (SPECIAL_TOKENS, ImagePreprocessor, build_char_tokenizer, build_tiny_policy, load_policy,
                         policy_from_model, save_policy, smart_resize)


def _image(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))


@pytest.mark.parametrize("hw", [(30, 45), (64, 64), (17, 90), (200, 150), (5, 5)])
def test_preprocessor_matches_transformers_qwen2vl_processor(hw):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image = _image(*hw)
    ref = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=256,
                                   max_pixels=4096, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    expected = ref(images=[image], return_tensors="pt")
    ours = ImagePreprocessor(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=256, max_pixels=4096)
    pixel_values, grid = ours(image)
    assert grid.tolist() == expected["image_grid_thw"][0].tolist()
    torch.testing.assert_close(pixel_values, expected["pixel_values"], rtol=0, atol=1e-6)
    assert ours.num_image_tokens(image) == int(grid.prod()) // 4


def test_smart_resize_budget_and_errors():
    h, w = smart_resize(1000, 3000, 28, 56 * 56, 28 * 28 * 1280)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 28 * 28 * 1280
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(1, 500, 28, 1, 10 ** 6)
    with pytest.raises(TypeError, match="PIL"):
        ImagePreprocessor()(np.zeros((4, 4, 3)))


def test_char_tokenizer_keeps_qwen_tokens_whole_and_round_trips():
    tok = build_char_tokenizer()
    for special in SPECIAL_TOKENS:
        assert len(tok.encode(special, add_special_tokens=False)) == 1, special
    text = '<|im_start|>assistant\n<think>x</think><tool_call>{"name": "zoom"}</tool_call><|im_end|>'
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.pad_token_id == 0 and tok.convert_ids_to_tokens(tok.eos_token_id) == "<|im_end|>"


@pytest.mark.parametrize("vision", [True, False])
def test_tiny_policy_is_seeded_and_round_trips_through_a_local_directory(tmp_path, vision, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = build_tiny_policy(vision=vision, seed=3)
    again, _ = build_tiny_policy(vision=vision, seed=3)
    other, _ = build_tiny_policy(vision=vision, seed=4)
    sd, sd_again, sd_other = model.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(sd[k], sd_again[k]) for k in sd)
    assert not all(torch.equal(sd[k], sd_other[k]) for k in sd)

    policy = policy_from_model(model, tok)
    assert policy.is_vision == vision
    save_policy(policy, str(tmp_path))
    loaded = load_policy(str(tmp_path))
    assert type(loaded.model) is type(model) and loaded.is_vision == vision
    sd_loaded = loaded.model.state_dict()
    assert all(torch.equal(sd[k], sd_loaded[k]) for k in sd)
    assert loaded.tokenizer.encode("<tool_call>a", add_special_tokens=False) == tok.encode("<tool_call>a", add_special_tokens=False)
    if vision:
        assert loaded.image_processor == policy.image_processor
    ids = torch.tensor([tok.encode("hello", add_special_tokens=False)])
    torch.testing.assert_close(loaded.model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_load_policy_rejects_a_non_path():
    with pytest.raises(TypeError, match="name_or_path"):
        load_policy(123)
