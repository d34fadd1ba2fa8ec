"""Tiny Qwen3 / Qwen3-VL policies built from configs, and a character-level tokenizer with Qwen's
chat and tool tokens, all offline (nothing is downloaded; tests and the demo use these).

The tokenizer maps every printable ASCII character (plus newline) to one id and each Qwen special
token (`<|im_start|>`, `<tool_call>`, `<|image_pad|>`, ...) to one id, so the token-level AXPO
machinery (cut after `<tool_call>`, span confidence) sees the same structure as with Qwen's real
tokenizer, at a vocabulary of ~130.
"""
from __future__ import annotations

import string

import torch

__all__ = ["SPECIAL_TOKENS", "build_char_tokenizer", "tiny_qwen3_config", "tiny_qwen3_vl_config",
           "build_tiny_policy"]

# Qwen's special tokens (Qwen3-VL's names). The tool-call tags are single tokens in Qwen's own
# tokenizer too (added tokens), which is what lets AXPO cut prefixes at token level.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<tool_response>",
    "</tool_response>", "<think>", "</think>", "<answer>", "</answer>",
]


def build_char_tokenizer(extra_chars: str = ""):
    """A `PreTrainedTokenizerFast`: one id per special token, one per character.

    Ids: specials first (0 = `<|endoftext|>`, also the pad token), then newline, then the
    printable ASCII characters and `extra_chars`. Unknown characters map to `<unk>`.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["\n"] + [c for c in string.printable if c not in "\n\r\x0b\x0c"] + list(extra_chars)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for c in dict.fromkeys(chars):
        vocab.setdefault(c, len(vocab))
    vocab["<unk>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one char, one token
    tok.decoder = decoders.Fuse()
    # special=False keeps them in decoded text (the agent loop parses `<tool_call>` from text);
    # added tokens are still matched whole before pre-tokenization.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<|endoftext|>",
                                   eos_token="<|im_end|>", bos_token=None)


def _special_ids(tokenizer) -> dict:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return dict(pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                bos_token_id=ids["<|im_start|>"], image_token_id=ids["<|image_pad|>"],
                video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                vision_end_token_id=ids["<|vision_end|>"])


def _text_kwargs(vocab_size: int, hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int,
                 initializer_range: float) -> dict:
    return dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                head_dim=head_dim, max_position_embeddings=4096, initializer_range=initializer_range)


def tiny_qwen3_config(tokenizer, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                      head_dim: int = 32, initializer_range: float = 0.02):
    """A tiny `Qwen3Config` (text only) over the tokenizer's vocabulary."""
    from transformers import Qwen3Config

    ids = _special_ids(tokenizer)
    return Qwen3Config(**_text_kwargs(len(tokenizer), hidden, layers, heads, kv_heads, head_dim, initializer_range),
                       pad_token_id=ids["pad_token_id"], eos_token_id=ids["eos_token_id"],
                       bos_token_id=ids["bos_token_id"], tie_word_embeddings=False)


def tiny_qwen3_vl_config(tokenizer, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                         head_dim: int = 16, vision_hidden: int = 32, vision_depth: int = 2,
                         patch_size: int = 4, merge_size: int = 2, initializer_range: float = 0.02):
    """A tiny `Qwen3VLConfig`: the real architecture (vision tower with deepstack, mrope) at toy size.

    mrope_section splits head_dim/2 rotary frequencies over (t, h, w), as Qwen3-VL's [24, 20, 20]
    does for head_dim 128.
    """
    from transformers import Qwen3VLConfig

    ids = _special_ids(tokenizer)
    half = head_dim // 2
    section = [half - 2 * (half // 3), half // 3, half // 3]
    text = _text_kwargs(len(tokenizer), hidden, layers, heads, kv_heads, head_dim, initializer_range)
    text.update(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": section, "mrope_interleaved": True},
                pad_token_id=ids["pad_token_id"])
    vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=vision_hidden * 2,
                  num_heads=2, patch_size=patch_size, spatial_merge_size=merge_size, temporal_patch_size=2,
                  out_hidden_size=hidden, num_position_embeddings=256,
                  deepstack_visual_indexes=[0], initializer_range=initializer_range)
    cfg = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=ids["image_token_id"],
                        video_token_id=ids["video_token_id"],
                        vision_start_token_id=ids["vision_start_token_id"],
                        vision_end_token_id=ids["vision_end_token_id"], tie_word_embeddings=False)
    cfg.eos_token_id = ids["eos_token_id"]
    cfg.pad_token_id = ids["pad_token_id"]
    return cfg


def build_tiny_policy(tokenizer=None, *, vision: bool = True, seed: int = 0, **config_kwargs):
    """(model, tokenizer): a randomly initialized tiny Qwen3-VL (vision=True) or Qwen3 model in
    float32, eval mode, built with a fixed seed (same seed, same weights)."""
    from transformers import AutoModelForCausalLM, Qwen3VLForConditionalGeneration

    tokenizer = tokenizer if tokenizer is not None else build_char_tokenizer()
    cfg = (tiny_qwen3_vl_config if vision else tiny_qwen3_config)(tokenizer, **config_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = (Qwen3VLForConditionalGeneration(cfg) if vision else AutoModelForCausalLM.from_config(cfg))
    return model.float().eval(), tokenizer
