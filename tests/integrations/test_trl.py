"""AxpoGRPOTrainer (axpo.integrations.trl) against TRL's GRPOTrainer on the same batch.

Skipped without trl, unless AXPO_REQUIRE_TRL=1 (then a missing trl fails).
Run: AXPO_REQUIRE_TRL=1 .venv/bin/python -m pytest tests/integrations/test_trl.py -q
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: the model is built from a config
warnings.filterwarnings("ignore", message="TRL currently supports vLLM")
if os.environ.get("AXPO_REQUIRE_TRL") == "1":
    import trl  # noqa: F401  (fails the module when required and missing)
else:
    pytest.importorskip("trl")

from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from axpo.integrations.trl import LOSS_TYPE_AGG, AxpoGRPOConfig, AxpoGRPOTrainer
from axpo.models.tiny import build_tiny_policy

MAX_COMPLETION = 12
GA = 2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_qwen3")
    model, tok = build_tiny_policy(vision=False, seed=0, initializer_range=0.2)
    model.save_pretrained(str(d / "model"))
    tok.save_pretrained(str(d / "tokenizer"))
    return d


def _reward(completions, **kwargs):
    return [float(len(c) % 3) for c in completions]


def _dataset():
    return Dataset.from_dict({"prompt": ["abc", "hello", "1+1=", "xyz"]})


def _trainer(cls, cfg_cls, model_dir, tmp, dtype=torch.float32, **kw):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir / "tokenizer"))
    cfg = dict(output_dir=str(tmp), per_device_train_batch_size=4, num_generations=2,
               max_completion_length=MAX_COMPLETION, gradient_accumulation_steps=GA, report_to="none",
               use_cpu=True, bf16=False, logging_steps=1, save_strategy="no", disable_dropout=True,
               model_init_kwargs={"dtype": dtype})
    cfg.update(kw)
    args = cfg_cls(**cfg)
    trainer = cls(model=str(model_dir / "model"), reward_funcs=_reward, args=args, train_dataset=_dataset(),
                  processing_class=tok)
    trainer.current_gradient_accumulation_steps = GA
    trainer.model.train()
    return trainer


def _batch(trainer, dtype, seed=0):
    """A padded batch of 4 rows (one row fully masked out past its first token) with ratios pushed
    past both clip bounds and a reference policy that differs from the current one."""
    g = torch.Generator().manual_seed(seed)
    B, P, T = 4, 5, MAX_COMPLETION
    V = trainer.model.config.vocab_size
    prompt_ids = torch.randint(16, V, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[1, :2] = 0  # left padding
    prompt_ids[1, :2] = 0
    completion_ids = torch.randint(16, V, (B, T), generator=g)
    lengths = torch.tensor([T, 7, 1, 10])
    completion_mask = (torch.arange(T)[None] < lengths[:, None]).long()
    completion_ids = completion_ids.masked_fill(completion_mask == 0, 0)
    inputs = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                  completion_mask=completion_mask, advantages=torch.tensor([1.0, -0.7, 0.4, -1.3], dtype=dtype),
                  num_items_in_batch=completion_mask.sum() * 2)  # generation batch of 2 micro-batches
    with torch.no_grad():
        ids = torch.cat([prompt_ids, completion_ids], 1)
        am = torch.cat([prompt_mask, completion_mask], 1)
        logps, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.model, ids, am, T)
    inputs["old_per_token_logps"] = (logps + 0.4 * torch.randn(B, T, generator=g, dtype=dtype)).to(dtype)
    inputs["ref_per_token_logps"] = (logps + 0.3 * torch.randn(B, T, generator=g, dtype=dtype)).to(dtype)
    return inputs


def _loss_and_grads(trainer, inputs):
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _compare(a, b, atol, rtol, grad_tol=None):
    (la, ga), (lb, gb) = a, b
    assert ga.keys() == gb.keys() and len(ga) > 0
    assert max(g.abs().max().item() for g in gb.values()) > 1e-3  # a real gradient
    torch.testing.assert_close(la, lb, atol=atol, rtol=rtol)
    gatol, grtol = grad_tol or (atol, rtol)
    worst = 0.0
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], atol=gatol, rtol=grtol, msg=lambda m, n=n: f"{n}: {m}")
        worst = max(worst, (ga[n] - gb[n]).abs().max().item())
    return abs(la - lb).item(), worst


TOL = {torch.float32: (2e-6, 2e-5), torch.float64: (1e-12, 1e-10)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("beta,bias_correction", [(0.0, False), (0.05, False), (0.05, True)],
                         ids=["nokl", "k3", "k3ratio"])  # TRL's default: k3 * ratio
@pytest.mark.parametrize("lm_head", [False, True], ids=["trlhead", "axpohead"])
def test_loss_and_grads_match_trl(model_dir, tmp_path, dtype, beta, bias_correction, lm_head):
    kw = dict(beta=beta, epsilon=0.2, epsilon_high=0.28, use_bias_correction_kl=bias_correction)
    ref = _trainer(GRPOTrainer, GRPOConfig, model_dir, tmp_path / "ref", dtype, **kw)
    ours = _trainer(AxpoGRPOTrainer, AxpoGRPOConfig, model_dir, tmp_path / "ours", dtype, axpo_lm_head=lm_head,
                    **kw)
    inputs = _batch(ref, dtype)
    # TRL's fused head returns fp32-accurate log-probs even for an fp64 model, axpo's computes fp64:
    # with both heads in play the comparison is at fp32 accuracy
    # With beta > 0, TRL's fp32 log-probs receive the pg and the KL gradients as two separately
    # rounded fp32 contributions (axpo: one): fp32-level gradient differences even for fp64 models.
    atol, rtol = TOL[torch.float32 if lm_head else dtype]
    grad_tol = TOL[torch.float32] if beta else None
    for loss_type in LOSS_TYPE_AGG:
        ref.loss_type = ours.loss_type = loss_type
        assert ours._axpo_loss_supported()
        dl, dg = _compare(_loss_and_grads(ours, inputs), _loss_and_grads(ref, inputs), atol, rtol, grad_tol)
        print(f"{dtype} beta={beta} lm_head={lm_head} {loss_type}: |dloss|={dl:.2e} max|dgrad|={dg:.2e}")
    m = ours._metrics["train"]
    assert m["axpo/clipfrac_low"][-1] > 0 and m["axpo/clipfrac_high"][-1] > 0
    assert m["axpo/clipfrac_low"][-1] == pytest.approx(ref._metrics["train"]["clip_ratio/low_mean"][-1], abs=1e-6)
    assert m["axpo/clipfrac_high"][-1] == pytest.approx(ref._metrics["train"]["clip_ratio/high_mean"][-1], abs=1e-6)
    for k in ("entropy", "clip_ratio/region_mean") + (("kl",) if beta else ()):
        assert m[k][-1] == pytest.approx(ref._metrics["train"][k][-1], rel=1e-5, abs=1e-6), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_lm_head_logps_and_entropies_match_trl(model_dir, tmp_path, dtype):
    ref = _trainer(GRPOTrainer, GRPOConfig, model_dir, tmp_path / "ref", dtype, temperature=0.7)
    ours = _trainer(AxpoGRPOTrainer, AxpoGRPOConfig, model_dir, tmp_path / "ours", dtype, axpo_lm_head=True,
                    temperature=0.7)
    inputs = _batch(ref, dtype)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    outs = []
    for t in (ref, ours):
        t.model.zero_grad(set_to_none=True)
        lp, ent, _ = t._get_per_token_logps_and_entropies(t.model, ids, am, MAX_COMPLETION, compute_entropy=True)
        (lp.sum() + 0.5 * ent.sum()).backward()  # the entropy's gradient too
        outs.append((lp.detach(), ent.detach(), {n: p.grad.clone() for n, p in t.model.named_parameters()
                                                 if p.grad is not None}))
    (lp_a, ent_a, g_a), (lp_b, ent_b, g_b) = outs
    # TRL's head is fp32-accurate (fp32 output even for fp64 models): compare at fp32 accuracy
    torch.testing.assert_close(lp_b.to(lp_a.dtype), lp_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent_b.to(ent_a.dtype), ent_a, atol=1e-5, rtol=1e-5)
    for n in g_a:
        torch.testing.assert_close(g_b[n], g_a[n], atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
    # and against eager log_softmax of the full logits in the model's dtype (exact for fp64)
    with torch.no_grad():
        hidden = ours.model.base_model(input_ids=ids, attention_mask=am).last_hidden_state[:, :-1]
        logits = ours.model.get_output_embeddings()(hidden)[:, -MAX_COMPLETION:] / 0.7
        logp_all = torch.log_softmax(logits, -1)
        m = inputs["completion_mask"].bool()
        want_lp = logp_all.gather(-1, inputs["completion_ids"][..., None])[..., 0] * m
        want_ent = -(logp_all.exp() * logp_all).sum(-1) * m
    atol = 1e-5 if dtype == torch.float32 else 1e-11
    torch.testing.assert_close(lp_b.to(dtype), want_lp, atol=atol, rtol=atol)
    torch.testing.assert_close(ent_b.to(dtype), want_ent, atol=atol, rtol=atol)
    print(f"{dtype}: vs TRL max|dlogp|={(lp_a - lp_b.to(lp_a.dtype)).abs().max():.2e} "
          f"max|dentropy|={(ent_a - ent_b.to(ent_a.dtype)).abs().max():.2e}; vs eager "
          f"max|dlogp|={(lp_b.to(dtype) - want_lp).abs().max():.2e}")


def test_real_generated_batch(model_dir, tmp_path):
    """One real `_generate_and_score_completions` batch (TRL's generation, rewards, advantages,
    ref log-probs; on-policy, so ratio == 1 exactly: the clip's tie case) through both losses."""
    kw = {"beta": 0.05, "epsilon_high": 0.28}  # TRL's default KL: k3 * ratio
    ref = _trainer(GRPOTrainer, GRPOConfig, model_dir, tmp_path / "ref", **kw)
    ours = _trainer(AxpoGRPOTrainer, AxpoGRPOConfig, model_dir, tmp_path / "ours", axpo_lm_head=True, **kw)
    torch.manual_seed(0)
    rows = [{"prompt": p} for p in _dataset()["prompt"] for _ in range(2)]
    inputs = ref._generate_and_score_completions(rows)
    assert inputs["advantages"].abs().max() > 0 and "ref_per_token_logps" in inputs
    for loss_type in LOSS_TYPE_AGG:
        ref.loss_type = ours.loss_type = loss_type
        dl, dg = _compare(_loss_and_grads(ours, inputs), _loss_and_grads(ref, inputs), *TOL[torch.float32])
        print(f"generated batch {loss_type}: |dloss|={dl:.2e} max|dgrad|={dg:.2e}")


def test_unsupported_loss_types_fall_back(model_dir, tmp_path):
    ours = _trainer(AxpoGRPOTrainer, AxpoGRPOConfig, model_dir, tmp_path / "ours", loss_type="cispo")
    assert not ours._axpo_loss_supported()
    ref = _trainer(GRPOTrainer, GRPOConfig, model_dir, tmp_path / "ref", loss_type="cispo")
    inputs = _batch(ref, torch.float32)
    _compare(_loss_and_grads(ours, inputs), _loss_and_grads(ref, inputs), 0, 0)


def test_config_validates_method():
    with pytest.raises(ValueError, match="axpo_method"):
        AxpoGRPOConfig(output_dir="/tmp/x", axpo_method="nope", use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match="score"):
        AxpoGRPOConfig(output_dir="/tmp/x", axpo_score="nope", use_cpu=True, report_to="none")
    cfg = AxpoGRPOConfig(output_dir="/tmp/x", axpo_method="axpo", axpo_k=2, use_cpu=True, report_to="none")
    assert cfg.axpo_resamples and cfg.axpo_config().k == 2 and cfg.axpo_config().algorithm == "axpo"
    assert cfg.axpo_config().eps == 1e-4 and cfg.axpo_config().advantage_scale == "std"  # TRL's normalization
    cfg = AxpoGRPOConfig(output_dir="/tmp/x", axpo_method="axpo", scale_rewards="none", use_cpu=True,
                         report_to="none")
    assert cfg.axpo_config().advantage_scale == "none"
    assert not AxpoGRPOConfig(output_dir="/tmp/x", use_cpu=True, report_to="none").axpo_resamples


def test_train_two_steps(model_dir, tmp_path):
    """The README's "Using axpo from TRL" snippet, verbatim but for the paths."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    from axpo.integrations.trl import AxpoGRPOConfig, AxpoGRPOTrainer

    def reward(completions, **kwargs):  # any TRL reward function
        return [float(len(c) % 3) for c in completions]

    args = AxpoGRPOConfig(
        output_dir=str(tmp_path / "out"), loss_type="dapo", beta=0.02, use_bias_correction_kl=False,
        epsilon=0.2, epsilon_high=0.28, num_generations=2, per_device_train_batch_size=4,
        max_completion_length=6, max_steps=2, logging_steps=1, report_to="none", save_strategy="no",
        use_cpu=True, bf16=False,
        axpo_loss=True,      # clipped loss + KL + aggregation in axpo.ops.policy_loss
        axpo_lm_head=True,   # per-token log-probs / entropies from axpo.ops.linear_logprob_entropy
    )
    trainer = AxpoGRPOTrainer(
        model=str(model_dir / "model"), reward_funcs=reward, args=args,
        train_dataset=Dataset.from_dict({"prompt": ["abc", "hello", "1+1=", "xyz"]}),
        processing_class=AutoTokenizer.from_pretrained(str(model_dir / "tokenizer")),
    )
    trainer.train()

    assert trainer._axpo_loss_supported()
    logs = [h for h in trainer.state.log_history if "axpo/clipfrac" in h]
    print(logs)
    assert len(logs) == 2, trainer.state.log_history
    assert all(k in logs[0] for k in ("axpo/approx_kl", "axpo/ratio_mean", "axpo/kl_mean", "loss", "entropy"))
