"""One AXPO step, end to end, on a tiny Qwen3-VL built from a config (CPU, about 30 s on 2 cores):

    rollouts -> trigger -> select prefixes -> resample from forked KV -> advantages

The task: a grey 32x32 image with a small colored square somewhere; "What color is the small
square?". At the model's input resolution the square is a few pixels, so zooming in helps. A short
supervised warm-start on generated traces (some zoom, some guess) teaches the random model the
format first, so that its rollouts call tools, often wrongly: where AXPO has work to do.

    python examples/axpo_step.py [--questions 4] [--group-size 8] [--sft-steps 400] [--seed 0]
"""
from __future__ import annotations

import argparse
import random
import time

import numpy as np
import torch
from PIL import Image

from axpo.algo import AxpoConfig, assemble_advantages, pack_samples, plan_resample, step_diagnostics
from axpo.models import batch_inputs, build_tiny_policy, policy_from_model
from axpo.rollout import Prompt, SamplingSettings, TransformersEngine
from axpo.tools import ToolContext, default_registry

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
QUESTION = "What color is the small square?"


def make_question(rng: random.Random) -> tuple[Prompt, tuple[int, int, int, int]]:
    canvas = np.full((32, 32, 3), 128, np.uint8)
    color = rng.choice(sorted(COLORS))
    x, y = rng.randrange(0, 29), rng.randrange(0, 29)
    canvas[y:y + 3, x:x + 3] = COLORS[color]
    box = (max(0, x - 4), max(0, y - 4), min(32, x + 7), min(32, y + 7))
    return Prompt(QUESTION, [Image.fromarray(canvas)], answer=color), box


def warm_start(policy, engine, steps: int, rng: random.Random) -> None:
    """Teacher-forced SFT on generated traces: 1 in 3 zooms (then answers right), the rest guess."""
    chat, tools = engine.chat, engine.tools
    opt = torch.optim.AdamW(policy.model.parameters(), lr=3e-3)
    policy.model.train()
    for step in range(steps):
        rows, images, labels = [], [], []
        for _ in range(8):
            prompt, box = make_question(rng)
            ids, imgs = chat.prompt(prompt.question, prompt.images), list(prompt.images)
            label = [-100] * len(ids)
            if rng.random() < 1 / 3:
                call = '{"name": "zoom", "arguments": {"bbox_2d": [%d, %d, %d, %d]}}' % box
                turn = chat.encode(f"<think>zoom</think><tool_call>{call}</tool_call>")
                result = tools.execute(call, ToolContext(images=imgs))
                response = chat.tool_response(result.text, result.images)
                imgs += result.images
                answer = chat.encode(f"<answer>{prompt.answer}</answer><|im_end|>")
                ids, label = ids + turn + response + answer, label + turn + [-100] * len(response) + answer
            else:
                guess = chat.encode(f"<think>guess</think><answer>{rng.choice(sorted(COLORS))}</answer><|im_end|>")
                ids, label = ids + guess, label + guess
            rows.append(ids), images.append(imgs), labels.append(label)
        inputs = batch_inputs(policy, rows, images, pad_id=chat.pad_id, left_pad=False)
        target = torch.full_like(inputs["input_ids"], -100)
        for b, label in enumerate(labels):
            target[b, :len(label)] = torch.tensor(label)
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
    ap.add_argument("--sft-steps", type=int, default=400)
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    model, tokenizer = build_tiny_policy(seed=args.seed)
    policy = policy_from_model(model, tokenizer)
    engine = TransformersEngine(policy, tools=default_registry())

    t0 = time.perf_counter()
    print(f"warm-start ({args.sft_steps} steps)")
    warm_start(policy, engine, args.sft_steps, rng)

    sampling = SamplingSettings(temperature=1.0, max_new_tokens=96, max_turns=3, seed=args.seed)
    prompts = [make_question(rng)[0] for _ in range(args.questions)]
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
