"""axpo as a verl plugin (verl 0.9.1): a policy loss, an advantage estimator, and the AXPO seam.

Importing this module registers, in verl's own registries (verl/trainer/ppo/core_algos.py):

* policy loss ``"axpo"`` (`compute_policy_loss_axpo`): verl's ``compute_policy_loss_vanilla``
  (PPO clip with ``clip_ratio_low`` / ``clip_ratio_high``, dual clip ``clip_ratio_c``, the
  optional ``rollout_is_weights``) followed by verl's ``agg_loss(..., **config.global_batch_info)``,
  computed by the fused op ``axpo.ops.policy_loss`` (one pass over the tokens, no [B, T]
  temporaries, the gradient recomputed in backward). Select it with
  ``actor_rollout_ref.actor.policy_loss.loss_mode=axpo``.
* advantage estimator ``"axpo_grpo"`` (`compute_axpo_grpo_advantage`): verl's
  ``compute_grpo_outcome_advantage`` (groups by the ``index`` = uid array, any group sizes),
  computed by ``axpo.ops.group_advantages`` (one segmented reduction, no Python loop over the
  groups). Select it with ``algorithm.adv_estimator=axpo_grpo``.

Registration is idempotent (importing twice, or reloading the module, is fine). verl imports this
module by itself at ``import verl``: axpo declares it in the ``verl.plugins`` entry-point group
(pyproject.toml), which verl/__init__.py loads unless ``VERL_USE_EXTERNAL_PLUGINS=none``
(verl swallows plugin import errors at debug level: check ``"axpo" in
core_algos.POLICY_LOSS_REGISTRY`` or import this module explicitly).

verl's conventions, followed here exactly (checked against verl's own functions by
tests/integrations/test_verl.py):

* agg_loss: "token-mean" divides by the global ``batch_num_tokens`` and multiplies by
  ``dp_size``; "token-sum" multiplies the token sum by ``dp_size``; the seq-mean modes divide
  the sum of the row losses by ``global_batch_size`` (default: the number of rows with at least
  one token, i.e. fully masked rows are not counted) and multiply by ``dp_size``;
  "seq-mean-token-sum-norm" also divides by ``loss_scale_factor`` (default: the padded width).
  These become the op's ``num_tokens`` / ``num_seqs`` / ``norm_tokens`` (the op itself counts
  every row in its default ``num_seqs``).
* the dual clip is always on (``clip_ratio_c``, default 3.0, as in verl).
* GRPO: a group of one rollout gets ``score / (1 + epsilon)`` (``score`` without std scaling),
  as verl's mean 0 / std 1 convention gives (axpo.ops.group_advantages gives such a group 0).
  A group whose scores are all equal gets exactly 0 here; verl's float32 mean / std of equal
  values can be a rounding error apart, which verl then divides by (std + epsilon) (e.g. 0.056
  instead of 0 for eight scores of 0.7 in float32).

Deviations, on inputs where verl gives NaN: a micro-batch without any token (token-mean without
``batch_num_tokens``, or a seq-mean mode without ``global_batch_size``) gives loss 0 and a zero
gradient here, NaN in verl. ``rollout_is_weights`` must be >= 0 (verl's truncated importance
weights are); tokens with weight 0 then count as unclipped in the clip-fraction metrics.

The AXPO resampling step itself (`AxpoVerlSeam`, at the end of this module) is a documented
sketch, not tested against a running verl trainer.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from verl.trainer.ppo import core_algos

from axpo.ops.group_advantages import group_advantages as _group_advantages
from axpo.ops.policy_loss import policy_loss as _policy_loss

__all__ = [
    "POLICY_LOSS_NAME", "ADV_ESTIMATOR_NAME", "compute_policy_loss_axpo",
    "compute_axpo_grpo_advantage", "register", "AxpoVerlSeam",
]

POLICY_LOSS_NAME = "axpo"
ADV_ESTIMATOR_NAME = "axpo_grpo"
AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
             "seq-mean-token-sum-norm")


def _cfg(config: Any, key: str, default: Any = None) -> Any:
    """config.get(key, default) for verl's ActorConfig / omegaconf DictConfig / a dict / an object."""
    if config is None:
        return default
    get = getattr(config, "get", None)
    if callable(get):
        return get(key, default)
    return getattr(config, key, default)


def _per_rank(total, dp_size: int, device: torch.device):
    """A global count divided by the data-parallel size (verl's `/ total * dp_size`)."""
    if isinstance(total, torch.Tensor):
        return total.to(device=device).reshape(()) / dp_size
    return float(total) / dp_size


def compute_policy_loss_axpo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Optional[Any] = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl policy loss "axpo": verl's compute_policy_loss_vanilla + agg_loss, fused.

    Same signature and return as verl's policy-loss functions: old_log_prob, log_prob,
    advantages, response_mask [B, T] (advantages may also be [B]); loss_agg_mode one of
    token-mean, token-sum, seq-mean-token-sum, seq-mean-token-mean, seq-mean-token-sum-norm;
    config: verl's ActorConfig (clip_ratio, clip_ratio_low, clip_ratio_high, clip_ratio_c,
    global_batch_info = {dp_size, batch_num_tokens, global_batch_size, loss_scale_factor});
    rollout_is_weights: [B, T] >= 0 or None.
    Returns (loss 0-d, {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"}: floats).
    """
    assert config is not None, "the axpo policy loss needs verl's actor config"
    assert not isinstance(config, core_algos.AlgoConfig), "pass the actor config, not the algorithm config"
    clip_ratio = _cfg(config, "clip_ratio", 0.2)
    clip_low = _cfg(config, "clip_ratio_low")
    clip_high = _cfg(config, "clip_ratio_high")
    clip_low = clip_ratio if clip_low is None else clip_low
    clip_high = clip_ratio if clip_high is None else clip_high
    clip_ratio_c = _cfg(config, "clip_ratio_c", 3.0)
    assert clip_ratio_c > 1.0, (
        f"The lower bound of the clip_ratio_c for dual-clip PPO should be greater than 1.0, but get the value: {clip_ratio_c}.")

    info = dict(_cfg(config, "global_batch_info", None) or {})
    dp_size = info.get("dp_size", 1)
    dp_size = 1 if dp_size is None else int(dp_size)
    batch_num_tokens = info.get("batch_num_tokens")
    global_batch_size = info.get("global_batch_size")
    loss_scale_factor = info.get("loss_scale_factor")

    mask = response_mask if response_mask.dtype == torch.bool else response_mask != 0
    adv = advantages
    if rollout_is_weights is not None:
        # pg(w A) = w pg(A) for w >= 0: the weights fold into the advantages, exactly
        adv = adv * rollout_is_weights.to(adv.dtype) if adv.dim() == 2 else adv.unsqueeze(-1) * rollout_is_weights
    device = log_prob.device
    kw: dict[str, Any] = {}
    if loss_agg_mode == "token-mean":
        agg = "token-mean"
        if batch_num_tokens is None:
            if dp_size > 1:
                raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
        else:
            kw["num_tokens"] = _per_rank(batch_num_tokens, dp_size, device)
    elif loss_agg_mode == "token-sum":
        agg, kw["num_tokens"] = "token-mean", 1.0 / dp_size
    elif loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"):
        agg = loss_agg_mode
        if global_batch_size is None:
            if dp_size > 1:
                raise ValueError("global_batch_size is required when dp_size > 1")
            # verl leaves fully masked rows out of the count (the op's default counts every row)
            kw["num_seqs"] = (mask.sum(-1) > 0).sum().clamp(min=1)
        else:
            kw["num_seqs"] = _per_rank(global_batch_size, dp_size, device)
        if loss_agg_mode == "seq-mean-token-sum-norm":
            kw["norm_tokens"] = float(log_prob.shape[-1] if loss_scale_factor is None else loss_scale_factor)
        elif loss_agg_mode == "seq-mean-token-mean" and response_mask.dtype == torch.float64:
            # verl divides each row by (count + 1e-8); the 1e-8 vanishes unless the count is fp64
            # (a bool / integer / fp32 mask sums to a count that + 1e-8 rounds back in fp32)
            count = response_mask.sum(-1, keepdim=True)
            factor = count / (count + 1e-8)
            adv = (adv if adv.dim() == 2 else adv.unsqueeze(-1)) * factor.to(adv.dtype)
    else:
        raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")

    loss, m = _policy_loss(log_prob, old_log_prob, adv, mask, clip_low=float(clip_low),
                           clip_high=float(clip_high), clip_ratio_c=float(clip_ratio_c), agg=agg, **kw)
    metrics = {
        "actor/pg_clipfrac": m["clipfrac"].item(),
        "actor/ppo_kl": m["approx_kl"].item(),
        "actor/pg_clipfrac_lower": m["clipfrac_dual"].item(),
    }
    return loss, metrics


def _group_ids(index, device: torch.device) -> torch.Tensor:
    """verl's uid array (np.ndarray of str / int / any hashable) -> [B] int64 dense labels."""
    if isinstance(index, torch.Tensor):
        return index.to(device=device, dtype=torch.int64).reshape(-1)
    arr = np.asarray(index)
    if arr.dtype.kind in "iu":
        return torch.as_tensor(arr.astype(np.int64), device=device).reshape(-1)
    seen: dict = {}
    ids = [seen.setdefault(k, len(seen)) for k in arr.reshape(-1).tolist()]
    return torch.tensor(ids, dtype=torch.int64, device=device)


def compute_axpo_grpo_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool | None = None,
    config: Optional[Any] = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl advantage estimator "axpo_grpo": compute_grpo_outcome_advantage's numbers.

    token_level_rewards, response_mask [B, T]; index [B] group labels (verl's uid), any group
    sizes. score = rewards summed over T; per group: (score - mean) / (std + epsilon) (unbiased
    std) or score - mean (norm_adv_by_std_in_grpo=False, Dr.GRPO); a group of one keeps
    score / (1 + epsilon) (resp. score), as in verl. Returns (advantages, returns), both
    [B, T] = the scalar times response_mask, in the rewards' dtype.

    verl's trainer (ray_trainer.compute_advantage) calls a registered estimator with
    token_level_rewards, response_mask, index and config (the AlgoConfig) only: an
    unspecified norm_adv_by_std_in_grpo is read from config.norm_adv_by_std_in_grpo (default
    True); other keyword arguments (reward_baselines, ...) are ignored.
    """
    if norm_adv_by_std_in_grpo is None:
        norm_adv_by_std_in_grpo = bool(_cfg(config, "norm_adv_by_std_in_grpo", True))
    with torch.no_grad():
        scores = token_level_rewards.sum(dim=-1)
        gid = _group_ids(index, scores.device)
        if gid.numel() != scores.numel():
            raise ValueError(f"index must have one entry per row ({scores.numel()}), got {gid.numel()}")
        adv = _group_advantages(scores, gid, scale="std" if norm_adv_by_std_in_grpo else "none",
                                eps=float(epsilon))
        _, inverse, counts = torch.unique(gid, return_inverse=True, return_counts=True)
        single = counts[inverse] == 1
        # verl: (score - 0) / (torch.tensor(1.0) + epsilon), a float32 divisor
        alone = scores.to(adv.dtype)
        if norm_adv_by_std_in_grpo:
            alone = alone / float(torch.tensor(1.0, dtype=torch.float32) + epsilon)
        adv = torch.where(single, alone, adv).to(scores.dtype)
        advantages = adv.unsqueeze(-1) * response_mask
    return advantages, advantages


def register() -> None:
    """Register "axpo" (policy loss) and "axpo_grpo" (advantage estimator) with verl; idempotent.

    A name already taken by some other package's function is an error (verl's register_adv_est
    raises likewise); a copy of this module's own function (module reloaded) is replaced.
    """
    for registry, name, fn, reg in (
        (core_algos.POLICY_LOSS_REGISTRY, POLICY_LOSS_NAME, compute_policy_loss_axpo, core_algos.register_policy_loss),
        (core_algos.ADV_ESTIMATOR_REGISTRY, ADV_ESTIMATOR_NAME, compute_axpo_grpo_advantage, core_algos.register_adv_est),
    ):
        old = registry.get(name)
        if old is not None and old is not fn:
            if getattr(old, "__module__", None) == __name__ and getattr(old, "__name__", None) == fn.__name__:
                del registry[name]
            else:
                raise ValueError(f"verl name {name!r} is already registered by {getattr(old, '__module__', old)!r}")
        reg(name)(fn)


register()


class AxpoVerlSeam:
    """UNTESTED SKETCH: where the AXPO resampling step goes in verl's RayPPOTrainer.fit().

    Nothing here runs at import (no ray, no trainer import). The step sits after the reward
    computation and before compute_advantage, on the driver, in verl 0.9.1's
    ``RayPPOTrainer.fit`` loop::

        batch = ...generate_sequences(...)              # G rollouts per prompt, uid per prompt
        reward_tensor, _ = compute_reward(batch, ...)   # token_level_scores
        batch = seam.step(batch, trainer)               # <- AXPO: adds rows, sets "advantages"
        ... old_log_prob / ref / values as usual ...
        # skip compute_advantage (the seam filled batch.batch["advantages"]/["returns"]),
        # or use algorithm.adv_estimator=axpo_grpo for the non-resampling baselines
        actor_output = self.actor_rollout_wg.update_actor(batch)

    ``step`` does, with axpo.algo (cfg = axpo.algo.AxpoConfig(algorithm="axpo", ratio, k)):

    1. records: one ``axpo.records.Rollout`` per row of the DataProto: token_ids = the
       prompt's unpadded ``input_ids`` + the response's (``attention_mask`` gives the valid
       tokens, never the pad id), logprobs = ``rollout_log_probs`` (0 on prompt / tool tokens),
       trainable = ``response_mask`` (verl's multi-turn agent loop masks tool tokens there),
       group_id = a dense id of ``non_tensor_batch["uid"]``, uid = the row number, reward =
       ``token_level_scores.sum(-1)``, tool_calls = the ``<tool_call>`` spans found in the
       response tokens (axpo.records.ToolCallRecord: start, open_end, end).
    2. ``plan = axpo.algo.plan_resample(rollouts, num_questions, group_size, cfg, seed=step)``.
    3. continuations: for each ``c in plan.selected``, K new requests whose prompt is the
       source's ``token_ids[:c.prefix_len]`` (prompt + model tokens up to and including the
       first ``<tool_call>``), generated by the same rollout workers
       (``trainer.async_rollout_manager`` / ``actor_rollout_wg.generate_sequences`` on a
       DataProto built from those prefixes, ``n = K``; the prefix is prompt-side there, so
       vLLM / SGLang prefix caching shares it), then scored with the same reward function;
       each becomes a Rollout with stream CONTINUATION, source_uid, prefix_len.
    4. ``samples = axpo.algo.assemble_advantages(rollouts, continuations, cfg)``: per-token
       advantages and loss masks for every original row (a source row's prefix gets the
       AXPO prefix credit) and every continuation row.
    5. back to verl: append the continuation rows to the DataProto (``DataProto.concat``,
       padded to the batch's prompt / response lengths, uid = the source's), write
       ``batch.batch["advantages"] = batch.batch["returns"] = [B', T_resp]`` from the samples
       (the response part of each sample's advantage), and set ``response_mask`` to the
       samples' loss masks (a SOURCE_PREFIX row trains on its prefix only where the method
       says so). The policy loss "axpo" (or verl's "vanilla") then trains on all rows; with a
       seq-mean mode, set ``global_batch_size`` consistently with the grown batch.

    Balance: the grown batch must stay divisible by the data-parallel size (pad with zero-mask
    rows, which verl's seq-mean modes and this module's loss leave out of the count).
    """

    def __init__(self, cfg=None):
        from axpo.algo import AxpoConfig
        self.cfg = cfg if cfg is not None else AxpoConfig()

    def step(self, batch, trainer):  # pragma: no cover - sketch
        raise NotImplementedError(
            "AxpoVerlSeam.step is a documented sketch (see the class docstring); it has not been "
            "run inside a verl trainer")
