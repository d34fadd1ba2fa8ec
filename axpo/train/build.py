"""Building the parts of a run from its Config: the task, the policy, the rollout engine, the
sampling settings and the method's AxpoConfig. Every other job module builds through these."""
from __future__ import annotations

import copy
import hashlib

import torch

from ..algo import AxpoConfig
from ..models import Policy, build_tiny_policy, load_model_config, load_policy, policy_from_model
from ..rollout import ChatFormat, SamplingSettings, TransformersEngine, VllmEngine
from ..tasks import make_task
from ..tools import default_registry
from .config import Config

__all__ = ["derive_seed", "build_task", "build_policy", "build_engine", "sampling_settings", "axpo_config",
           "check_inputs", "pad_id", "quiet"]


def derive_seed(*parts) -> int:
    """A 31-bit seed from the parts (stable across processes and Python versions)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little") & 0x7FFFFFFF


def build_task(cfg: Config):
    if cfg.task.name == "zoom_digits":
        return make_task("zoom_digits", regime=cfg.task.regime, seed=cfg.task.seed)
    return make_task("local", path=cfg.task.path, question_key=cfg.task.question_key, image_key=cfg.task.image_key,
                     answer_key=cfg.task.answer_key)


def check_inputs(cfg: Config, task, *, splits: dict[str, str] | None = None) -> None:
    """What a run reads, checked in seconds before it writes anything: the splits it uses exist
    and give an example (columns, image files), and the model directory or hub name has a
    readable config. A ValueError naming the key and what was expected otherwise.

    splits: {where the split was given: split} to check (default: config task.train_split, and
    config task.eval_split when the run evaluates)."""
    if splits is None:
        splits = {"config task.train_split": cfg.task.train_split}
        if cfg.eval.questions > 0:
            splits["config task.eval_split"] = cfg.task.eval_split
    for key, split in splits.items():
        if split not in task.splits:
            raise ValueError(f"{key} must be one of the task's splits {list(task.splits)}, got {split!r}")
        if task.size(split) == 0:
            raise ValueError(f"{key}: split {split!r} of the task is empty")
        try:
            task.prompts(split, 0, 1, wrap=True)
        except (ValueError, OSError) as e:
            raise ValueError(f"{key}: the first example of split {split!r} cannot be read: {e}") from None
    if cfg.model.name_or_path is not None:
        try:
            load_model_config(cfg.model.name_or_path)
        except (TypeError, ValueError) as e:
            raise ValueError(f"config model.name_or_path: {e}") from None


def build_policy(cfg: Config, task, path: str | None = None) -> Policy:
    """The policy to start from: `path` (a saved policy), else model.name_or_path, else the tiny
    Qwen3-VL built from a config with the run's seed. The image budget is set from the config or task."""
    dtype = torch.bfloat16 if cfg.trainer.dtype == "bfloat16" else torch.float32
    source = path or cfg.model.name_or_path
    if source is not None:
        policy = load_policy(source, dtype=dtype)
    else:
        shape = {} if cfg.model.tiny_head_dim is None else {"head_dim": cfg.model.tiny_head_dim}
        if cfg.model.tiny_vision:
            shape["vision_hidden"] = cfg.model.tiny_vision_hidden
        model, tok = build_tiny_policy(vision=cfg.model.tiny_vision, seed=cfg.seed, hidden=cfg.model.tiny_hidden,
                                       layers=cfg.model.tiny_layers, **shape)
        policy = policy_from_model(model.to(dtype), tok)
    max_pixels = cfg.model.max_pixels or getattr(task, "view_max_pixels", None)
    if max_pixels is not None and policy.image_processor is not None:
        policy.image_processor.max_pixels = int(max_pixels)
        policy.image_processor.min_pixels = min(policy.image_processor.min_pixels, int(max_pixels))
    return policy


def build_engine(cfg: Config, policy: Policy, device, model_dir: str | None = None):
    """The rollout engine on its own copy of the policy (weights synced after every update).
    vllm loads `model_dir`, a saved checkpoint of `policy` (its starting weights)."""
    if cfg.rollout.engine == "vllm":
        if model_dir is None:
            raise ValueError("rollout.engine=vllm needs the policy saved to a directory (model_dir)")
        v = cfg.rollout.vllm
        chat = ChatFormat(policy.tokenizer, policy.image_processor)
        return VllmEngine(model_dir, chat=chat, tools=default_registry(),
                          tensor_parallel_size=v.tensor_parallel_size, gpu_memory_utilization=v.gpu_memory_utilization,
                          max_model_len=v.max_model_len, enforce_eager=v.enforce_eager, dtype=v.dtype,
                          block_size=v.block_size, seed=cfg.seed, colocate=v.colocate,
                          sleep_mode=v.sleep_between_steps, cpu_kvcache_gib=v.cpu_kvcache_gib,
                          engine_kwargs=v.engine_kwargs)
    model = copy.deepcopy(policy.model).to(device).eval()
    return TransformersEngine(Policy(model, policy.tokenizer, policy.image_processor), tools=default_registry(),
                              max_batch_size=cfg.rollout.max_batch_size)


def sampling_settings(cfg: Config, seed: int, temperature: float | None = None) -> SamplingSettings:
    r = cfg.rollout
    return SamplingSettings(temperature=r.temperature if temperature is None else temperature, top_k=r.top_k,
                            top_p=r.top_p, max_new_tokens=r.max_new_tokens, max_turns=r.max_turns,
                            max_total_tokens=r.max_total_tokens, seed=seed)


def axpo_config(cfg: Config) -> AxpoConfig:
    """The advantage step of the configured method (rl.algorithm, a registered axpo.algo method)."""
    rl = cfg.rl
    return AxpoConfig(algorithm=rl.algorithm, resample=rl.resample, ratio=rl.ratio, k=rl.k, score=rl.score,
                      eps=rl.adv_eps, tie_break=rl.tie_break)


def pad_id(policy: Policy) -> int:
    return int(policy.tokenizer.pad_token_id or 0)


def quiet() -> None:
    """No per-file progress bars from transformers, no per-step logs from DeepSpeed: the run has its own."""
    import logging

    import transformers
    from deepspeed.utils import logger as ds_logger

    transformers.utils.logging.disable_progress_bar()
    ds_logger.setLevel(logging.WARNING)
