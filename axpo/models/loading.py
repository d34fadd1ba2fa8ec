"""Load a policy (model + tokenizer + image preprocessor) from a local directory or a hub name.

Works for Qwen3-VL (image-text-to-text) and Qwen3 (text) checkpoints, real or tiny. The tokenizer
may sit in the model directory (real checkpoints) or in its `tokenizer/` subdirectory (what
`save_policy` writes: a tokenizer beside a config.json of another model type can make
AutoTokenizer pick the wrong class).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .vision import ImagePreprocessor

__all__ = ["Policy", "load_chat_parts", "load_model_config", "load_policy", "save_policy"]


@dataclass
class Policy:
    """model: a transformers causal LM (Qwen3VLForConditionalGeneration or *ForCausalLM).
    tokenizer: its tokenizer. image_processor: an ImagePreprocessor, None for text-only models."""
    model: torch.nn.Module
    tokenizer: object
    image_processor: ImagePreprocessor | None = None

    @property
    def is_vision(self) -> bool:
        return self.image_processor is not None


def _vision_config(config):
    return getattr(config, "vision_config", None)


def policy_from_model(model, tokenizer, image_processor: ImagePreprocessor | None = None) -> Policy:
    """Wraps an in-memory model; a vision model gets a preprocessor matching its vision config."""
    vcfg = _vision_config(model.config)
    if vcfg is not None and image_processor is None:
        # small budget for tiny towers, Qwen's default for real ones
        image_processor = ImagePreprocessor(patch_size=vcfg.patch_size, merge_size=vcfg.spatial_merge_size,
                                            temporal_patch_size=vcfg.temporal_patch_size,
                                            min_pixels=(vcfg.patch_size * vcfg.spatial_merge_size) ** 2,
                                            max_pixels=min(ImagePreprocessor.max_pixels,
                                                           (vcfg.patch_size * 32) ** 2))
    return Policy(model, tokenizer, image_processor)


def load_model_config(name_or_path: str):
    """The transformers config of a local model directory or a hub name, read without the weights
    (a check that costs a second before a run starts). A ValueError naming it, and what is wrong,
    when it cannot be read: a directory without config.json, a file, a hub name while offline."""
    from transformers import AutoConfig

    if not isinstance(name_or_path, (str, os.PathLike)) or not os.fspath(name_or_path):
        raise TypeError(f"name_or_path must be a path or a hub name, got {name_or_path!r}")
    name_or_path = os.fspath(name_or_path)
    if os.path.isdir(name_or_path):
        if not os.path.isfile(os.path.join(name_or_path, "config.json")):
            raise ValueError(f"model directory {name_or_path} has no config.json: not a saved model")
    elif os.path.exists(name_or_path):
        raise ValueError(f"model {name_or_path} is a file: give the model's directory")
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "the directory" if os.path.isdir(name_or_path) else (
            "a local directory or a hub name (no such directory here; offline, a hub name cannot be fetched)")
        raise ValueError(f"cannot read the model config of {name_or_path!r}, {where}: {first}") from e


def load_policy(name_or_path: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Policy:
    """Loads a Qwen3-VL or Qwen3 policy (eval mode) from a local directory or a hub name."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    config = load_model_config(name_or_path)
    name_or_path = os.fspath(name_or_path)
    vcfg = _vision_config(config)
    model_cls = AutoModelForImageTextToText if vcfg is not None else AutoModelForCausalLM
    model = model_cls.from_pretrained(name_or_path, dtype=dtype).to(device).eval()
    return Policy(model, *load_chat_parts(name_or_path, config))


def load_chat_parts(name_or_path: str, config=None) -> tuple[object, ImagePreprocessor | None]:
    """(tokenizer, image preprocessor or None) of a checkpoint, without loading its weights."""
    from transformers import AutoConfig, AutoTokenizer

    config = config if config is not None else AutoConfig.from_pretrained(name_or_path)
    tok_dir = os.path.join(name_or_path, "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir if os.path.isdir(tok_dir) else name_or_path)
    vcfg = _vision_config(config)
    processor = None
    if vcfg is not None:
        processor = (ImagePreprocessor.from_pretrained(name_or_path, vcfg) if os.path.isdir(name_or_path)
                     else ImagePreprocessor(patch_size=vcfg.patch_size, merge_size=vcfg.spatial_merge_size,
                                            temporal_patch_size=vcfg.temporal_patch_size))
    return tokenizer, processor


def save_policy(policy: Policy, path: str, state_dict: dict | None = None) -> None:
    """Saves model, tokenizer (in `path/tokenizer`) and preprocessor config so load_policy reads them back.
    state_dict: the weights to save instead of the model's own (e.g. gathered from a trainer)."""
    os.makedirs(path, exist_ok=True)
    policy.model.save_pretrained(path, state_dict=state_dict)
    policy.tokenizer.save_pretrained(os.path.join(path, "tokenizer"))
    if policy.image_processor is not None:
        policy.image_processor.save_pretrained(path)
