"""Plain eager PyTorch reference of the clipped policy-gradient loss (GRPO / PPO / DAPO / AXPO).

Written like verl's ``compute_policy_loss_vanilla`` + ``agg_loss`` + ``kl_penalty``
(verl/trainer/ppo/core_algos.py), one [B, T] temporary per line, so that it is both the oracle of
the tests (evaluate it on float64 inputs) and the eager baseline of the benchmark. The fused op
(axpo.ops.policy_loss) must give the same numbers and, through autograd of this code, the same
gradient, ties at the clip boundaries included:

* torch.clamp passes the gradient where min <= x <= max (both ends inclusive);
* torch.maximum / torch.min(a, b) split the gradient in halves where a == b.

Differences from verl, all on inputs where verl itself gives NaN or an undefined choice:

* masked-out tokens are excluded with torch.where (verl multiplies by the mask, so a NaN / inf
  at a padded position would poison verl's loss; here it still poisons the gradient, through
  autograd's 0 * NaN, which the fused kernels do not);
* empty rows and an all-masked batch give 0, not NaN (see ``agg_loss``);
* the dual clip is off unless ``clip_ratio_c`` is given (verl's default is 3.0);
* k3 is the unclamped exp(ref - logp) - (ref - logp) - 1 (verl's ``low_var_kl`` clamps
  ref - logp to [-20, 20] and the result to [-10, 10]).
"""
from __future__ import annotations

import math

import torch

from ._dtypes import acc_dtype

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3", "k3_ratio")
# Rollout-mismatch corrections with the sampler's log-probs (rollout_logprobs), as verl's rollout
# correction and TRL's vllm_importance_sampling_correction: "tis" weighs each token's pg term by
# min(pi_old / pi_rollout, cap) (token-level truncated importance sampling); "seq_mask" drops the
# pg term of a sequence whose ratio prod_t pi_old / pi_rollout leaves [1 / cap, cap].
ROLLOUT_CORRECTIONS = ("tis", "seq_mask")
METRIC_NAMES = ("clipfrac", "clipfrac_low", "clipfrac_high", "clipfrac_dual", "approx_kl",
                "ratio_mean", "kl_mean", "rollout_weight_mean", "rollout_corrected_frac", "rollout_kl")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum(values over mask) / count(mask); 0 for an empty mask (verl: 0 / 1e-8 = 0 as well)."""
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    count = mask.sum().to(values.dtype)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def agg_loss(loss_mat: torch.Tensor, mask: torch.Tensor, agg: str,
             num_tokens: int | float | torch.Tensor | None = None,
             num_seqs: int | float | torch.Tensor | None = None,
             norm_tokens: int | float | None = None) -> torch.Tensor:
    """verl's agg_loss over a [B, T] loss matrix and a bool mask. The counts a data-parallel
    trainer knows globally can be given: num_tokens (token-mean's denominator, default the
    mask's count), num_seqs (the seq-means' number of sequences, default B) and norm_tokens
    (seq-mean-token-sum-norm's constant length L, default T; Dr. GRPO's max response length).

    token-mean               sum(mask * l) / num_tokens; 0 if no token
    seq-mean-token-mean      sum over the rows of sum_t(mask * l) / sum_t(mask), / num_seqs; an
                             empty row contributes 0 and still counts in num_seqs
    seq-mean-token-sum       sum over the rows of sum_t(mask * l), / num_seqs
    seq-mean-token-sum-norm  sum over the rows of sum_t(mask * l), / (num_seqs * norm_tokens)
                             (verl 0.9's value; older verl had no mean over the rows)
    """
    masked = torch.where(mask, loss_mat, torch.zeros_like(loss_mat))
    seqs = loss_mat.shape[0] if num_seqs is None else num_seqs
    if agg == "token-mean":
        if num_tokens is not None:
            return masked.sum() / num_tokens
        count = mask.sum().to(loss_mat.dtype)
        return torch.where(count > 0, masked.sum() / count.clamp(min=1), torch.zeros((), dtype=loss_mat.dtype, device=loss_mat.device))
    if agg == "seq-mean-token-mean":
        row_count = mask.sum(-1).to(loss_mat.dtype)
        seq_losses = torch.where(row_count > 0, masked.sum(-1) / row_count.clamp(min=1), torch.zeros_like(row_count))
        return seq_losses.sum() / seqs
    if agg == "seq-mean-token-sum":
        return masked.sum(-1).sum() / seqs
    if agg == "seq-mean-token-sum-norm":
        return masked.sum(-1).sum() / (seqs * (loss_mat.shape[-1] if norm_tokens is None else norm_tokens))
    raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str,
               ratio: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate: k1 = logp - ref, k2 = (logp - ref)^2 / 2,
    k3 = exp(ref - logp) - (ref - logp) - 1, k3_ratio = k3 * ratio (ratio = pi / pi_old, clamped as
    the loss's: k3 importance-weighted to the current policy, TRL's use_bias_correction_kl)."""
    if estimator == "k3_ratio":
        return kl_penalty(logprobs, ref_logprobs, "k3") * ratio
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k2":
        return 0.5 * (logprobs - ref_logprobs).square()
    if estimator == "k3":
        kl = ref_logprobs - logprobs
        return torch.exp(kl) - kl - 1
    raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    clip_ratio_c: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    agg: str = "token-mean",
    num_tokens: int | float | torch.Tensor | None = None,
    num_seqs: int | float | torch.Tensor | None = None,
    norm_tokens: int | float | None = None,
    rollout_logprobs: torch.Tensor | None = None,
    rollout_correction: str | None = None,
    rollout_cap: float = 2.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy loss + optional KL penalty, aggregated; returns (loss, metrics).

    logprobs [B, T] (any float dtype; computed in fp32, fp64 for fp64), old_logprobs [B, T],
    advantages [B] or [B, T], mask [B, T] bool or 0/1, ref_logprobs [B, T] or None.
    metrics: clipfrac (verl's pg_clipfrac), clipfrac_low / clipfrac_high (its A < 0 / A > 0
    parts), clipfrac_dual (verl's pg_clipfrac_lower; 0 without dual clip), approx_kl (verl's ppo_kl:
    mean of the clamped old - logp), ratio_mean, kl_mean (with ref_logprobs): masked means, 0-d fp32,
    0 for an empty mask.
    rollout_logprobs [B, T] (the sampler's log-probs) with rollout_correction None (metrics only),
    "tis" or "seq_mask" (ROLLOUT_CORRECTIONS) and rollout_cap: the correction weights the pg
    term only (not the KL), as constants; metrics rollout_weight_mean (mean weight),
    rollout_corrected_frac (tokens truncated, or in masked sequences) and rollout_kl (mean of
    rollout - old: the k1 estimate of KL(pi_rollout || pi_old) on the sampled tokens).
    """
    dt = acc_dtype(logprobs.dtype)
    log_prob = logprobs.to(dt)
    old_log_prob = old_logprobs.to(dt)
    adv = advantages.to(dt)
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1)
    adv = adv.expand_as(log_prob)
    response_mask = mask.bool() if mask.dtype == torch.bool else mask != 0

    negative_approx_kl = log_prob - old_log_prob
    negative_approx_kl = torch.clamp(negative_approx_kl, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    ppo_kl = masked_mean(-negative_approx_kl, response_mask)

    pg_losses1 = -adv * ratio
    pg_losses2 = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    clipped = torch.gt(pg_losses2, pg_losses1)
    pg_clipfrac = masked_mean(clipped.to(dt), response_mask)
    clipfrac_low = masked_mean((clipped & (adv < 0)).to(dt), response_mask)
    clipfrac_high = masked_mean((clipped & (adv > 0)).to(dt), response_mask)

    if clip_ratio_c is not None:
        pg_losses3 = -adv * clip_ratio_c
        clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
        pg_clipfrac_lower = masked_mean((torch.gt(clip_pg_losses1, pg_losses3) & (adv < 0)).to(dt), response_mask)
        pg_losses = torch.where(adv < 0, clip_pg_losses2, clip_pg_losses1)
    else:
        pg_clipfrac_lower = torch.zeros((), dtype=dt, device=log_prob.device)
        pg_losses = clip_pg_losses1

    loss_mat = pg_losses
    if rollout_logprobs is not None:
        lr = old_log_prob - rollout_logprobs.to(dt)  # log pi_old / pi_rollout
        rr = torch.exp(lr)
        if rollout_correction == "tis":
            weight = torch.clamp(rr, max=rollout_cap)  # NaN stays NaN
            corrected = rr > rollout_cap
        elif rollout_correction == "seq_mask":
            seq_lr = torch.where(response_mask, lr, torch.zeros_like(lr)).sum(-1, keepdim=True)
            keep = seq_lr.abs() <= math.log(rollout_cap)
            weight = keep.to(dt).expand_as(lr)
            corrected = (~keep).expand_as(lr)
        else:
            weight, corrected = torch.ones_like(lr), torch.zeros_like(lr, dtype=torch.bool)
        loss_mat = loss_mat * weight.detach()
    metrics = {
        "clipfrac": pg_clipfrac,
        "clipfrac_low": clipfrac_low,
        "clipfrac_high": clipfrac_high,
        "clipfrac_dual": pg_clipfrac_lower,
        "approx_kl": ppo_kl,
        "ratio_mean": masked_mean(ratio, response_mask),
    }
    if rollout_logprobs is not None:
        metrics["rollout_weight_mean"] = masked_mean(weight, response_mask)
        metrics["rollout_corrected_frac"] = masked_mean(corrected.to(dt), response_mask)
        metrics["rollout_kl"] = masked_mean(-lr, response_mask)
    if ref_logprobs is not None:
        kld = kl_penalty(log_prob, ref_logprobs.to(dt), kl_estimator, ratio)
        metrics["kl_mean"] = masked_mean(kld, response_mask)
        if kl_coef != 0:
            loss_mat = loss_mat + kl_coef * kld
    loss = agg_loss(loss_mat, response_mask, agg, num_tokens, num_seqs, norm_tokens)
    return loss, {k: v.detach().float() for k, v in metrics.items()}
