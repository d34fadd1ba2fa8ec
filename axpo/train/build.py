"""Building the parts of a run from its Config: the task, the tool registry, the chat format, the
policy, the rollout engine, the sampling settings and the method's AxpoConfig. Every other job
module builds through these."""
from __future__ import annotations

import copy
import functools
import hashlib

import torch

from ..algo import AxpoConfig
from ..models import Policy, build_tiny_policy, load_policy, policy_from_model
from ..rollout import ChatFormat, SamplingSettings, TransformersEngine, VllmEngine, extract_answer
from ..rollout.reward import make_reward
from ..tasks import make_task
from ..tools import TOOLS, ToolRegistry, build_registry
from .config import Config

__all__ = ["derive_seed", "build_task", "build_tools", "build_chat", "build_policy", "build_engine",
           "sampling_settings", "axpo_config", "pad_id", "quiet"]


def derive_seed(*parts) -> int:
    """A 31-bit seed from the parts (stable across processes and Python versions)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little") & 0x7FFFFFFF


def build_task(cfg: Config):
    if cfg.task.name == "zoom_digits":
        return make_task("zoom_digits", regime=cfg.task.regime, seed=cfg.task.seed)
    return make_task("local", path=cfg.task.path, question_key=cfg.task.question_key, image_key=cfg.task.image_key,
                     answer_key=cfg.task.answer_key)


def build_tools(cfg: Config) -> ToolRegistry:
    """The run's tool registry (config tools.*): rollouts, SFT traces and evaluation all use it."""
    t = cfg.tools
    try:
        return build_registry(t.names, max_result_chars=t.max_result_chars,
                              options={name: getattr(t, name) for name in TOOLS if getattr(t, name)})
    except ValueError as e:
        raise ValueError(f"config tools: {e}") from None


def build_chat(cfg: Config, policy: Policy, tools: ToolRegistry) -> ChatFormat:
    """The chat format of the policy's tokenizer: its chat template when it has one (TemplateChat),
    listing the registry's specs when config tools.announce says so (null: when there is a template)."""
    announce = cfg.tools.announce
    if announce is None:
        announce = bool(getattr(policy.tokenizer, "chat_template", None))
    return ChatFormat.for_tokenizer(policy.tokenizer, policy.image_processor, system_prompt=cfg.task.system_prompt,
                                    tool_specs=tools.specs() if announce else None)


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


def build_engine(cfg: Config, policy: Policy, device, model_dir: str | None = None,
                 tools: ToolRegistry | None = None):
    """The rollout engine on its own copy of the policy (weights synced after every update).
    vllm loads `model_dir`, a saved checkpoint of `policy` (its starting weights). tools: the
    run's registry (None: built from the config)."""
    tools = build_tools(cfg) if tools is None else tools
    chat = build_chat(cfg, policy, tools)
    scoring = dict(tools=tools, reward_fn=make_reward(cfg.task.reward, cfg.task.reward_tolerance),
                   answer_fn=functools.partial(extract_answer, free_text=cfg.task.free_text_answers))
    if cfg.rollout.engine == "vllm":
        if model_dir is None:
            raise ValueError("rollout.engine=vllm needs the policy saved to a directory (model_dir)")
        v = cfg.rollout.vllm
        return VllmEngine(model_dir, chat=chat, **scoring,
                          tensor_parallel_size=v.tensor_parallel_size, gpu_memory_utilization=v.gpu_memory_utilization,
                          max_model_len=v.max_model_len, enforce_eager=v.enforce_eager, dtype=v.dtype,
                          block_size=v.block_size, seed=cfg.seed, colocate=v.colocate,
                          sleep_mode=v.sleep_between_steps, cpu_kvcache_gib=v.cpu_kvcache_gib,
                          engine_kwargs=v.engine_kwargs)
    model = copy.deepcopy(policy.model).to(device).eval()
    return TransformersEngine(Policy(model, policy.tokenizer, policy.image_processor), chat=chat, **scoring,
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
