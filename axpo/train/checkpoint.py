"""The state one `axpo train` call shares across its stages: the output layout, the metrics log,
and checkpoints (DeepSpeed's, with the stage, the step and the RNG states) to resume from.

Layout of output_dir: metrics.jsonl, checkpoints/ (DeepSpeed, tags sft-NNNNNN / rl-NNNNNN),
sft_policy/ (the warm-started policy: the RL stage's start and its KL reference), final/ (the
trained policy), rollout_init/ (with rollout.engine=vllm and no saved policy to start from: the
built policy vLLM loads), prompt.txt (the first training question as the policy sees it: system
turn, tool listing, template; image placeholders collapsed), learning_curves.png, summary.json,
config.yaml.
"""
from __future__ import annotations

import os
import random
import re
import shutil

import numpy as np
import torch

from ..models import Policy, save_policy
from .build import build_task, build_tools
from .checks import check_prompt
from .config import Config
from .distributed import DistInfo, barrier
from .logs import MetricsLogger

__all__ = ["RunState", "CHECKPOINTS", "SFT_POLICY", "FINAL_POLICY", "ROLLOUT_INIT", "resume_point",
           "restore_rng_state"]

CHECKPOINTS = "checkpoints"
SFT_POLICY = "sft_policy"
FINAL_POLICY = "final"
PROMPT_FILE = "prompt.txt"
ROLLOUT_INIT = "rollout_init"


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng_state(state: dict | None) -> None:
    if not state:
        return
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _latest_tag(ckpt_dir: str) -> str | None:
    path = os.path.join(ckpt_dir, "latest")
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8").strip() or None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a checkpoint tag (not UTF-8 text): remove it, or set log.resume=false "
                         "to start over") from None


def _prune_checkpoints(ckpt_dir: str, stage: str, keep: int) -> None:
    tags = sorted(t for t in os.listdir(ckpt_dir) if t.startswith(stage + "-") and os.path.isdir(os.path.join(ckpt_dir, t)))
    for tag in tags[:-keep]:
        shutil.rmtree(os.path.join(ckpt_dir, tag), ignore_errors=True)


class RunState:
    """State shared by the stages of one `train` call."""

    def __init__(self, cfg: Config, dist: DistInfo):
        self.cfg, self.dist = cfg, dist
        self.out = cfg.log.output_dir
        self.ckpt_dir = os.path.join(self.out, CHECKPOINTS)
        self.task = build_task(cfg)
        self.tools = build_tools(cfg)  # the one registry of the run: SFT traces, rollouts, evaluations
        self.logger: MetricsLogger | None = None

    def log(self, stage: str, step: int, global_step: int, metrics: dict) -> None:
        if self.logger is not None:
            self.logger.log(stage, step, global_step, metrics)

    def save(self, trainer, stage: str, step: int, global_step: int) -> None:
        state = {"stage": stage, "step": step, "global_step": global_step, "rng": _rng_state()}
        trainer.save(self.ckpt_dir, f"{stage}-{step:06d}", state)
        barrier()
        if self.dist.is_main:
            _prune_checkpoints(self.ckpt_dir, stage, self.cfg.log.keep_checkpoints)
        barrier()

    def check_prompt(self, chat) -> None:
        """The first training question rendered as the policy sees it: checked to fit the rollout
        budget (axpo.train.checks.check_prompt), and written to output_dir/prompt.txt."""
        prompt = self.task.prompts(self.cfg.task.train_split, 0, 1, wrap=True)[0]
        ids = check_prompt(self.cfg, chat, prompt)
        if not self.dist.is_main:
            return
        text = chat.decode(ids)
        pad = "<|image_pad|>"
        text = re.sub(f"(?:{re.escape(pad)})+", lambda m: f"{pad}x{len(m.group()) // len(pad)}", text)
        with open(os.path.join(self.out, PROMPT_FILE), "w", encoding="utf-8") as f:
            f.write(text)

    def save_policy(self, trainer, policy: Policy, name: str) -> None:
        """The trainer's weights (gathered on every rank under ZeRO-3) saved as output_dir/name."""
        weights = trainer.weights()
        if self.dist.is_main:
            save_policy(policy, os.path.join(self.out, name), state_dict=weights)
        barrier()


def resume_point(run: RunState) -> dict | None:
    """{"tag", "stage", "step"} of output_dir's latest checkpoint, or None (none, or log.resume off).
    A `latest` that names no loadable checkpoint is a ValueError: never a silent fresh start."""
    if not run.cfg.log.resume:
        return None
    tag = _latest_tag(run.ckpt_dir)
    if tag is None:
        return None
    stage, _, step = tag.partition("-")
    latest = os.path.join(run.ckpt_dir, "latest")
    if stage not in ("sft", "rl") or not step.isdigit():
        raise ValueError(f"{latest} names an unknown checkpoint tag {tag!r} (expected sft-NNNNNN or rl-NNNNNN)")
    if not os.path.isdir(os.path.join(run.ckpt_dir, tag)):
        raise ValueError(f"{latest} names checkpoint {tag!r}, which is not in {run.ckpt_dir}: restore it, "
                         "or set log.resume=false to start over")
    return {"tag": tag, "stage": stage, "step": int(step)}
