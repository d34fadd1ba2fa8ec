"""Policies: loading real Qwen3-VL / Qwen3 checkpoints, tiny ones built offline, and image
preprocessing without torchvision."""
from .inputs import batch_inputs
from .loading import Policy, load_chat_parts, load_model_config, load_policy, policy_from_model, save_policy
from .tiny import SPECIAL_TOKENS, build_char_tokenizer, build_tiny_policy, tiny_qwen3_config, tiny_qwen3_vl_config
from .vision import ImagePreprocessor, smart_resize

__all__ = ["ImagePreprocessor", "Policy", "batch_inputs", "SPECIAL_TOKENS", "build_char_tokenizer", "build_tiny_policy",
           "load_chat_parts", "load_model_config", "load_policy", "policy_from_model", "save_policy", "smart_resize", "tiny_qwen3_config",
           "tiny_qwen3_vl_config"]
