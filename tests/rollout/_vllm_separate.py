"""Run by test_vllm_engine.py: a VllmEngine with colocate=False (vLLM in its own processes needs a
__main__ guard), weights changed and restored through load_weights."""
import sys

import torch


def main(path: str) -> None:
    from axpo.models import load_policy
    from axpo.rollout import Prompt, SamplingSettings, VllmEngine

    engine = VllmEngine(path, dtype="float32", block_size=32, enforce_eager=True, max_model_len=512, colocate=False)
    try:
        sampling = SamplingSettings(temperature=1.0, max_new_tokens=24, max_turns=1, seed=3)
        prompts = [Prompt("Other question?")]
        first = engine.generate(prompts, sampling, n=2)
        weights = load_policy(path).model.state_dict()
        engine.load_weights({k: v * 1.5 if v.dim() == 2 else v for k, v in weights.items()})
        changed = engine.generate(prompts, sampling, n=2)
        engine.load_weights(weights)
        restored = engine.generate(prompts, sampling, n=2)
        ids = lambda rs: [r.token_ids.tolist() for r in rs]  # noqa: E731
        print(f"OK changed={ids(changed) != ids(first)} restored={ids(restored) == ids(first)}")
    finally:
        engine.shutdown()


if __name__ == "__main__":
    torch.manual_seed(0)
    main(sys.argv[1])
