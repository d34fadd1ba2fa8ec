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
  (two-sided clip), `off_policy_mask_threshold`, `top_entropy_quantile < 1`, an entropy bonus
  (`entropy_coef != 0` / adaptive entropy), vLLM importance-sampling correction (`use_vllm` with
  `vllm_importance_sampling_correction`). TRL 1.16's default KL, `use_bias_correction_kl=True`
  (k3 * ratio), is the op's kl_estimator="k3_ratio".
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

The AXPO step (`axpo_method` a resampling method of axpo.algo.methods: axpo, axpo-random,
axpo-no-credit, axpo-no-fix, axpo-shared-group; `axpo_ratio`, `axpo_k`, `axpo_score`,
`axpo_tie_break`), tested in tests/integrations/test_trl_axpo.py on a tiny Qwen3 that calls a
tool through TRL's own `tools=` loop:

  The seam is `_generate_and_score_completions`. TRL generates, runs its tools and scores the
  B * G rows of a generation batch exactly as GRPOTrainer does (its sampler, rewards,
  advantages, metrics and completion logs are untouched). Then, on that batch:
  1. records: every row becomes an `axpo.records.Rollout` (prompt + completion tokens, loss mask
     = completion_mask * tool_mask, the summed weighted reward, group = row // G, its first
     `<tool_call>`: the tag's tokens in the first model turn, `axpo_tool_call_open` /
     `axpo_tool_call_close`). The candidates' log-probs are the sampler's (vLLM's when TRL has
     them, else one no-grad forward of the policy on just those rows: the policy has not moved
     since it generated; entropies too with axpo_score="entropy").
  2. `axpo.algo.plan_resample`: trigger (a group whose tool-using rollouts all have reward <= 0),
     candidates, uncertainty ranking, breadth-first budget P = floor(r B G / K).
  3. continuations: for each selected prefix, K new requests whose prompt is the source's prompt
     + its completion tokens up to and including `<tool_call>`, through TRL's own
     `_generate_single_turn` (transformers generate, or vLLM), then TRL's `_tool_call_loop` with
     the source row's tools, then TRL's `_calculate_rewards` with the source row's dataset
     columns. A completion keeps the prefix tokens (attention) and is cut to
     max_completion_length.
  4. advantages: `axpo.algo.assemble_advantages` with TRL's normalization ((r - mean) /
     (std + 1e-4), or r - mean for scale_rewards="none"). ORIGINAL rows keep TRL's own advantage;
     a SOURCE_PREFIX row (Eq. 3-4) trains only its prefix tokens, a CONTINUATION row (Eq. 2) only
     its own model tokens after the prefix: the loss mask goes into TRL's `tool_mask`, the
     advantages become per token [rows, T] (which TRL's loss and ours accept).
  TRL's fixed row count: the continuations are EXTRA rows (the paper's +r budget), appended to
  the generation batch before TRL shuffles and splits it into steps_per_generation micro-batches.
  The number of rows added is rounded up to a multiple of steps_per_generation by giving the
  first selected prefixes one more continuation each (Eq. 2 normalizes over however many a
  prefix has), so every micro-batch has the same row count and gradient accumulation, the
  loss normalizers (per micro-batch, as TRL's) and logging stay consistent; num_items_in_batch
  (dapo) is recomputed over the extended batch; old / ref log-probs of the new rows are computed
  as TRL computes them. With no prefix selected the batch is TRL's, row for row (AXPO == GRPO).
  Diagnostics of the spec go into TRL's metrics as `axpo/<name>` (axpo.algo.step_diagnostics:
  tool-call rate, all-wrong rates, triggered fraction, budget / selected, recovery rate,
  confidence, distinct calls, extra tokens, ...) plus `axpo/rows_added` and the continuations'
  tool calls / failures.
  Refused at init: environment_factory (its state at the cut cannot be restored), rollout_func,
  vision-language models (pixel values of the new rows are not built yet), more than one
  process (continuation rewards are gathered with unequal row counts), vLLM importance-sampling
  correction, scale_rewards="batch", normalize_then_sum; grpo-matched is GRPO with a larger
  num_generations. Not tested: vLLM generation (colocate / server) of the continuations.

Not tested: multi-process (DDP / DeepSpeed / FSDP), PEFT, vLLM generation, VLMs, bf16 autocast.
"""
from __future__ import annotations

import copy
import functools
import types
import warnings
from dataclasses import dataclass, field

import torch

try:
    from trl import GRPOConfig, GRPOTrainer
    from trl.chat_template_utils import parse_response
    from trl.data_utils import is_conversational
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.grpo_trainer import use_adapter
    from trl.trainer.utils import (
        FusedCausalLMOutput,
        maybe_gather_lm_head_ctx,
        nanmax,
        nanmin,
    )
except ImportError as exc:  # pragma: no cover - exercised only without trl
    raise ImportError("axpo.integrations.trl needs TRL: pip install 'axpo[trl]' (trl==1.16.0)") from exc

from ..algo import AxpoConfig, assemble_advantages, method_names, plan_resample, step_diagnostics, triggered_groups
from ..algo.methods import get_method
from ..ops import linear_logprob_entropy, policy_loss
from ..records import Stream
from ._trl_batch import append_rows, find_tool_call, first_turn_len, to_rollout

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

    axpo_method: str = field(default="grpo", metadata={"help": "an axpo.algo.method_names() entry; a resampling "
                                                               "one (axpo, axpo-random, ...) runs the AXPO step"})
    axpo_ratio: float = field(default=0.25, metadata={"help": "AXPO resample budget ratio r: P = floor(r B G / K)"})
    axpo_k: int = field(default=4, metadata={"help": "AXPO continuations per selected prefix K"})
    axpo_score: str = field(default="confidence", metadata={"help": "AXPO prefix score: confidence | entropy"})
    axpo_tie_break: str = field(default="confidence", metadata={"help": "AXPO tie break: confidence | group_id"})
    axpo_tool_call_open: str = field(default="<tool_call>", metadata={"help": "the text of the opening tool-call "
                                                                              "tag (the prefix cut)"})
    axpo_tool_call_close: str = field(default="</tool_call>", metadata={"help": "the closing tool-call tag"})
    axpo_loss: bool = field(default=True, metadata={"help": "use axpo.ops.policy_loss for the loss_types it "
                                                            "expresses exactly (grpo, bnpo, dr_grpo, dapo)"})
    axpo_lm_head: bool = field(default=False, metadata={"help": "per-token log-probs / entropies from "
                                                                "axpo.ops.linear_logprob_entropy"})
    axpo_backend: str | None = field(default=None, metadata={"help": "axpo.ops backend (None: auto)"})

    def __post_init__(self):
        super().__post_init__()
        if self.axpo_method not in method_names():
            raise ValueError(f"axpo_method must be one of {list(method_names())}, got {self.axpo_method!r}")
        if get_method(self.axpo_method).matched_group:
            raise ValueError(f"axpo_method={self.axpo_method!r} spends the budget on larger groups: set TRL's "
                             "num_generations to that size and use axpo_method='grpo'")
        if self.axpo_resamples:
            if self.scale_rewards not in ("group", "none"):
                raise ValueError(f"AXPO resampling normalizes within groups: scale_rewards must be 'group' or "
                                 f"'none', got {self.scale_rewards!r}")
            if self.multi_objective_aggregation != "sum_then_normalize":
                raise ValueError("AXPO resampling needs one reward per rollout: multi_objective_aggregation must "
                                 f"be 'sum_then_normalize', got {self.multi_objective_aggregation!r}")
            for name in ("axpo_tool_call_open", "axpo_tool_call_close"):
                if not isinstance(getattr(self, name), str) or not getattr(self, name):
                    raise ValueError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        self.axpo_config()  # validates axpo_ratio / axpo_k / axpo_score / axpo_tie_break

    @property
    def axpo_resamples(self) -> bool:
        return get_method(self.axpo_method).resamples

    def axpo_config(self) -> AxpoConfig:
        """The axpo.algo.AxpoConfig these fields describe (its validation applies). A resampling
        method takes TRL's group normalization: (r - mean) / (std + 1e-4), or r - mean with
        scale_rewards='none'."""
        kw = dict(algorithm=self.axpo_method, ratio=self.axpo_ratio, k=self.axpo_k, score=self.axpo_score,
                  tie_break=self.axpo_tie_break)
        if self.axpo_resamples:
            kw.update(eps=1e-4, scale="none" if self.scale_rewards == "none" else "std")
        return AxpoConfig(**kw)


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
    """GRPOTrainer whose loss (and optionally LM head) runs on axpo's fused ops, and which runs the
    AXPO step on each generation batch when `axpo_method` resamples; see the module docstring."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        a = self.args
        self._axpo_loss = bool(getattr(a, "axpo_loss", False))
        self._axpo_backend = getattr(a, "axpo_backend", None)
        if getattr(a, "axpo_lm_head", False):
            target = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            add_axpo_lm_head(target, temperature=self.temperature, cast_lm_head_to_fp32=a.cast_lm_head_to_fp32,
                             backend=self._axpo_backend)
        self._axpo_resample = isinstance(a, AxpoGRPOConfig) and a.axpo_resamples
        self._axpo_generated = self._axpo_rewards = None
        if self._axpo_resample:
            self._axpo_check_resample_setup()
            self._axpo_cfg = a.axpo_config()
            self._axpo_tags = tuple(self._tokenizer.encode(t, add_special_tokens=False)
                                    for t in (a.axpo_tool_call_open, a.axpo_tool_call_close))
            for text, ids in zip((a.axpo_tool_call_open, a.axpo_tool_call_close), self._axpo_tags):
                if not ids:
                    raise ValueError(f"the tool-call tag {text!r} encodes to no tokens with this tokenizer")

    def _axpo_check_resample_setup(self):
        """What the AXPO step inside TRL supports; everything else is refused here, not mid-run."""
        why = None
        if self.environment_factories is not None:
            why = "environment_factory (an environment's state at the prefix cannot be restored)"
        elif self.rollout_func is not None:
            why = "rollout_func (the continuations must come from TRL's own generation path)"
        elif self._is_vlm:
            why = "vision-language models (the batch's pixel values are not extended for the new rows yet)"
        elif self.accelerator.num_processes > 1:
            why = (f"{self.accelerator.num_processes} processes (the continuations' rewards would be gathered "
                   "with different row counts per process); run it on one process")
        elif self.use_vllm and self.vllm_importance_sampling_correction:
            why = "vllm_importance_sampling_correction=True (set it to False)"
        if why is not None:
            raise ValueError(f"axpo_method={self.args.axpo_method!r} (AXPO resampling) does not support {why}")
        if not self.tools:
            warnings.warn("AXPO resampling without tools=: no rollout calls a tool, so the AXPO step never "
                          "triggers and training is plain GRPO", stacklevel=3)

    # -- which configurations the fused loss expresses exactly ---------------------------------
    def _axpo_loss_supported(self) -> bool:
        a = self.args
        return (self._axpo_loss and self.loss_type in LOSS_TYPE_AGG
                and self.importance_sampling_level == "token"
                and a.delta is None
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
            ref_logprobs=ref, kl_coef=float(self.beta), backend=self._axpo_backend,
            kl_estimator="k3_ratio" if self.args.use_bias_correction_kl else "k3",
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

    # -- the AXPO step on TRL's generation batch -------------------------------------------------
    def _generate(self, prompts):
        result = super()._generate(prompts)
        if self._axpo_resample:  # the unpadded lists of this batch, read by _axpo_step
            self._axpo_generated = result
        return result

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if self._axpo_resample:
            self._axpo_rewards = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        batch = super()._generate_and_score_completions(inputs)
        if not (self._axpo_resample and self.model.training):
            return batch
        return self._axpo_step(inputs, batch)

    def _axpo_combined_rewards(self, rewards_per_func: torch.Tensor) -> torch.Tensor:
        """One reward per row as TRL sums them (weights, NaN skipped); a row no reward function
        scored counts as reward 0 (wrong) for the trigger."""
        r = (rewards_per_func * self.reward_weights.to(rewards_per_func.device).unsqueeze(0)).nansum(dim=1)
        return torch.where(torch.isnan(rewards_per_func).all(dim=1), torch.zeros_like(r), r).float().cpu()

    def _axpo_first_calls(self, completions, completion_ids, tool_masks):
        open_ids, close_ids = self._axpo_tags
        calls, names, arguments = [], [], []
        for i, ids in enumerate(completion_ids):
            turn = first_turn_len(None if tool_masks is None else tool_masks[i], len(ids))
            calls.append(find_tool_call(ids, turn, list(open_ids), list(close_ids)))
            parsed = completions[i][0].get("tool_calls") if completions[i] and isinstance(completions[i][0], dict) \
                else None
            fn = parsed[0].get("function", {}) if parsed and isinstance(parsed[0], dict) else {}
            names.append(fn.get("name"))
            arguments.append(fn.get("arguments") if isinstance(fn.get("arguments"), dict) else None)
        return calls, names, arguments

    def _axpo_policy_logps(self, batch, rows, entropy: bool):
        """Log-probs (and entropies) of the current policy on rows of the padded batch, no grad."""
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)[rows]
        am = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)[rows]
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            logps, ents, _ = self._get_per_token_logps_and_entropies(
                self.model, ids, am, batch["completion_ids"].shape[1], compute_entropy=entropy)
        return logps.float().cpu(), None if ents is None else ents.float().cpu()

    def _axpo_step(self, inputs, batch):
        """Steps 1-6 of the AXPO step on one generation batch; returns the batch with the K
        continuations of every selected prefix appended and per-token advantages."""
        prompt_ids_l, completion_ids_l, tool_mask_l, completions, sampling_l = self._axpo_generated[:5]
        self._axpo_generated = None
        N, G = len(prompt_ids_l), self.num_generations
        if N % G:
            raise ValueError(f"the generation batch has {N} rows, not a multiple of num_generations={G}")
        rewards = self._axpo_combined_rewards(self._axpo_rewards)
        cfg = self._axpo_cfg
        calls, names, arguments = self._axpo_first_calls(completions, completion_ids_l, tool_mask_l)
        loss_mask = batch["completion_mask"] * batch.get("tool_mask", 1)

        # the candidates' sampling log-probs: vLLM's, else the policy's own (it has not moved since
        # it generated), on the tool-using rows of groups whose tool-using rollouts all failed
        def record(i, logps=None, ents=None):
            C = len(completion_ids_l[i])
            return to_rollout(prompt_ids_l[i], completion_ids_l[i], loss_mask[i, :C].bool().tolist(), uid=i,
                              group_id=i // G, reward=float(rewards[i]), call=calls[i], call_name=names[i],
                              call_arguments=arguments[i], logprobs=logps, entropies=ents)

        records = [record(i) for i in range(N)]
        triggered = set(triggered_groups(records))
        rows = [r.uid for r in records if r.uses_tools and r.group_id in triggered]
        if rows:
            need_entropy = cfg.score == "entropy"
            if sampling_l is not None and not need_entropy:
                lp = {i: torch.tensor([float("nan") if x is None else x for x in sampling_l[i]]) for i in rows}
                ent = {}
            else:
                logps, ents = self._axpo_policy_logps(batch, rows, need_entropy)
                lp = {i: logps[j] for j, i in enumerate(rows)}
                ent = {} if ents is None else {i: ents[j] for j, i in enumerate(rows)}
            for i in rows:
                records[i] = record(i, lp[i], ent.get(i))
        plan = plan_resample(records, N // G, G, cfg, seed=int(self.args.seed) * 1_000_003 + self.state.global_step)

        # K continuations per selected prefix; the first few prefixes get one more, so the rows
        # added split evenly into TRL's steps_per_generation micro-batches
        spg = self.args.steps_per_generation
        sources = [c for c in plan.selected for _ in range(cfg.k)]
        sources += [plan.selected[j % len(plan.selected)] for j in range((-len(sources)) % spg)] if sources else []
        sources.sort(key=plan.selected.index)
        cont = self._axpo_continue(inputs, prompt_ids_l, completion_ids_l, sampling_l, sources) if sources else None
        continuations = []
        if cont is not None:
            c_calls, c_names, c_args = self._axpo_first_calls(cont["completions"], cont["completion_ids"],
                                                              cont["tool_mask"])
            for j, c in enumerate(sources):
                ids, tm = cont["completion_ids"][j], cont["tool_mask"][j]
                trainable = [bool(m) and cont["keep"][j] for m in tm]  # the prefix copy: masked by assemble
                continuations.append(to_rollout(
                    prompt_ids_l[c.uid], ids, trainable, uid=N + j, group_id=c.group_id,
                    reward=float(cont["rewards"][j]), call=c_calls[j], call_name=c_names[j],
                    call_arguments=c_args[j], stream=Stream.CONTINUATION, source_uid=c.uid, prefix_len=c.prefix_len))
        samples = assemble_advantages(records, continuations, cfg)
        self._axpo_log_step(records, plan, continuations, cont)
        if not continuations:
            return batch  # nothing selected: exactly TRL's batch (AXPO == GRPO)
        return self._axpo_extend(batch, samples, prompt_ids_l, cont, sources)

    def _axpo_continue(self, inputs, prompt_ids_l, completion_ids_l, sampling_l, sources):
        """Generate, run the tools of and score one continuation per entry of `sources` (a
        PrefixCandidate each), from the fixed prefix through TRL's own generation path."""
        src = [c.uid for c in sources]
        cuts = [c.prefix_len - len(prompt_ids_l[i]) for c, i in zip(sources, src)]
        prompt_ids = [list(prompt_ids_l[i]) for i in src]
        new_ids, new_logps = self._generate_single_turn(
            [p + completion_ids_l[i][:cut] for p, i, cut in zip(prompt_ids, src, cuts)], None, {}, num_generations=1)
        completion_ids, logprobs = [], None if new_logps is None or sampling_l is None else []
        for j, (i, cut) in enumerate(zip(src, cuts)):
            room = max(self.max_completion_length - cut, 0)
            completion_ids.append(list(completion_ids_l[i][:cut]) + list(new_ids[j][:room]))
            if logprobs is not None:
                logprobs.append(list(sampling_l[i][:cut]) + list(new_logps[j][:room]))
        prompts = [copy.deepcopy(inputs[i]["prompt"]) for i in src]
        completions = self._axpo_decode(prompts, prompt_ids, completion_ids)
        tool_mask = [[1] * len(ids) for ids in completion_ids]
        n_calls = n_failed = 0
        if self.tools:
            saved = self._sync_tool_dicts, self._async_tool_dicts
            self._sync_tool_dicts = [saved[0][i] for i in src]
            self._async_tool_dicts = [saved[1][i] for i in src]
            try:
                tool_mask, completions, completion_ids, logprobs, n_calls, n_failed, _ = self._tool_call_loop(
                    copy.deepcopy(prompts), prompt_ids, completion_ids, completions, logprobs, None, {})
            finally:
                self._sync_tool_dicts, self._async_tool_dicts = saved
        eos_and_pad = [*self.eos_token_ids, self._tokenizer.pad_token_id]
        keep = [not (self.mask_truncated_completions and (not ids or ids[-1] not in eos_and_pad))
                for ids in completion_ids]
        rewards = self._axpo_combined_rewards(
            self._calculate_rewards([inputs[i] for i in src], prompts, completions, completion_ids))
        return dict(completion_ids=completion_ids, tool_mask=tool_mask, logprobs=logprobs, rewards=rewards,
                    completions=completions, keep=keep, cuts=cuts, tool_calls=n_calls, tool_failures=n_failed)

    def _axpo_decode(self, prompts, prompt_ids, completion_ids):
        """Completions as TRL's _generate decodes them (parse_response for tool calls when the
        tokenizer has a response schema)."""
        if not is_conversational({"prompt": prompts[0]}):
            return self.processing_class.batch_decode(completion_ids, skip_special_tokens=True)
        if (getattr(self._tokenizer, "response_template", None) is not None
                or getattr(self._tokenizer, "response_schema", None) is not None):
            return [[parse_response(self._tokenizer, ids, prefix=p, tools=self.tools)]
                    for p, ids in zip(prompt_ids, completion_ids)]
        contents = self.processing_class.batch_decode(completion_ids, skip_special_tokens=True)
        return [[{"role": "assistant", "content": c}] for c in contents]

    def _axpo_extend(self, batch, samples, prompt_ids_l, cont, sources):
        """TRL's batch with the continuation rows appended, per-token advantages and loss masks:
        ORIGINAL rows keep TRL's own advantage; a SOURCE_PREFIX row trains only its prefix
        (Eq. 4 advantage), a CONTINUATION row only what follows the prefix (Eq. 2)."""
        N, E = len(prompt_ids_l), len(sources)
        C0 = batch["completion_ids"].shape[1]
        lengths = [len(ids) for ids in cont["completion_ids"]]
        width = max([C0] + lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        device = batch["completion_ids"].device
        src = torch.tensor([c.uid for c in sources], device=device)

        def rows(lists, value, dtype):
            out = torch.full((E, width), value, dtype=dtype)
            for j, x in enumerate(lists):
                out[j, :len(x)] = torch.as_tensor(x, dtype=dtype)
            return out.to(device)

        new = {"prompt_ids": batch["prompt_ids"][src], "prompt_mask": batch["prompt_mask"][src],
               "completion_ids": rows(cont["completion_ids"], self._tokenizer.pad_token_id, torch.long),
               "completion_mask": rows([[int(k)] * n for k, n in zip(cont["keep"], lengths)], 0, torch.long),
               "tool_mask": rows(cont["tool_mask"], 1, torch.long),
               "advantages": torch.zeros(E, width)}
        batch = {k: v for k, v in batch.items()}
        if "tool_mask" not in batch:
            batch["tool_mask"] = torch.ones_like(batch["completion_mask"])
        for key in ("old_per_token_logps", "ref_per_token_logps"):
            if key in batch:
                new[key] = torch.zeros(E, width)  # computed below, on the merged rows
        if "sampling_per_token_logps" in batch:
            new["sampling_per_token_logps"] = rows(cont["logprobs"] or [[]] * E, 0.0, torch.float32)
        unknown = {k for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() > 0} - set(new)
        if unknown:
            raise ValueError(f"AXPO resampling cannot extend TRL batch fields {sorted(unknown)}")
        out = append_rows(batch, new, width, self._tokenizer.pad_token_id)

        # per-token advantages and loss masks of the AXPO samples (completion positions)
        adv, tool_mask = out["advantages"].float(), out["tool_mask"]
        for s in samples:
            r = s.rollout
            i = r.uid
            if s.stream == Stream.ORIGINAL:
                continue
            P, C = r.prompt_len, len(r) - r.prompt_len
            adv[i, :C] = s.advantages[P:].to(adv)
            adv[i, C:] = 0.0
            tool_mask[i, :C] = s.loss_mask[P:].to(tool_mask)
        out["advantages"], out["tool_mask"] = adv, tool_mask
        loss_mask = out["completion_mask"] * out["tool_mask"]
        out["num_items_in_batch"] = self.accelerator.gather(loss_mask.sum()).sum()

        new_rows = list(range(N, N + E))
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)[new_rows]
        am = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)[new_rows]
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if "old_per_token_logps" in out:
                out["old_per_token_logps"][new_rows] = self._get_per_token_logps_and_entropies(
                    self.model, ids, am, width)[0].to(out["old_per_token_logps"])
            if "ref_per_token_logps" in out:
                out["ref_per_token_logps"][new_rows] = self._axpo_ref_logps(ids, am, width).to(
                    out["ref_per_token_logps"])
        return out

    def _axpo_ref_logps(self, ids, am, width):
        if self.ref_model is not None:
            return self._get_per_token_logps_and_entropies(self.ref_model, ids, am, width)[0]
        model = self.accelerator.unwrap_model(self.model)  # PEFT: the reference is the adapter-free model
        with use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None):
            return self._get_per_token_logps_and_entropies(self.model, ids, am, width)[0]

    def _axpo_log_step(self, records, plan, continuations, cont):
        extra = {}
        if cont is not None:
            extra = {"continuation_tool_calls": float(cont["tool_calls"]),
                     "continuation_tool_failures": float(cont["tool_failures"])}
        extra["rows_added"] = float(len(continuations))
        diagnostics = step_diagnostics(records, plan, continuations, extra=extra)
        metrics = self._metrics["train"]
        for key, value in diagnostics.items():
            metrics[f"axpo/{key}"].append(float(value))
