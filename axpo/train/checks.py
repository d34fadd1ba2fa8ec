"""Checks that run in seconds before a run loads a model or writes anything, so a mistake in the
config or the data is a one-line error naming the key, not a crash after the model has loaded:

    check_inputs(cfg, task)   what the run reads: splits, first examples, model config, tools
    check_launch(cfg, world)  what a multi-process (GPU) run needs to be consistent: batch sizes
                              divisible by the world size, vLLM's context >= the rollout budget, ...
    check_prompt(cfg, chat, prompt)  a rendered prompt (system turn, tool listing, images) leaves
                              room for a model turn within rollout.max_total_tokens
"""
from __future__ import annotations

from ..models import load_model_config
from .build import build_tools
from .config import Config

__all__ = ["check_inputs", "check_launch", "check_prompt"]


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
    tools = build_tools(cfg)  # a bad tool option fails here, before anything is written
    missing = [name for name in getattr(task, "tool_names", ()) if name not in tools]
    if missing:
        raise ValueError(f"config tools.names must include the tools the task's traces call {missing}, "
                         f"got {cfg.tools.names}")


def _context_length(model_config) -> int | None:
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    return getattr(text, "max_position_embeddings", None)


def check_launch(cfg: Config, world: int, model_config=None) -> None:
    """The values a run over `world` processes (one per GPU) needs consistent; a ValueError listing
    every problem. model_config: the model's transformers config (None: read from
    model.name_or_path when set), for its context length."""
    problems = []
    rl, roll, v = cfg.rl, cfg.rollout, cfg.rollout.vllm
    if rl.questions_per_step % world:
        problems.append(f"rl.questions_per_step ({rl.questions_per_step}) must be divisible by the world size "
                        f"({world}): each rank rolls out the same number of questions")
    if rl.questions_per_step < world * rl.updates_per_step:
        problems.append(f"rl.questions_per_step ({rl.questions_per_step}) must be at least the world size "
                        f"({world}) times rl.updates_per_step ({rl.updates_per_step})")
    if cfg.sft.steps and cfg.sft.batch_size % world:
        problems.append(f"sft.batch_size ({cfg.sft.batch_size}) must be divisible by the world size ({world})")
    if cfg.eval.questions and cfg.eval.questions % world:
        problems.append(f"eval.questions ({cfg.eval.questions}) must be divisible by the world size ({world})")
    if rl.group_size < 2:
        problems.append(f"rl.group_size ({rl.group_size}) must be >= 2: a group of one has no advantage")
    if model_config is None and cfg.model.name_or_path is not None:
        model_config = load_model_config(cfg.model.name_or_path)
    context = _context_length(model_config) if model_config is not None else None
    if context is not None and roll.max_total_tokens > context:
        problems.append(f"rollout.max_total_tokens ({roll.max_total_tokens}) must be at most the model's context "
                        f"length ({context})")
    if roll.engine == "vllm":
        if v.max_model_len is not None and v.max_model_len < roll.max_total_tokens:
            problems.append(f"rollout.vllm.max_model_len ({v.max_model_len}) must be at least "
                            f"rollout.max_total_tokens ({roll.max_total_tokens}): vLLM would cut conversations short")
        if context is not None and v.max_model_len is not None and v.max_model_len > context:
            problems.append(f"rollout.vllm.max_model_len ({v.max_model_len}) must be at most the model's context "
                            f"length ({context})")
        if world % v.tensor_parallel_size:
            problems.append(f"rollout.vllm.tensor_parallel_size ({v.tensor_parallel_size}) must divide the world "
                            f"size ({world})")
        if v.sleep_between_steps and cfg.trainer.device == "cpu":
            problems.append("rollout.vllm.sleep_between_steps needs trainer.device cuda (vLLM's sleep mode)")
    if problems:
        raise ValueError("config: " + "; ".join(problems))


def check_prompt(cfg: Config, chat, prompt) -> list[int]:
    """The token ids of `prompt` as the policy sees it; a ValueError when they leave no room for
    rollout.max_new_tokens within rollout.max_total_tokens."""
    ids = chat.prompt(prompt.question, prompt.images)
    room = cfg.rollout.max_total_tokens - len(ids)
    if room < cfg.rollout.max_new_tokens:
        raise ValueError(f"config rollout.max_total_tokens ({cfg.rollout.max_total_tokens}) leaves {room} tokens "
                         f"after the first training prompt ({len(ids)} tokens: system turn, tool listing, images), "
                         f"less than rollout.max_new_tokens ({cfg.rollout.max_new_tokens})")
    return ids
