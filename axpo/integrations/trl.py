"""axpo inside TRL's GRPOTrainer (trl 1.16.0): `AxpoGRPOConfig` + `AxpoGRPOTrainer`.

    from axpo.integrations.trl import AxpoGRPOConfig, AxpoGRPOTrainer
    args = AxpoGRPOConfig(output_dir="out", loss_type="dapo", axpo_loss=True, axpo_lm_head=True, ...)
    trainer = AxpoGRPOTrainer(model=model_dir, reward_funcs=reward, args=args,
                              train_dataset=ds, processing_class=tokenizer)
    trainer.train()

What is implemented AND tested (tests/integrations/test_trl.py, CPU, tiny Qwen3, fp32 and fp64):

* `axpo_loss=True` (default): `_compute_loss` computes TRL's per-token log-probs as usual and
  then the clipped loss + KL + aggregation with `axpo.ops.policy_loss` (one fused pass) instead
  of TRL's eager code, for the loss_types it expresses exactly:

      TRL loss_type  TRL normalization (train mode)                 axpo.ops.policy_loss
      grpo           mean_b(sum_t(m l) / max(n_b, 1)) / GA          seq-mean-token-mean, num_seqs = B * GA
      bnpo           sum(m l) / max(sum m, 1) / GA                  token-mean, num_tokens = max(sum m, 1) * GA
      dr_grpo        sum(m l) / (B * max_completion_length) / GA    seq-mean-token-sum-norm, num_seqs = B * GA,
                                                                    norm_tokens = max_completion_length
      dapo           sum(m l) / (max(num_items_in_batch, 1)         token-mean, num_tokens = that normalizer
                      / num_processes * GA / steps_per_generation)  (a tensor: no host sync)

  GA = `current_gradient_accumulation_steps` (1 in eval mode, as in TRL). Per token both compute
  -min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A) (+ beta * k3 KL, TRL's
  exp(ref - logp) - (ref - logp) - 1 == axpo's "k3"). The tests check loss and gradients of every
  parameter against `GRPOTrainer` on the same batch: a hand-built one (ratios pushed past both
  clip bounds, epsilon_high != epsilon, beta = 0 and beta > 0, gradient accumulation 2, left-padded
  prompts, padded completions) and one real `_generate_and_score_completions` batch (on-policy,
  ratio == 1: the clip's tie case; beta > 0). fp32: |dloss| <= 3e-8, max |dgrad| <= 1.4e-7;
  fp64 model with TRL's head: |dloss| <= 7e-17 (TRL's head returns fp32-accurate log-probs even
  for fp64 models, so gradients with beta > 0 differ at fp32 rounding, <= 3.4e-8).
  Difference by construction: axpo clamps log r to [-20, 20] before exp (TRL does not), so the
  two differ only where |logp - old| > 20.
  Everything else falls back to TRL's own `_compute_loss` (checked in `_axpo_loss_supported`):
  loss_type cispo / sapo / luspo / vespo, importance_sampling_level="sequence", `delta`
  (two-sided clip), beta != 0 with `use_bias_correction_kl=True` (TRL 1.16's DEFAULT: its KL
  term is k3 * ratio, which axpo.ops.policy_loss has no form for; set
  use_bias_correction_kl=False to get the fused plain-k3 KL), `off_policy_mask_threshold`,
  `top_entropy_quantile < 1`, an entropy bonus (`entropy_coef != 0` / adaptive entropy), vLLM
  importance-sampling correction (`use_vllm` with `vllm_importance_sampling_correction`).
  The MoE aux loss is added as TRL adds it (not tested: Qwen3 is dense).
  Metrics: TRL's own (entropy, kl, clip_ratio/*) plus `axpo/clipfrac`, `axpo/clipfrac_low`,
  `axpo/clipfrac_high`, `axpo/approx_kl`, `axpo/ratio_mean` (and `axpo/kl_mean` with beta > 0).
* `axpo_lm_head=True`: the policy model's fused-LM-head forward (the one TRL's
  `add_fused_lm_head` installs and `_get_per_token_logps_and_entropies` calls with
  `fused_lm_head=True`) is replaced by one that runs the backbone and then
  `axpo.ops.linear_logprob_entropy` (log-probs + entropy, logits never stored, gradients to the
  hidden states, weight and bias) on the completion positions. Tested: same per-token log-probs
  and entropies as TRL's `ChunkedLogProbFunction` path (max diff 1e-6 / 1.4e-6, temperature 0.7,
  gradients of logp + entropy to every parameter), exact against eager log_softmax in fp64
  (2e-15), and same loss and gradients through the whole trainer. The
  reference model keeps TRL's head (it needs no gradient). Refused (ValueError at init) for
  models with final-logit softcapping or a logit scale != 1 (the axpo op has neither); the
  weight is gathered with TRL's `maybe_gather_lm_head_ctx` under ZeRO-3 for the forward, but the
  axpo backward does not re-gather it: ZeRO-3 with `axpo_lm_head` is NOT supported/tested.
* A 2-step `AxpoGRPOTrainer.train()` on a tiny local Qwen3 with a 4-row in-memory dataset runs
  and logs `axpo/...` metrics (test_train_two_steps).

axpo_method / axpo_ratio / axpo_k / axpo_score / axpo_tie_break are validated and recorded in
the config (and logged as `axpo/method_resample` = 1 when the method resamples), but NOT used:
with TRL this trainer is plain GRPO / DAPO / Dr. GRPO / BNPO with axpo's fused ops. Choosing
a resampling method ("axpo", "axpo-random") warns that resampling is not implemented here.
Not tested: multi-process (DDP / DeepSpeed / FSDP), PEFT, vLLM generation, VLMs, bf16 autocast.

UNTESTED SKETCH -- the AXPO resampling seam (not implemented):
  TRL's batch has a fixed row count (generation_batch_size = per_device_batch * steps_per_generation,
  split into equal micro-batches) and `rewards.view(-1, num_generations)` assumes equal groups;
  `rollout_func` cannot add rows. The seam is `_generate_and_score_completions` (override it):
  1. generate G - R rollouts per prompt instead of G (R = round(axpo_ratio * G / axpo_k) * axpo_k,
     a resample budget reserved per step so the row count stays B = num_prompts * G);
  2. score them, run `axpo.algo.plan_resample` on the failed tool calls (span confidence from the
     sampling log-probs) to pick R / axpo_k prefixes (tie-break axpo_tie_break);
  3. generate axpo_k continuations from each prefix as NEW requests whose prompt is
     prompt + prefix tokens (with vLLM: `n = axpo_k`, prefix caching shares the blocks); the
     completion row is prefix + continuation (prefix tokens kept for attention; whether they carry
     loss follows Method.prefix_credit, Eq. 3-4: per-token advantages or a `tool_mask`-style mask,
     both of which `_compute_loss` accepts);
  4. if fewer prefixes qualify than the budget, fill the rows with ordinary rollouts (so the
     count never changes), then compute advantages with `axpo.ops.group_advantages` on segment
     ids (variable groups: the G - R originals + the continuations of each question, the
     continuations' own sub-groups per axpo.algo.assemble_advantages) instead of `view(-1, G)`,
     and return advantages per token (B, T), which `_compute_loss` accepts.
  Alternatively replace failed rollouts in place (keep rows, swap a failed rollout for a
  continuation of its own prefix), which needs no budget but biases the group statistics.
"""
from __future__ import annotations

import functools
import types
import warnings
from dataclasses import dataclass, field

import torch

try:
    from trl import GRPOConfig, GRPOTrainer
    from trl.trainer.utils import (
        FusedCausalLMOutput,
        maybe_gather_lm_head_ctx,
        nanmax,
        nanmin,
    )
except ImportError as exc:  # pragma: no cover - exercised only without trl
    raise ImportError("axpo.integrations.trl needs TRL: pip install 'axpo[trl]' (trl==1.16.0)") from exc

from ..algo import AxpoConfig, method_names
from ..algo.methods import get_method
from ..ops import linear_logprob_entropy, policy_loss

__all__ = ["LOSS_TYPE_AGG", "AxpoGRPOConfig", "AxpoGRPOTrainer", "add_axpo_lm_head"]

# TRL loss_type -> axpo.ops.policy_loss aggregation (normalizers in AxpoGRPOTrainer._axpo_agg)
LOSS_TYPE_AGG = {
    "grpo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
    "dapo": "token-mean",
}


@dataclass
class AxpoGRPOConfig(GRPOConfig):
    """GRPOConfig + axpo's switches (see the module docstring for what each one does)."""

    axpo_method: str = field(default="grpo", metadata={"help": "an axpo.algo.method_names() entry; recorded only "
                                                               "(resampling is not implemented with TRL)"})
    axpo_ratio: float = field(default=0.25, metadata={"help": "AXPO resample budget ratio r (unused with TRL)"})
    axpo_k: int = field(default=4, metadata={"help": "AXPO continuations per prefix K (unused with TRL)"})
    axpo_score: str = field(default="confidence", metadata={"help": "AXPO prefix score (unused with TRL)"})
    axpo_tie_break: str = field(default="confidence", metadata={"help": "AXPO tie break (unused with TRL)"})
    axpo_loss: bool = field(default=True, metadata={"help": "use axpo.ops.policy_loss for the loss_types it "
                                                            "expresses exactly (grpo, bnpo, dr_grpo, dapo)"})
    axpo_lm_head: bool = field(default=False, metadata={"help": "per-token log-probs / entropies from "
                                                                "axpo.ops.linear_logprob_entropy"})
    axpo_backend: str | None = field(default=None, metadata={"help": "axpo.ops backend (None: auto)"})

    def __post_init__(self):
        super().__post_init__()
        if self.axpo_method not in method_names():
            raise ValueError(f"axpo_method must be one of {list(method_names())}, got {self.axpo_method!r}")
        self.axpo_config()  # validates axpo_ratio / axpo_k / axpo_score / axpo_tie_break
        if get_method(self.axpo_method).resample:
            warnings.warn(f"axpo_method={self.axpo_method!r} resamples tool calls; AxpoGRPOTrainer does not "
                          "implement resampling (see axpo.integrations.trl's docstring): it trains without it",
                          stacklevel=2)


    def axpo_config(self) -> AxpoConfig:
        """The axpo.algo.AxpoConfig these fields describe (its validation applies)."""
        return AxpoConfig(algorithm=self.axpo_method, ratio=self.axpo_ratio, k=self.axpo_k, score=self.axpo_score,
                          tie_break=self.axpo_tie_break)


def add_axpo_lm_head(model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                     backend: str | None = None) -> None:
    """Re-patch a model that TRL's `add_fused_lm_head` patched: `model(..., labels=labels,
    fused_lm_head=True)` now computes log-probs and entropies with axpo.ops.linear_logprob_entropy
    (same outputs: a FusedCausalLMOutput with log_probs, entropy, loss, label_mask). Other calls
    (generate) go to the previous forward unchanged."""
    text_config = model.config.get_text_config()
    for name in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                 "logits_scaling"):
        value = getattr(text_config, name, None)
        if value is not None and not (name != "final_logit_softcapping" and value == 1):
            raise ValueError(f"axpo_lm_head does not support {name}={value!r} (model type "
                             f"{text_config.model_type!r}); set axpo_lm_head=False")
    previous_forward = model.forward

    @functools.wraps(type(model).forward)
    def _axpo_forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                      **kwargs):
        if not fused_lm_head:
            return previous_forward(*args, labels=labels, shift_labels=shift_labels,
                                    num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        if getattr(text_config, "output_router_logits", False):
            raise ValueError("axpo_lm_head does not support MoE router aux losses; set axpo_lm_head=False")
        out = self.base_model(*args, **kwargs)
        if shift_labels is None:
            hidden, labels = out.last_hidden_state[:, :-1], labels[:, 1:]
        else:
            hidden, labels = out.last_hidden_state, shift_labels
        head = self.get_output_embeddings()
        weight, bias = head.weight, head.bias
        hidden, labels = hidden.to(weight.device), labels.to(weight.device)
        mask = labels != -100
        with torch.autocast(hidden.device.type, enabled=False), maybe_gather_lm_head_ctx(weight, bias):
            dt = torch.float32 if cast_lm_head_to_fp32 else weight.dtype
            w = weight.to(dt)
            b = None if bias is None else bias.to(dt)
            logps, ent = linear_logprob_entropy(hidden[mask].to(dt), w, labels[mask], bias=b,
                                                temperature=temperature, backend=backend)
        log_probs = logps.new_zeros(mask.shape).masked_scatter(mask, logps)
        entropy = ent.new_zeros(mask.shape).masked_scatter(mask, ent)
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, label_mask=mask)

    model.forward = types.MethodType(_axpo_forward, model)


class AxpoGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose loss (and optionally LM head) runs on axpo's fused ops; see the module
    docstring for the exact scope."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        a = self.args
        self._axpo_loss = bool(getattr(a, "axpo_loss", False))
        self._axpo_backend = getattr(a, "axpo_backend", None)
        if getattr(a, "axpo_lm_head", False):
            target = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            add_axpo_lm_head(target, temperature=self.temperature, cast_lm_head_to_fp32=a.cast_lm_head_to_fp32,
                             backend=self._axpo_backend)

    # -- which configurations the fused loss expresses exactly ---------------------------------
    def _axpo_loss_supported(self) -> bool:
        a = self.args
        return (self._axpo_loss and self.loss_type in LOSS_TYPE_AGG
                and self.importance_sampling_level == "token"
                and a.delta is None
                and not (self.beta != 0.0 and a.use_bias_correction_kl)
                and self.off_policy_mask_threshold is None
                and self.top_entropy_quantile >= 1.0
                and not getattr(self, "_entropy_bonus_enabled", False)
                and not (self.use_vllm and self.vllm_importance_sampling_correction))

    def _axpo_agg(self, mask: torch.Tensor, inputs) -> dict:
        train = self.model.training
        ga = self.current_gradient_accumulation_steps if train else 1
        B = mask.shape[0]
        lt = self.loss_type
        if lt == "grpo":
            return dict(agg="seq-mean-token-mean", num_seqs=B * ga)
        if lt == "bnpo":
            return dict(agg="token-mean", num_tokens=mask.sum().clamp(min=1.0) * ga)
        if lt == "dr_grpo":
            return dict(agg="seq-mean-token-sum-norm", num_seqs=B * ga, norm_tokens=self.max_completion_length)
        # dapo
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if train:
            normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        return dict(agg="token-mean", num_tokens=normalizer)

    def _compute_loss(self, model, inputs):
        if not self._axpo_loss_supported():
            return super()._compute_loss(model, inputs)
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        logits_to_keep = completion_ids.size(1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
            **{k: inputs.get(k) for k in ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask",
                                          "spatial_shapes", "num_tiles", "image_sizes", "token_type_ids",
                                          "mm_token_type_ids", "image_position_ids")},
        )
        advantages = inputs["advantages"]
        old = inputs.get("old_per_token_logps")
        old = per_token_logps.detach() if old is None else old
        ref = inputs["ref_per_token_logps"] if self.beta != 0.0 else None
        # TRL's eager loss computes in the promoted dtype of its operands (fp64 old / ref log-probs
        # make it fp64 even though its fused head returns fp32 log-probs): do the same
        dt = per_token_logps.dtype
        for x in (old, advantages, ref):
            if x is not None:
                dt = torch.promote_types(dt, x.dtype)
        logps = per_token_logps.to(dt)
        loss, m = policy_loss(
            logps, old, advantages, mask.bool(), clip_low=self.epsilon_low, clip_high=self.epsilon_high,
            ref_logprobs=ref, kl_coef=float(self.beta), kl_estimator="k3", backend=self._axpo_backend,
            **self._axpo_agg(mask, inputs),
        )
        mode = "train" if self.model.training else "eval"
        if self.aux_loss_enabled:
            normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            loss = loss + self.router_aux_loss_coef * aux_loss / normalizer
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        self._axpo_log(mode, m, per_token_logps.detach(), old, advantages, mask, entropies)
        return loss

    def _axpo_log(self, mode, m, logps, old, advantages, mask, entropies):
        """TRL's metrics (same names and reductions) + axpo's, one host sync for the axpo ones."""
        mask = mask.to(logps.dtype)
        adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages

        def global_masked_mean(x):
            totals = self.accelerator.reduce(torch.stack([(x * mask).sum(), mask.sum().float()]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        def seq_mean(x):
            return (x * mask).sum(-1) / mask.sum(-1)

        metrics = self._metrics[mode]
        if "kl_mean" in m:
            metrics["kl"].append(self.accelerator.gather(m["kl_mean"]).mean().item())
        metrics["entropy"].append(global_masked_mean(entropies))
        coef_1 = torch.exp(logps - old)
        low = ((coef_1 < 1 - self.epsilon_low) & (adv < 0)).to(logps.dtype)
        high = ((coef_1 > 1 + self.epsilon_high) & (adv > 0)).to(logps.dtype)
        metrics["clip_ratio/low_mean"].append(global_masked_mean(low))
        metrics["clip_ratio/high_mean"].append(global_masked_mean(high))
        metrics["clip_ratio/region_mean"].append(global_masked_mean(torch.maximum(low, high)))
        metrics["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(seq_mean(low))).item())
        metrics["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(seq_mean(high))).item())
        names = [k for k in ("clipfrac", "clipfrac_low", "clipfrac_high", "approx_kl", "ratio_mean", "kl_mean")
                 if k in m]
        values = self.accelerator.gather(torch.stack([m[k] for k in names]).unsqueeze(0)).mean(0).tolist()
        for k, v in zip(names, values):
            metrics[f"axpo/{k}"].append(v)
        metrics["axpo/method_resample"].append(float(bool(get_method(self.args.axpo_method).resample))
                                               if hasattr(self.args, "axpo_method") else 0.0)
