"""`axpo train`: the SFT warm-start (axpo.train.sft), then RL with the configured method
(axpo.train.rl), resuming from output_dir's latest checkpoint; summary.json and the learning
curves at the end.

Every random choice of a step is a function of (seed, stage, step, rank), so a checkpoint needs
only the weights, the optimizer and the step (RNG states are saved and restored too), and a run
killed at any point and resumed ends with the same weights as one that was not. The output layout
is in axpo.train.checkpoint.
"""
from __future__ import annotations

import json
import os
import random
import time

import numpy as np
import torch
import yaml

from .build import build_policy, quiet
from .checkpoint import RunState, resume_point
from .checks import check_inputs, check_launch
from .config import Config, config_to_dict
from .distributed import barrier, setup
from .logs import METRICS_FILE, MetricsLogger
from .plots import plot_learning_curves
from .rl import run_rl
from .sft import run_sft

__all__ = ["train"]


def train(cfg: Config) -> dict:
    """SFT warm-start (sft.steps) then RL (rl.steps) on the configured task; resumes from
    output_dir's latest checkpoint when log.resume. Returns the summary (also in summary.json)."""
    dist = setup(cfg.trainer.device)
    quiet()
    check_launch(cfg, dist.world)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2 ** 32)
    torch.manual_seed(cfg.seed)
    run = RunState(cfg, dist)
    # everything the run reads is checked before it loads a model or writes into log.output_dir
    check_inputs(cfg, run.task)
    resume = resume_point(run)
    if dist.is_main:
        os.makedirs(run.out, exist_ok=True)
        with open(os.path.join(run.out, "config.yaml"), "w") as f:
            yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)
        resume_global = None
        if resume is not None:
            resume_global = resume["step"] + (cfg.sft.steps if resume["stage"] == "rl" else 0)
        run.logger = MetricsLogger(run.out, resume_step=resume_global, tensorboard=cfg.log.tensorboard)
    barrier()
    t0 = time.perf_counter()
    try:
        sft_done = resume is not None and (resume["stage"] == "rl" or resume["step"] >= cfg.sft.steps)
        if cfg.sft.steps > 0 and not sft_done:
            policy = build_policy(cfg, run.task)
            run_sft(run, policy, resume if resume is not None and resume["stage"] == "sft" else None)
            del policy
        result = run_rl(run, resume if resume is not None and resume["stage"] == "rl" else None)
    finally:
        if run.logger is not None:
            run.logger.close()
    summary = {"output_dir": run.out, "world_size": dist.world, "wall_time_s": time.perf_counter() - t0,
               "resumed_from": resume["tag"] if resume else None, **result}
    if dist.is_main:
        if cfg.log.plot:
            summary["plot"] = plot_learning_curves(os.path.join(run.out, METRICS_FILE),
                                                   os.path.join(run.out, "learning_curves.png"),
                                                   title=f"{cfg.rl.algorithm} on {cfg.task.name}")
        with open(os.path.join(run.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, default=str)
    barrier()
    return summary
