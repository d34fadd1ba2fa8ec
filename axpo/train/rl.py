"""The RL stage: rollouts, the method's resample step (axpo.algo), advantages, the policy-gradient
update, the weight sync to the rollout engine, held-out evaluations and checkpoints.

Every random choice of a step is a function of (seed, step, rank): its questions (task examples
[step * B, (step + 1) * B)), the sampling seed, the uids and a random prefix order. The method
(rl.algorithm, a registered axpo.algo.Method) decides the group size, whether and from where the
step resamples, and the loss aggregation (cfg.loss_agg).
"""
from __future__ import annotations

import os
import time

from ..algo import AxpoConfig, assemble_advantages, plan_resample, step_diagnostics
from ..models import save_policy
from .build import axpo_config, build_engine, build_policy, derive_seed, pad_id, sampling_settings
from .checkpoint import FINAL_POLICY, ROLLOUT_INIT, SFT_POLICY, RunState, restore_rng_state
from .distributed import all_gather_objects, all_reduce_sum, barrier
from .evaluate import evaluate_engine
from .logs import Progress
from .trainer import PolicyTrainer, ReferencePolicy, Row

__all__ = ["run_rl", "rl_step"]

_ENGINE_COUNTERS = ("prefill_tokens", "prefill_tokens_saved", "generated_tokens", "resample_prompt_tokens",
                    "resample_prefill_tokens_saved")


def rl_step(run: RunState, trainer: PolicyTrainer, engine, reference, step: int, axpo_cfg: AxpoConfig) -> dict:
    cfg, dist = run.cfg, run.dist
    B, G = cfg.rl.questions_per_step, cfg.rl.group_size
    method = axpo_cfg.method
    sampling = sampling_settings(cfg, derive_seed(cfg.seed, "rl", step, dist.rank))
    prompts = run.task.prompts(cfg.task.train_split, step * B, B, wrap=True)
    mine = [(i, p) for i, p in enumerate(prompts) if i % dist.world == dist.rank]
    for i, p in mine:
        p.group_id = i
    t0 = time.perf_counter()
    before = dict(engine.stats)
    engine.reset_uids(dist.rank, dist.world)
    rollouts = engine.generate([p for _, p in mine], sampling, n=method.group_size(G, cfg.rl.ratio))
    everything = sorted((r for part in all_gather_objects(rollouts) for r in part), key=lambda r: (r.group_id, r.uid))
    plan = plan_resample(everything, B, G, axpo_cfg, seed=derive_seed(cfg.seed, "select", step))
    own = {r.uid: r for r in rollouts}
    selected = [(own[c.uid], c.prefix_len) for c in plan.selected if c.uid in own]
    continuations = [c for g in engine.resample(selected, axpo_cfg.k, sampling) for c in g] if selected else []
    engine.release()
    engine.sleep()  # vLLM's sleep mode (when on): its GPU memory is the trainer's until the weight sync
    all_conts = sorted((c for part in all_gather_objects(continuations) for c in part), key=lambda r: (r.group_id, r.uid))
    rollout_time = time.perf_counter() - t0

    samples = assemble_advantages(everything, all_conts, axpo_cfg)
    my_groups = sorted({i for i, _ in mine})
    # mini-batches by group: chunk j holds this rank's groups j, j + U, ...
    U = cfg.rl.updates_per_step
    chunk_of = {g: j % U for j, g in enumerate(my_groups)}
    chunks = [[Row.from_sample(s) for s in samples if chunk_of.get(s.group_id) == j] for j in range(U)]
    t1 = time.perf_counter()
    if cfg.recompute_old_logprobs:  # before any update of the step: pi_old is the policy that sampled
        trainer.recompute_old_logprobs([r for chunk in chunks for r in chunk], cfg.rollout.temperature)
    train_metrics: dict[str, float] = {}
    for chunk in chunks:
        m = trainer.rl_step(chunk, agg=cfg.loss_agg, clip_low=cfg.rl.clip_low,
                            clip_high=cfg.rl.clip_high, kl_coef=cfg.rl.kl_coef, kl_estimator=cfg.rl.kl_estimator,
                            temperature=cfg.rollout.temperature, reference=reference,
                            norm_tokens=cfg.rl.loss_norm_tokens, entropy_coef=cfg.rl.entropy_coef,
                            rollout_correction=cfg.rollout_correction, rollout_cap=cfg.rl.rollout_cap)
        for k, v in m.items():  # mean over the updates
            train_metrics[k] = train_metrics.get(k, 0.0) + v / U
    engine.load_weights(trainer.weights())  # weight sync to the rollout engine
    train_time = time.perf_counter() - t1

    summed = all_reduce_sum([engine.stats[k] - before.get(k, 0) for k in _ENGINE_COUNTERS])
    extra = dict(zip(_ENGINE_COUNTERS, summed))
    prefill = extra["prefill_tokens"] + extra["prefill_tokens_saved"]
    extra["prefix_cache_hit_rate"] = extra["prefill_tokens_saved"] / prefill if prefill else 0.0
    if extra["resample_prompt_tokens"]:
        extra["resample_prefix_hit_rate"] = extra["resample_prefill_tokens_saved"] / extra["resample_prompt_tokens"]
    extra["rollouts"] = float(len(everything) + len(all_conts))
    # the tokens sampled for this step's rollouts: a continuation's copied prefix is not counted
    extra["rollout_tokens"] = float(sum(int(r.trainable[r.prefix_len or 0:].sum()) for r in everything + all_conts))
    extra.update(train_metrics)
    extra["rollout_time_s"] = rollout_time
    extra["train_time_s"] = train_time
    return step_diagnostics(everything, plan, all_conts, extra=extra)


def run_rl(run: RunState, resume: dict | None) -> dict:
    cfg, dist = run.cfg, run.dist
    sft_path = os.path.join(run.out, SFT_POLICY)
    start_path = sft_path if os.path.isdir(sft_path) else None
    policy = build_policy(cfg, run.task, start_path)
    reference = ReferencePolicy(policy, cfg.trainer, dist) if cfg.rl.kl_coef > 0 else None
    model_dir = start_path or cfg.model.name_or_path
    if cfg.rollout.engine == "vllm" and model_dir is None:  # the tiny built policy: vLLM loads it from disk
        model_dir = os.path.join(run.out, ROLLOUT_INIT)
        if dist.is_main:
            save_policy(policy, model_dir)
        barrier()
    engine = build_engine(cfg, policy, dist.device, model_dir, tools=run.tools)
    run.check_prompt(engine.chat)
    trainer = PolicyTrainer(policy, cfg.trainer, dist, lr=cfg.rl.lr, pad_id=pad_id(policy))
    start = 0
    if resume is not None:
        state = trainer.load(run.ckpt_dir, resume["tag"])
        restore_rng_state(state.get("rng"))
        start = int(state["step"])
        engine.load_weights(trainer.weights())
    axpo_cfg = axpo_config(cfg)
    base = cfg.sft.steps
    eval_seed = derive_seed(cfg.seed, "eval")

    def maybe_eval(done: int) -> dict | None:
        due = done == cfg.rl.steps or (cfg.eval.every and done % cfg.eval.every == 0)
        if not due or cfg.eval.questions == 0:
            return None
        summary, _ = evaluate_engine(engine, run.task, cfg, dist, split=cfg.task.eval_split,
                                     questions=cfg.eval.questions, samples=cfg.eval.samples, seed=eval_seed)
        run.log("eval", done, base + done, summary)
        return summary

    try:
        last_eval = _rl_loop(run, trainer, engine, reference, axpo_cfg, start, maybe_eval)
    finally:
        engine.shutdown()
    run.save_policy(trainer, policy, FINAL_POLICY)
    return {"final_eval": last_eval}


def _rl_loop(run: RunState, trainer, engine, reference, axpo_cfg: AxpoConfig, start: int, maybe_eval) -> dict | None:
    cfg, base = run.cfg, run.cfg.sft.steps
    last_eval = maybe_eval(0) if start == 0 else None
    with Progress(cfg.rl.steps, cfg.rl.algorithm, enabled=cfg.log.progress and run.dist.is_main,
                  initial=start) as bar:
        for step in range(start, cfg.rl.steps):
            t0 = time.perf_counter()
            metrics = rl_step(run, trainer, engine, reference, step, axpo_cfg)
            metrics["step_time_s"] = time.perf_counter() - t0
            done = step + 1
            run.log("rl", done, base + done, metrics)
            bar.update(metrics)
            last_eval = maybe_eval(done) or last_eval
            if done == cfg.rl.steps or (cfg.log.checkpoint_every and done % cfg.log.checkpoint_every == 0):
                run.save(trainer, "rl", done, base + done)
    return last_eval
