"""Run by test_zero3.py in its own process: the fused LM-head op under DeepSpeed ZeRO-3 (CPU,
gloo) must give the same loss and gradients as plain PyTorch. Prints one JSON line."""
import copy
import json
import os
import sys

import torch

from axpo.ops import LinearLogprobEntropy, linear_logprob_entropy


class TinyLM(torch.nn.Module):
    def __init__(self, hidden: int, vocab: int):
        super().__init__()
        self.body = torch.nn.Linear(hidden, hidden)
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False)

    def forward(self, x, labels):
        h = torch.tanh(self.body(x))
        # The fused call runs inside lm_head's forward, where ZeRO-3 has gathered its weight.
        logprobs, entropy = self.lm_head(h, labels)
        return -logprobs.mean() - 0.01 * entropy.mean()


def main():
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    torch.manual_seed(0)
    hidden, vocab, n = 16, 1000, 12
    model = TinyLM(hidden, vocab)
    model.lm_head = LinearLogprobEntropy.from_linear(model.lm_head, chunk_size=256)  # swap in before initialize
    plain = copy.deepcopy(model)
    x, labels = torch.randn(n, hidden), torch.randint(0, vocab, (n,))
    labels[3] = -100

    loss_plain = plain(x, labels)
    loss_plain.backward()

    config = {
        "train_micro_batch_size_per_gpu": n,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    partitioned = engine.module.lm_head.weight.numel() == 0  # ZeRO-3 holds only a shard outside forward
    loss = engine(x, labels)
    engine.backward(loss)
    grads = {name: safe_get_full_grad(p) for name, p in engine.module.named_parameters()}
    result = {
        "partitioned": bool(partitioned),
        "loss": float(loss), "loss_plain": float(loss_plain),
        "max_grad_err": {
            name: float((grads[name] - p.grad).abs().max()) for name, p in plain.named_parameters()
        },
    }
    # The wrong way: reading the partitioned weight outside the module's forward.
    try:
        linear_logprob_entropy(x[:, :hidden], engine.module.lm_head.weight, labels)
        result["outside_forward_error"] = None
    except ValueError as e:
        result["outside_forward_error"] = str(e)
    print(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sys.exit(main())
