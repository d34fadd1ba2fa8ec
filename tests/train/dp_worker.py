"""Run by test_trainer.py under torchrun (1 or 2 processes, CPU, gloo): one SFT step and one RL step
(KL to a reference, two micro-batches on rank 0) of the DeepSpeed trainer on a fixed global batch,
each rank taking its share. Rank 0 writes the losses and the final weights to argv[1], and the RL loss
of axpo.ops.policy_loss evaluated directly on the whole global batch in one forward ("direct_rl_loss"):
the trainer's aggregation over micro-batches and ranks must be that op's."""
import os
import sys

import numpy as np
import torch
from PIL import Image

from axpo.models import build_tiny_policy, policy_from_model
from axpo.rollout import ChatFormat
from axpo.train.config import TrainerConfig
from axpo.train.distributed import setup
from axpo.ops import policy_loss
from axpo.train.trainer import PolicyTrainer, ReferencePolicy, Row, _pad_field, _to_inputs


def global_batch(chat, n=6, images=True):
    """n rows of different lengths, each with an image (if images), fixed random trained spans / advantages."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        pixels = np.random.RandomState(i).randint(0, 255, (48 + 16 * (i % 2), 64, 3), dtype=np.uint8)
        image = [Image.fromarray(pixels)] if images else []
        ids = chat.prompt("Digit at row %d?" % i, image) + chat.encode("<think>" + "x" * (3 * i) + "</think><answer>7</answer><|im_end|>")
        mask = torch.zeros(len(ids), dtype=torch.bool)
        mask[-(10 + 3 * i):] = True
        rows.append(Row(ids, image, mask, torch.randn(len(ids), generator=g),
                        -3.0 + 0.5 * torch.rand(len(ids), generator=g)))
    return rows


def main(out_path: str, zero_stage: int, agg: str) -> None:
    dist = setup("cpu")
    model, tok = build_tiny_policy(seed=0)
    policy = policy_from_model(model, tok)
    policy.image_processor.max_pixels = 32 * 32
    chat = ChatFormat(tok, policy.image_processor)
    rows = global_batch(chat)
    mine = rows[dist.rank::dist.world]
    cfg = TrainerConfig(zero_stage=zero_stage, micro_batch_tokens=160)  # several micro-batches per rank
    reference = ReferencePolicy(policy, cfg, dist)
    trainer = PolicyTrainer(policy, cfg, dist, lr=1e-2, pad_id=chat.pad_id)
    sft = trainer.sft_step(mine)
    with torch.no_grad():  # the whole global batch at once, before the RL step changes the weights
        inputs, select = _to_inputs(policy, rows, chat.pad_id, dist.device)
        logp, _ = trainer.module(inputs, select, 0.8)
        t = select.shape[1]
        direct, _ = policy_loss(logp, _pad_field(rows, "old_logprobs", t, dist.device),
                                _pad_field(rows, "advantages", t, dist.device), select, clip_low=0.2,
                                clip_high=0.4, ref_logprobs=reference.logprobs(inputs, select, 0.8), kl_coef=0.1,
                                kl_estimator="k3", agg=agg,
                                **({"norm_tokens": 256} if agg == "seq-mean-token-sum-norm" else {}))
    rl = trainer.rl_step(mine, agg=agg, clip_low=0.2, clip_high=0.4, kl_coef=0.1, kl_estimator="k3",
                         temperature=0.8, reference=reference)
    weights = trainer.weights()
    if dist.rank == 0:
        torch.save({"sft": sft, "rl": rl, "weights": weights, "world": dist.world,
                    "direct_rl_loss": float(direct)}, out_path)


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
