"""The SFT warm-start stage: the task's traces (a minority calling the tool), token-mean NLL of the
model turns, checkpoints; the result is saved as sft_policy/, RL's start and KL reference."""
from __future__ import annotations

import gc
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from ..models import Policy
from ..tasks import sft_batch
from .build import build_chat, derive_seed, pad_id
from .checkpoint import SFT_POLICY, RunState, restore_rng_state
from .logs import Progress
from .trainer import PolicyTrainer, Row

__all__ = ["run_sft"]


def run_sft(run: RunState, policy: Policy, resume: dict | None) -> None:
    cfg, dist = run.cfg, run.dist
    trainer = PolicyTrainer(policy, cfg.trainer, dist, lr=cfg.sft.lr, warmup_steps=cfg.sft.warmup_steps,
                            pad_id=pad_id(policy))
    start = 0
    if resume is not None:
        state = trainer.load(run.ckpt_dir, resume["tag"])
        restore_rng_state(state.get("rng"))
        start = int(state["step"])
    tools = run.tools
    chat = build_chat(cfg, policy, tools)
    run.check_prompt(chat)

    def batch(step: int):
        return sft_batch(run.task, chat, tools, step=step, batch_size=cfg.sft.batch_size,
                         tool_fraction=cfg.sft.tool_fraction, seed=derive_seed(cfg.seed, "sft"),
                         split=cfg.task.train_split)

    # the next step's traces (images rendered, tool calls run, tokens encoded) are made in a
    # thread while this step trains: the same data, off the critical path
    with Progress(cfg.sft.steps, "sft", enabled=cfg.log.progress and dist.is_main,
                  keys=("loss", "entropy", "lr"), initial=start) as bar, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(batch, start) if start < cfg.sft.steps else None
        for step in range(start, cfg.sft.steps):
            examples = pending.result()
            pending = pool.submit(batch, step + 1) if step + 1 < cfg.sft.steps else None
            mine = examples[dist.rank::dist.world]
            rows = [Row(e.token_ids, list(e.images), torch.tensor(e.labels) != -100) for e in mine]
            t0 = time.perf_counter()
            metrics = trainer.sft_step(rows)
            metrics["step_time_s"] = time.perf_counter() - t0
            run.log("sft", step + 1, step + 1, metrics)
            bar.update(metrics)
            done = step + 1
            if done == cfg.sft.steps or (cfg.log.checkpoint_every and done % cfg.log.checkpoint_every == 0):
                run.save(trainer, "sft", done, done)
    # the warm-started policy: RL starts from it and keeps it as the KL reference
    run.save_policy(trainer, policy, SFT_POLICY)
    del trainer
    gc.collect()
