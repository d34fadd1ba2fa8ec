"""The jobs behind the command line: `train` (SFT warm-start, then GRPO / Dr.GRPO / AXPO RL),
`evaluate` (Pass@k on a task split) and `compare` (GRPO vs AXPO over seeds).

Every random choice of a step is a function of (seed, stage, step, rank): the data (task examples
[step * B, (step + 1) * B)), the sampling seed and the uids. A checkpoint therefore needs only the
weights, the optimizer and the step (RNG states are saved and restored too), and a run killed at
any point and resumed ends with the same weights as one that was not.

Layout of output_dir: metrics.jsonl, checkpoints/ (DeepSpeed, tags sft-NNNNNN / rl-NNNNNN),
sft_policy/ (the warm-started policy: the RL stage's start and its KL reference), final/ (the
trained policy), rollout_init/ (with rollout.engine=vllm and no saved policy to start from: the
built policy vLLM loads), learning_curves.png, summary.json, config.yaml.
"""
from __future__ import annotations

import copy
import gc
import hashlib
import json
import os
import random
import shutil
import time
from typing import Sequence

import numpy as np
import torch
import yaml

from ..algo import AxpoConfig, assemble_advantages, plan_resample, step_diagnostics
from ..models import Policy, build_tiny_policy, load_policy, policy_from_model, save_policy
from ..rollout import ChatFormat, SamplingSettings, TransformersEngine, VllmEngine
from ..tasks import make_task, sft_batch
from ..tools import default_registry
from . import report
from .config import Config, config_to_dict
from .distributed import DistInfo, all_gather_objects, all_reduce_sum, barrier, setup
from .trainer import PolicyTrainer, ReferencePolicy, Row

__all__ = ["train", "evaluate", "compare", "build_task", "build_policy", "build_engine"]

CHECKPOINTS = "checkpoints"
SFT_POLICY = "sft_policy"
FINAL_POLICY = "final"
ROLLOUT_INIT = "rollout_init"


def _seed(*parts) -> int:
    """A 31-bit seed from the parts (stable across processes and Python versions)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little") & 0x7FFFFFFF


# -- building blocks ------------------------------------------------------------------------------
def build_task(cfg: Config):
    if cfg.task.name == "zoom_digits":
        return make_task("zoom_digits", seed=cfg.task.seed)
    return make_task("local", path=cfg.task.path, question_key=cfg.task.question_key, image_key=cfg.task.image_key,
                     answer_key=cfg.task.answer_key)


def build_policy(cfg: Config, task, path: str | None = None) -> Policy:
    """The policy to start from: `path` (a saved policy), else model.name_or_path, else the tiny
    Qwen3-VL built from a config with the run's seed. The image budget is set from the config or task."""
    dtype = torch.bfloat16 if cfg.trainer.dtype == "bfloat16" else torch.float32
    source = path or cfg.model.name_or_path
    if source is not None:
        policy = load_policy(source, dtype=dtype)
    else:
        shape = {} if cfg.model.tiny_head_dim is None else {"head_dim": cfg.model.tiny_head_dim}
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


def _sampling(cfg: Config, seed: int, temperature: float | None = None) -> SamplingSettings:
    r = cfg.rollout
    return SamplingSettings(temperature=r.temperature if temperature is None else temperature, top_k=r.top_k,
                            top_p=r.top_p, max_new_tokens=r.max_new_tokens, max_turns=r.max_turns,
                            max_total_tokens=r.max_total_tokens, seed=seed)


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict | None) -> None:
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
    with open(path) as f:
        return f.read().strip() or None


def _prune_checkpoints(ckpt_dir: str, stage: str, keep: int) -> None:
    tags = sorted(t for t in os.listdir(ckpt_dir) if t.startswith(stage + "-") and os.path.isdir(os.path.join(ckpt_dir, t)))
    for tag in tags[:-keep]:
        shutil.rmtree(os.path.join(ckpt_dir, tag), ignore_errors=True)


class _Run:
    """State shared by the stages of one `train` call."""

    def __init__(self, cfg: Config, dist: DistInfo):
        self.cfg, self.dist = cfg, dist
        self.out = cfg.log.output_dir
        self.ckpt_dir = os.path.join(self.out, CHECKPOINTS)
        self.task = build_task(cfg)
        self.logger: report.MetricsLogger | None = None

    def log(self, stage: str, step: int, global_step: int, metrics: dict) -> None:
        if self.logger is not None:
            self.logger.log(stage, step, global_step, metrics)

    def save(self, trainer: PolicyTrainer, stage: str, step: int, global_step: int) -> None:
        state = {"stage": stage, "step": step, "global_step": global_step, "rng": _rng_state()}
        trainer.save(self.ckpt_dir, f"{stage}-{step:06d}", state)
        barrier()
        if self.dist.is_main:
            _prune_checkpoints(self.ckpt_dir, stage, self.cfg.log.keep_checkpoints)
        barrier()


def _quiet() -> None:
    """No per-file progress bars from transformers, no per-step logs from DeepSpeed: the run has its own."""
    import logging

    import transformers
    from deepspeed.utils import logger as ds_logger

    transformers.utils.logging.disable_progress_bar()
    ds_logger.setLevel(logging.WARNING)


def _pad_id(policy: Policy) -> int:
    return int(policy.tokenizer.pad_token_id or 0)


# -- SFT --------------------------------------------------------------------------------------------
def _run_sft(run: _Run, policy: Policy, resume: dict | None) -> None:
    cfg, dist = run.cfg, run.dist
    trainer = PolicyTrainer(policy, cfg.trainer, dist, lr=cfg.sft.lr, warmup_steps=cfg.sft.warmup_steps,
                            pad_id=_pad_id(policy))
    start = 0
    if resume is not None:
        state = trainer.load(run.ckpt_dir, resume["tag"])
        _set_rng_state(state.get("rng"))
        start = int(state["step"])
    chat, tools = ChatFormat(policy.tokenizer, policy.image_processor), default_registry()
    with report.Progress(cfg.sft.steps, "sft", enabled=cfg.log.progress and dist.is_main,
                         keys=("loss", "entropy", "lr"), initial=start) as bar:
        for step in range(start, cfg.sft.steps):
            examples = sft_batch(run.task, chat, tools, step=step, batch_size=cfg.sft.batch_size,
                                 tool_fraction=cfg.sft.tool_fraction, seed=_seed(cfg.seed, "sft"),
                                 split=cfg.task.train_split)
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
    _save_trained(run, trainer, policy, SFT_POLICY)
    del trainer
    gc.collect()


def _save_trained(run: _Run, trainer: PolicyTrainer, policy: Policy, name: str) -> None:
    weights = trainer.weights()  # every rank (a gather under ZeRO-3)
    if run.dist.is_main:
        save_policy(policy, os.path.join(run.out, name), state_dict=weights)
    barrier()


# -- evaluation -------------------------------------------------------------------------------------
def evaluate_engine(engine, task, cfg: Config, dist: DistInfo, *, split: str, questions: int, samples: int,
                    seed: int) -> tuple[dict, list]:
    """Pass@k on `questions` examples of `split` with `samples` rollouts each (sharded over ranks);
    returns (eval_summary, all rollouts)."""
    prompts = task.prompts(split, 0, questions, wrap=True)
    mine = [(i, p) for i, p in enumerate(prompts) if i % dist.world == dist.rank]
    for i, p in mine:
        p.group_id = i
    engine.reset_uids(dist.rank, dist.world)
    rollouts = engine.generate([p for _, p in mine], _sampling(cfg, _seed(seed, "eval", dist.rank),
                                                                 cfg.eval.temperature),
                               n=samples, retain_prefixes=False) if mine else []
    everything = [r for part in all_gather_objects(rollouts) for r in part]
    return report.eval_summary(everything), everything  # Pass@1, 2, 4, ... up to `samples`


# -- RL -----------------------------------------------------------------------------------------------
def _rl_step(run: _Run, trainer: PolicyTrainer, engine, reference, step: int, axpo_cfg: AxpoConfig) -> dict:
    cfg, dist = run.cfg, run.dist
    B, G = cfg.rl.questions_per_step, cfg.rl.group_size
    sampling = _sampling(cfg, _seed(cfg.seed, "rl", step, dist.rank))
    prompts = run.task.prompts(cfg.task.train_split, step * B, B, wrap=True)
    mine = [(i, p) for i, p in enumerate(prompts) if i % dist.world == dist.rank]
    for i, p in mine:
        p.group_id = i
    t0 = time.perf_counter()
    before = dict(engine.stats)
    engine.reset_uids(dist.rank, dist.world)
    rollouts = engine.generate([p for _, p in mine], sampling, n=G)
    everything = sorted((r for part in all_gather_objects(rollouts) for r in part), key=lambda r: (r.group_id, r.uid))
    plan = plan_resample(everything, B, G, axpo_cfg)
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
    chunks = [[s for s in samples if chunk_of.get(s.group_id) == j] for j in range(U)]
    t1 = time.perf_counter()
    train_metrics: dict[str, float] = {}
    for chunk in chunks:
        m = trainer.rl_step([Row.from_sample(s) for s in chunk], agg=cfg.loss_agg, clip_low=cfg.rl.clip_low,
                            clip_high=cfg.rl.clip_high, kl_coef=cfg.rl.kl_coef, kl_estimator=cfg.rl.kl_estimator,
                            temperature=cfg.rollout.temperature, reference=reference,
                            norm_tokens=cfg.rl.loss_norm_tokens, entropy_coef=cfg.rl.entropy_coef)
        for k, v in m.items():  # mean over the updates
            train_metrics[k] = train_metrics.get(k, 0.0) + v / U
    engine.load_weights(trainer.weights())  # weight sync to the rollout engine
    train_time = time.perf_counter() - t1

    names = ("prefill_tokens", "prefill_tokens_saved", "generated_tokens", "resample_prompt_tokens",
             "resample_prefill_tokens_saved")
    summed = all_reduce_sum([engine.stats[k] - before.get(k, 0) for k in names])
    extra = dict(zip(names, summed))
    prefill = extra["prefill_tokens"] + extra["prefill_tokens_saved"]
    extra["prefix_cache_hit_rate"] = extra["prefill_tokens_saved"] / prefill if prefill else 0.0
    if extra["resample_prompt_tokens"]:
        extra["resample_prefix_hit_rate"] = extra["resample_prefill_tokens_saved"] / extra["resample_prompt_tokens"]
    extra["rollouts"] = float(len(everything) + len(all_conts))
    extra["rollout_tokens"] = float(sum(int(r.trainable.sum()) for r in everything + all_conts))
    extra.update(train_metrics)
    extra["rollout_time_s"] = rollout_time
    extra["train_time_s"] = train_time
    return step_diagnostics(everything, plan, all_conts, extra=extra)


def _run_rl(run: _Run, resume: dict | None) -> dict:
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
    engine = build_engine(cfg, policy, dist.device, model_dir)
    trainer = PolicyTrainer(policy, cfg.trainer, dist, lr=cfg.rl.lr, pad_id=_pad_id(policy))
    start = 0
    if resume is not None:
        state = trainer.load(run.ckpt_dir, resume["tag"])
        _set_rng_state(state.get("rng"))
        start = int(state["step"])
        engine.load_weights(trainer.weights())
    axpo_cfg = AxpoConfig(algorithm=cfg.rl.algorithm, resample=cfg.rl.resample, ratio=cfg.rl.ratio, k=cfg.rl.k,
                          score=cfg.rl.score, eps=cfg.rl.adv_eps, tie_break=cfg.rl.tie_break)
    base = cfg.sft.steps
    eval_seed = _seed(cfg.seed, "eval")

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
    _save_trained(run, trainer, policy, FINAL_POLICY)
    return {"final_eval": last_eval}


def _rl_loop(run: _Run, trainer, engine, reference, axpo_cfg: AxpoConfig, start: int, maybe_eval) -> dict | None:
    cfg, base = run.cfg, run.cfg.sft.steps
    last_eval = maybe_eval(0) if start == 0 else None
    with report.Progress(cfg.rl.steps, cfg.rl.algorithm, enabled=cfg.log.progress and run.dist.is_main,
                         initial=start) as bar:
        for step in range(start, cfg.rl.steps):
            t0 = time.perf_counter()
            metrics = _rl_step(run, trainer, engine, reference, step, axpo_cfg)
            metrics["step_time_s"] = time.perf_counter() - t0
            done = step + 1
            run.log("rl", done, base + done, metrics)
            bar.update(metrics)
            last_eval = maybe_eval(done) or last_eval
            if done == cfg.rl.steps or (cfg.log.checkpoint_every and done % cfg.log.checkpoint_every == 0):
                run.save(trainer, "rl", done, base + done)
    return last_eval


def _resume_point(run: _Run) -> dict | None:
    if not run.cfg.log.resume:
        return None
    tag = _latest_tag(run.ckpt_dir)
    if tag is None:
        return None
    stage, _, step = tag.partition("-")
    if stage not in ("sft", "rl") or not step.isdigit():
        raise ValueError(f"{run.ckpt_dir}/latest names an unknown checkpoint tag {tag!r}")
    return {"tag": tag, "stage": stage, "step": int(step)}


def train(cfg: Config) -> dict:
    """SFT warm-start (sft.steps) then RL (rl.steps) on the configured task; resumes from
    output_dir's latest checkpoint when log.resume. Returns the summary (also in summary.json)."""
    dist = setup(cfg.trainer.device)
    _quiet()
    if cfg.rl.questions_per_step < dist.world * cfg.rl.updates_per_step:
        raise ValueError(f"config rl.questions_per_step ({cfg.rl.questions_per_step}) must be at least the "
                         f"world size ({dist.world}) times rl.updates_per_step ({cfg.rl.updates_per_step})")
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2 ** 32)
    torch.manual_seed(cfg.seed)
    run = _Run(cfg, dist)
    resume = _resume_point(run)
    if dist.is_main:
        os.makedirs(run.out, exist_ok=True)
        with open(os.path.join(run.out, "config.yaml"), "w") as f:
            yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)
        resume_global = None
        if resume is not None:
            resume_global = resume["step"] + (cfg.sft.steps if resume["stage"] == "rl" else 0)
        run.logger = report.MetricsLogger(run.out, resume_step=resume_global, tensorboard=cfg.log.tensorboard)
    barrier()
    t0 = time.perf_counter()
    try:
        sft_done = resume is not None and (resume["stage"] == "rl" or resume["step"] >= cfg.sft.steps)
        if cfg.sft.steps > 0 and not sft_done:
            policy = build_policy(cfg, run.task)
            _run_sft(run, policy, resume if resume is not None and resume["stage"] == "sft" else None)
            del policy
        result = _run_rl(run, resume if resume is not None and resume["stage"] == "rl" else None)
    finally:
        if run.logger is not None:
            run.logger.close()
    summary = {"output_dir": run.out, "world_size": dist.world, "wall_time_s": time.perf_counter() - t0,
               "resumed_from": resume["tag"] if resume else None, **result}
    if dist.is_main:
        metrics_path = os.path.join(run.out, "metrics.jsonl")
        if cfg.log.plot:
            summary["plot"] = report.plot_learning_curves(metrics_path, os.path.join(run.out, "learning_curves.png"),
                                                          title=f"{cfg.rl.algorithm} on {cfg.task.name}")
        with open(os.path.join(run.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, default=str)
    barrier()
    return summary


def evaluate(cfg: Config, policy_path: str | None, *, split: str | None = None, questions: int | None = None,
             samples: int | None = None) -> dict:
    """Pass@1 / Pass@k of a saved policy (default: output_dir/final) on a task split."""
    dist = setup(cfg.trainer.device)
    _quiet()
    task = build_task(cfg)
    path = policy_path or os.path.join(cfg.log.output_dir, FINAL_POLICY)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no saved policy at {path}: train first, or pass the policy directory")
    policy = build_policy(cfg, task, path)
    engine = build_engine(cfg, policy, dist.device, path)
    try:
        summary, _ = evaluate_engine(engine, task, cfg, dist, split=split or cfg.task.eval_split,
                                     questions=questions or cfg.eval.questions, samples=samples or cfg.eval.samples,
                                     seed=_seed(cfg.seed, "eval"))
    finally:
        engine.shutdown()
    return summary


def compare(cfg: Config, seeds: Sequence[int], methods: Sequence[str] = ("grpo", "axpo"), *,
            output_dir: str | None = None) -> dict:
    """For each seed: one SFT warm-start, then RL with each method from it (same data, same
    starting weights). Writes compare.md (means, spread, rollout budget) and compare_*.png."""
    dist = setup(cfg.trainer.device)
    out = output_dir or os.path.join(os.path.dirname(cfg.log.output_dir.rstrip("/")) or ".", "compare")
    runs, curves, eval_curves = [], {m: [] for m in methods}, {m: [] for m in methods}
    for seed in seeds:
        base = copy.deepcopy(cfg)
        base.seed = seed
        base.log.plot = False
        sft_dir = os.path.join(out, f"seed{seed}", "sft")
        if cfg.sft.steps > 0:
            sft_cfg = copy.deepcopy(base)
            sft_cfg.rl.steps = 0
            sft_cfg.eval.questions = 0
            sft_cfg.log.output_dir = sft_dir
            train(sft_cfg)
        for method in methods:
            run_cfg = copy.deepcopy(base)
            run_cfg.rl.algorithm = method
            run_cfg.sft.steps = 0
            if cfg.sft.steps > 0:
                run_cfg.model.name_or_path = os.path.join(sft_dir, SFT_POLICY)
            run_cfg.log.output_dir = os.path.join(out, f"seed{seed}", method)
            run_cfg.validate()
            summary = train(run_cfg)
            lines = report.read_metrics(os.path.join(run_cfg.log.output_dir, "metrics.jsonl"))
            rl = [m for m in lines if m["stage"] == "rl"]
            evals = [m for m in lines if m["stage"] == "eval"]
            final = dict(summary.get("final_eval") or {})
            tail = rl[-5:]
            final["train_reward_last5"] = float(np.mean([m.get("pass1", 0.0) or 0.0 for m in tail])) if tail else float("nan")
            final["tool_call_rate_last5"] = float(np.mean([m.get("tool_call_rate", 0.0) or 0.0 for m in tail])) if tail else float("nan")
            runs.append({"method": method, "seed": seed, "metrics": final,
                         "rollouts": int(sum(m.get("rollouts", 0) or 0 for m in rl)),
                         "rollout_tokens": int(sum(m.get("rollout_tokens", 0) or 0 for m in rl))})
            curves[method].append([m.get("pass1", float("nan")) for m in rl])
            eval_curves[method].append([m.get("pass@1", float("nan")) for m in evals])
    result = {"runs": runs}
    if dist.is_main:
        os.makedirs(out, exist_ok=True)
        metric_names = [k for k in ("pass@1", f"pass@{cfg.eval.samples}", "pass@1_tool", "pass@1_no_tool",
                                    "tool_call_rate", "train_reward_last5", "tool_call_rate_last5")]
        table = report.compare_table(runs, metric_names)
        header = (f"# GRPO vs AXPO on {cfg.task.name}\n\n"
                  f"Seeds {list(seeds)}; per seed one SFT warm-start ({cfg.sft.steps} steps) shared by the methods, "
                  f"then {cfg.rl.steps} RL steps of {cfg.rl.questions_per_step} questions x {cfg.rl.group_size} "
                  f"rollouts; AXPO adds r={cfg.rl.ratio}, K={cfg.rl.k} resamples (rollout budget in the table). "
                  f"Final evaluation: {cfg.eval.questions} held-out questions x {cfg.eval.samples} samples "
                  f"(temperature {cfg.eval.temperature}).\n\n")
        with open(os.path.join(out, "compare.md"), "w") as f:
            f.write(header + table)
        with open(os.path.join(out, "compare.json"), "w") as f:
            json.dump(runs, f, indent=2, default=float)
        report.plot_compare(curves, os.path.join(out, "compare_train_reward.png"), ylabel="train reward (pass1)",
                            title="train reward per RL step")
        report.plot_compare(eval_curves, os.path.join(out, "compare_eval_pass1.png"), ylabel="eval pass@1",
                            title="held-out pass@1 per evaluation")
        result["table"] = header + table
        result["output_dir"] = out
    return result
