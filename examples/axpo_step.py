"""One AXPO step, end to end, on a tiny Qwen3-VL built from a config (CPU, under a minute on 2 cores):

    rollouts -> trigger -> select prefixes -> resample from forked KV -> advantages

The task is the built-in one (axpo.tasks.ZoomDigitsTask): a grid of digit glyphs seen at low
resolution, legible only through the zoom tool. A short supervised warm-start on its generated
traces (a minority zoom) teaches the random model the format first, so that its rollouts call
tools, often wrongly: where AXPO has work to do. `axpo train` runs the whole loop (DeepSpeed,
checkpoints, many steps); this script shows one step's pieces in plain PyTorch.

    python examples/axpo_step.py [--questions 4] [--group-size 8] [--sft-steps 300] [--seed 0]
"""
from __future__ import annotations

import argparse
import time

import torch

from axpo.algo import AxpoConfig, assemble_advantages, pack_samples, plan_resample, step_diagnostics
from axpo.models import batch_inputs, build_tiny_policy, policy_from_model
from axpo.rollout import SamplingSettings, TransformersEngine
from axpo.tasks import ZoomDigitsTask, sft_batch
from axpo.tools import default_registry


def warm_start(policy, engine, task, steps: int, seed: int, tool_fraction: float) -> None:
    """Teacher-forced SFT on the task's traces (`axpo train` does this under DeepSpeed)."""
    opt = torch.optim.AdamW(policy.model.parameters(), lr=3e-3)
    policy.model.train()
    for step in range(steps):
        batch = sft_batch(task, engine.chat, engine.tools, step=step, batch_size=16, tool_fraction=tool_fraction,
                          seed=seed)
        inputs = batch_inputs(policy, [e.token_ids for e in batch], [e.images for e in batch],
                              pad_id=engine.chat.pad_id, left_pad=False)
        target = torch.full_like(inputs["input_ids"], -100)
        for b, e in enumerate(batch):
            target[b, :len(e.labels)] = torch.tensor(e.labels)
        policy.model.model.rope_deltas = None
        loss = policy.model(**inputs, labels=target).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"  warm-start step {step:4d}  loss {loss.item():.3f}")
    policy.model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--sft-steps", type=int, default=300)
    ap.add_argument("--tool-fraction", type=float, default=0.5)
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    task = ZoomDigitsTask(seed=args.seed)
    model, tokenizer = build_tiny_policy(seed=args.seed)
    policy = policy_from_model(model, tokenizer)
    policy.image_processor.max_pixels = task.view_max_pixels
    engine = TransformersEngine(policy, tools=default_registry())

    t0 = time.perf_counter()
    print(f"warm-start ({args.sft_steps} steps)")
    warm_start(policy, engine, task, args.sft_steps, args.seed, args.tool_fraction)

    sampling = SamplingSettings(temperature=1.0, max_new_tokens=96, max_turns=2, seed=args.seed)
    prompts = task.prompts("train", 0, args.questions)
    rollouts = engine.generate(prompts, sampling, n=args.group_size)
    cfg = AxpoConfig(algorithm="axpo", ratio=args.ratio, k=args.k)
    plan = plan_resample(rollouts, args.questions, args.group_size, cfg)
    by_uid = {r.uid: r for r in rollouts}
    groups = engine.resample([(by_uid[c.uid], c.prefix_len) for c in plan.selected], cfg.k, sampling)
    continuations = [c for g in groups for c in g]
    samples = assemble_advantages(rollouts, continuations, cfg)
    batch = pack_samples(samples, pad_token_id=engine.chat.pad_id)
    diag = step_diagnostics(rollouts, plan, continuations,
                            extra={"prefill_tokens_saved": float(engine.stats["prefill_tokens_saved"])})

    print(f"\none AXPO step: {args.questions} questions x {args.group_size} rollouts, r={cfg.ratio}, K={cfg.k} "
          f"({time.perf_counter() - t0:.1f} s with the warm-start)")
    print(f"triggered groups {plan.triggered}; candidates {len(plan.candidates)}; budget P={plan.budget}; "
          f"selected {[(c.group_id, c.uid, round(c.confidence, 3)) for c in plan.selected]}")
    print(f"training batch: {batch['input_ids'].shape[0]} streams, {int(batch['loss_mask'].sum())} trained tokens")
    print("\ndiagnostics")
    for key in sorted(diag):
        print(f"  {key:40s} {diag[key]:.4g}" if isinstance(diag[key], float) else f"  {key:40s} {diag[key]}")


if __name__ == "__main__":
    main()
