"""The DeepSpeed trainer: the fused-head forward against the model's own logits, micro-batching,
and data parallelism (torchrun, 2 processes on CPU) against one process on the same global batch."""
import os
import subprocess
import sys

import pytest
import torch

from axpo.models import build_tiny_policy, policy_from_model
from axpo.rollout import ChatFormat
from axpo.train.trainer import LogprobModel, _to_inputs, micro_batches

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from dp_worker import global_batch  # noqa: E402


@pytest.mark.parametrize("lengths,budget", [([5, 3, 9, 1, 9, 2], 18), ([7], 3), ([], 10), ([4] * 10, 12)])
def test_micro_batches_cover_every_row_once_within_the_budget(lengths, budget):
    groups = micro_batches(lengths, budget)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        longest = max(lengths[i] for i in g)
        assert len(g) == 1 or len(g) * longest <= budget
    assert micro_batches(lengths, budget) == groups


@pytest.mark.parametrize("vision", [True, False])
def test_fused_forward_equals_the_models_own_logits(vision):
    """Right-padded batch, images, temperature: the selected tokens' log-probs and entropies equal
    log_softmax(logits / T) of an unpadded forward of each row (where the model builds its own positions)."""
    model, tok = build_tiny_policy(vision=vision, seed=1, initializer_range=0.2)
    policy = policy_from_model(model, tok)
    if vision:
        policy.image_processor.max_pixels = 32 * 32
    chat = ChatFormat(tok, policy.image_processor)
    rows = global_batch(chat, n=3, images=vision)
    module = LogprobModel(model)
    inputs, select = _to_inputs(policy, rows, chat.pad_id, "cpu")
    with torch.no_grad():
        logp, ent = module(inputs, select, temperature=0.7)
    for b, r in enumerate(rows):
        ids = torch.tensor([r.token_ids])
        kw = {}
        if vision:
            pv, grid = policy.image_processor(r.images[0])
            kw = dict(pixel_values=pv, image_grid_thw=grid[None], mm_token_type_ids=(ids == chat.image_pad).long())
            model.model.rope_deltas = None
        with torch.no_grad():
            logits = model(input_ids=ids, **kw).logits[0, :-1].double() / 0.7
        ref = torch.log_softmax(logits, -1)
        m = r.loss_mask[1:]
        expected = ref.gather(-1, ids[0, 1:, None])[:, 0][m]
        expected_ent = -(ref.exp() * ref).sum(-1)[m]
        n = len(r.token_ids)
        torch.testing.assert_close(logp[b, 1:n][m].double(), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ent[b, 1:n][m].double(), expected_ent, rtol=1e-4, atol=1e-4)
        assert (logp[b][~select[b]] == 0).all()


def _torchrun(nproc: int, out: str, stage: int, agg: str) -> dict:
    # --standalone: torchrun picks a free local port itself (no race between choosing and binding one)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(HERE, "dp_worker.py"), out, str(stage), agg]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("stage,agg", [(1, "token-mean"), (2, "seq-mean-token-sum-norm"), (3, "seq-mean-token-mean"),
                                       (1, "seq-mean-token-sum")])
def test_two_processes_take_the_same_step_as_one(tmp_path, stage, agg):
    """torchrun --nproc_per_node=2 (each rank half the batch, several micro-batches, ZeRO stage) gives the
    same SFT and RL losses, gradient norms and weights as one process on the whole batch."""
    one = _torchrun(1, str(tmp_path / "one.pt"), stage, agg)
    two = _torchrun(2, str(tmp_path / "two.pt"), stage, agg)
    assert (one["world"], two["world"]) == (1, 2)
    for phase in ("sft", "rl"):
        for key in ("loss", "grad_norm"):
            assert two[phase][key] == pytest.approx(one[phase][key], rel=1e-5), (phase, key)
    assert two["rl"]["kl"] == pytest.approx(one["rl"]["kl"], rel=1e-5)
    # and both are axpo.ops.policy_loss's value on the whole batch: one meaning of each aggregation
    assert one["rl"]["loss"] == pytest.approx(one["direct_rl_loss"], rel=1e-5)
    assert two["rl"]["clipfrac"] == pytest.approx(one["rl"]["clipfrac"], abs=1e-6)
    # Adam turns float32 reduction-order noise in near-zero gradients into at most a small part of a step
    # (lr 1e-2); a scaling mistake shows in the loss and gradient norm above
    for name, w in one["weights"].items():
        torch.testing.assert_close(two["weights"][name], w, rtol=0, atol=1e-3)
    moved = max((one["weights"][n] - w0).abs().max().item() for n, w0 in _initial_weights().items())
    assert moved > 1e-2  # the step did change the weights


def _initial_weights():
    model, _ = build_tiny_policy(seed=0)
    return {n: p.detach() for n, p in model.named_parameters()}


def test_recomputed_old_logprobs_and_the_rollout_correction(monkeypatch):
    """rl.recompute_old_logprobs: the trainer's own log-probs become the old ones and the engine's
    are kept as rollout_logprobs; rl_step then reports the mismatch and applies the correction."""
    from axpo.train.config import TrainerConfig
    from axpo.train.distributed import setup
    from axpo.train.trainer import PolicyTrainer

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    dist = setup("cpu")
    model, tok = build_tiny_policy(vision=False, seed=0, initializer_range=0.2)
    policy = policy_from_model(model, tok)
    chat = ChatFormat(tok, policy.image_processor)
    rows = global_batch(chat, n=4, images=False)
    trainer = PolicyTrainer(policy, TrainerConfig(micro_batch_tokens=160), dist, lr=1e-3, pad_id=chat.pad_id)
    with torch.no_grad():
        inputs, select = _to_inputs(policy, rows, chat.pad_id, "cpu")
        own, _ = trainer.module(inputs, select, 0.8)
    g = torch.Generator().manual_seed(0)
    for b, r in enumerate(rows):  # an engine whose log-probs are off by ~1 nat
        n = len(r.token_ids)
        r.old_logprobs = own[b, :n] + torch.randn(n, generator=g) * select[b, :n]
    engine_logprobs = [r.old_logprobs.clone() for r in rows]
    trainer.recompute_old_logprobs(rows, 0.8)
    for b, r in enumerate(rows):
        assert torch.equal(r.rollout_logprobs, engine_logprobs[b])
        n = len(r.token_ids)
        torch.testing.assert_close(r.old_logprobs, own[b, :n], rtol=1e-5, atol=1e-6)
        assert (r.old_logprobs[~select[b, :n]] == 0).all()
    m = trainer.rl_step(rows, agg="token-mean", clip_low=0.2, clip_high=0.4, kl_coef=0.0, kl_estimator="k3",
                        temperature=0.8, rollout_correction="tis", rollout_cap=2.0)
    sel = [r.loss_mask for r in rows]
    diff = torch.cat([(r.rollout_logprobs - r.old_logprobs)[s] for r, s in zip(rows, sel)])
    assert m["rollout_kl"] == pytest.approx(diff.mean().item(), rel=1e-4)
    weights = torch.clamp(torch.exp(-diff), max=2.0)
    assert m["rollout_weight_mean"] == pytest.approx(weights.mean().item(), rel=1e-4)
    assert m["rollout_corrected_frac"] == pytest.approx((torch.exp(-diff) > 2.0).float().mean().item(), abs=1e-6)
    assert 0 < m["rollout_corrected_frac"] < 1
