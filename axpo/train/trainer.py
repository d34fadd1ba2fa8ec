"""The DeepSpeed trainer: one engine around the policy, the fused LM-head forward, micro-batches
by token budget with gradient accumulation, and the SFT and policy-gradient updates.

The forward never builds `[N, V]` logits: the LM head is swapped for
`axpo.ops.LinearLogprobEntropy` (before `deepspeed.initialize`, so ZeRO-3 gathers its weight in
its own forward), and only the rows whose next token is trained go through it. The loss is
`axpo.ops.policy_loss`.

Data parallelism: every rank trains on its own samples; losses are normalized by the GLOBAL
count (tokens or streams, all-reduced), times the world size because DeepSpeed averages the
gradients over ranks. So N ranks on a split batch take the same step as one rank on all of it.
All ranks run the same number of micro-batches (ZeRO-2/3 reduce in every backward); a rank with
fewer pads with a zero-weighted copy of one of its own.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from ..algo import TrainSample
from ..models import Policy, batch_inputs
from ..ops import LinearLogprobEntropy, policy_loss
from .config import TrainerConfig
from .distributed import DistInfo, all_reduce_max, all_reduce_sum

__all__ = ["LogprobModel", "PolicyTrainer", "ReferencePolicy", "Row", "micro_batches", "ds_config"]


@dataclass
class Row:
    """One training sequence: tokens, the images whose placeholders they hold, which next tokens
    are trained (bool [T], position t means token t), and per-token float fields."""
    token_ids: list[int]
    images: list
    loss_mask: Tensor
    advantages: Tensor | None = None
    old_logprobs: Tensor | None = None
    rollout_logprobs: Tensor | None = None  # the engine's, when old_logprobs are the trainer's own

    @classmethod
    def from_sample(cls, s: TrainSample) -> "Row":
        return cls(s.rollout.token_ids.tolist(), list(s.rollout.images), s.loss_mask.bool(),
                   s.advantages.float(), s.old_logprobs.float())


def micro_batches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Indices grouped so each group's rows * longest row <= token_budget (a longer row alone),
    longest rows first so padding stays small. Deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= token_budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


class LogprobModel(nn.Module):
    """A causal LM (Qwen3-VL or Qwen3, transformers) -> log-probs and entropies of the trained
    next tokens, through the fused head. `model.lm_head` is replaced in place (parameters shared,
    so tied embeddings stay tied)."""

    def __init__(self, model: nn.Module, chunk_size: int | None = None):
        super().__init__()
        if not isinstance(model.lm_head, LinearLogprobEntropy):
            model.lm_head = LinearLogprobEntropy.from_linear(model.lm_head, chunk_size=chunk_size)
        self.model = model
        self.is_vision = getattr(model.config, "vision_config", None) is not None

    def forward(self, inputs: dict[str, Tensor], select: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
        """inputs: batch_inputs(...) right-padded [B, T]; select: bool [B, T], token t trained.
        Returns (logprobs, entropy), each [B, T] float32, 0 where not selected."""
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        vision = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        if self.is_vision:
            positions, _ = self.model.model.get_rope_index(ids, vision["mm_token_type_ids"],
                                                           vision.get("image_grid_thw"), attention_mask=mask)
        else:
            positions = torch.arange(ids.shape[1], device=ids.device)[None].expand_as(ids)
        hidden = self.model.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                  use_cache=False, **vision).last_hidden_state
        # hidden at t-1 predicts token t
        sel = select[:, 1:]
        head = self.model.lm_head
        head.temperature = float(temperature)
        logp_sel, ent_sel = head(hidden[:, :-1][sel], ids[:, 1:][sel])
        zeros = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
        full_sel = torch.cat([torch.zeros_like(select[:, :1]), sel], dim=1)
        return zeros.masked_scatter(full_sel, logp_sel.float()), zeros.masked_scatter(full_sel, ent_sel.float())


def ds_config(cfg: TrainerConfig, lr: float, warmup_steps: int) -> dict:
    """The DeepSpeed config: our loop owns accumulation (unmanaged: backward accumulates, step()
    reduces and updates), so batch sizes are nominal."""
    out = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": cfg.grad_clip,  # 0: off
        "zero_optimization": {"stage": cfg.zero_stage},
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": list(cfg.adam_betas), "eps": 1e-8,
                                                  "weight_decay": cfg.weight_decay, "torch_adam": True}},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if cfg.zero_stage == 3:
        out["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    if warmup_steps > 0:
        out["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": lr,
                                                           "warmup_num_steps": warmup_steps,
                                                           "warmup_type": "linear"}}
    if cfg.dtype == "bfloat16":
        out["bf16"] = {"enabled": True}
    return out


def _to_inputs(policy: Policy, rows: Sequence[Row], pad_id: int, device) -> tuple[dict, Tensor]:
    inputs = batch_inputs(policy, [r.token_ids for r in rows], [r.images for r in rows], pad_id=pad_id,
                          left_pad=False, device=device)
    select = torch.zeros(inputs["input_ids"].shape, dtype=torch.bool)
    for b, r in enumerate(rows):
        select[b, :len(r.token_ids)] = r.loss_mask
    return inputs, select.to(device)


def _pad_field(rows: Sequence[Row], name: str, t: int, device) -> Tensor:
    out = torch.zeros((len(rows), t), dtype=torch.float32)
    for b, r in enumerate(rows):
        value = getattr(r, name)
        out[b, :len(value)] = value
    return out.to(device)


class ReferencePolicy:
    """The frozen reference (SFT) policy for the KL term: log-probs of the trained tokens."""

    def __init__(self, policy: Policy, cfg: TrainerConfig, dist_info: DistInfo):
        model = copy.deepcopy(policy.model).to(dist_info.device)
        for p in model.parameters():
            p.requires_grad_(False)
        self.module = LogprobModel(model, cfg.head_chunk_size).eval()
        if cfg.zero_stage == 3:  # partitioned like the actor (no optimizer)
            import deepspeed

            self.module, *_ = deepspeed.initialize(model=self.module, config={
                "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
                **({"bf16": {"enabled": True}} if cfg.dtype == "bfloat16" else {})})

    @torch.no_grad()
    def logprobs(self, inputs: dict, select: Tensor, temperature: float) -> Tensor:
        return self.module(inputs, select, temperature)[0]


class PolicyTrainer:
    """A DeepSpeed engine around `policy.model` (trained in place) with the SFT and RL updates.

    lr / warmup_steps: the optimizer's (a linear warm-up, then constant).
    """

    def __init__(self, policy: Policy, cfg: TrainerConfig, dist_info: DistInfo, *, lr: float,
                 warmup_steps: int = 0, pad_id: int = 0):
        import deepspeed

        self.policy, self.cfg, self.dist, self.pad_id = policy, cfg, dist_info, pad_id
        policy.model.to(dist_info.device)
        if cfg.gradient_checkpointing:
            policy.model.gradient_checkpointing_enable()
        self.module = LogprobModel(policy.model, cfg.head_chunk_size)
        self.module.train()
        params = [p for p in self.module.parameters() if p.requires_grad]
        self.engine, *_ = deepspeed.initialize(model=self.module, model_parameters=params,
                                               config=ds_config(cfg, lr, warmup_steps))

    # -- weights -------------------------------------------------------------------------------
    def weights(self) -> dict[str, Tensor]:
        """The full parameters by the HF model's own names (gathered under ZeRO-3), on the CPU."""
        import deepspeed

        params = list(self.module.model.named_parameters())
        gather = (deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None)
                  if self.cfg.zero_stage == 3 else contextlib.nullcontext())
        with gather:
            return {n: p.detach().to("cpu", copy=True) for n, p in params}

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    # -- one update over micro-batches ----------------------------------------------------------
    def _rank_micro_batches(self, rows: Sequence[Row]):
        """Yields (real, rows, inputs, select) per micro-batch, padded with repeats of the first
        (real=False) so that every rank runs the same number of forwards (ZeRO-3 gathers
        parameters in each)."""
        groups = micro_batches([len(r.token_ids) for r in rows], self.cfg.micro_batch_tokens)
        (n_max,) = all_reduce_max([len(groups)])
        for i in range(int(n_max)):
            real = i < len(groups)
            mb = [rows[j] for j in (groups[i] if real else groups[0] if groups else [])]
            if not mb:
                raise ValueError(f"rank {self.dist.rank} has no samples to train on: give every data-parallel "
                                 "rank at least one question (rl.questions_per_step >= world size)")
            inputs, select = _to_inputs(self.policy, mb, self.pad_id, self.dist.device)
            yield real, mb, inputs, select

    def recompute_old_logprobs(self, rows: Sequence[Row], temperature: float) -> None:
        """Replaces each row's old_logprobs by the trainer's own log-probs of its trained tokens
        (a no-grad forward of the current weights), keeping the engine's as rollout_logprobs."""
        with torch.no_grad():
            for real, mb, inputs, select in self._rank_micro_batches(rows):
                logp, _ = self.engine(inputs, select, temperature)
                if real:
                    logp = logp.float().cpu()
                    for b, r in enumerate(mb):
                        r.rollout_logprobs = r.old_logprobs
                        r.old_logprobs = logp[b, :len(r.token_ids)].clone()

    def _accumulate(self, rows: Sequence[Row], loss_fn, temperature: float) -> tuple[float, dict[str, float]]:
        """Forward/backward of `rows` in micro-batches, then one optimizer step.

        loss_fn(logp, entropy, inputs, select, rows) -> (loss, {name: 0-d tensor sum}) per micro-batch.
        Returns (sum of this rank's micro-batch losses, metric sums), read back to the host once."""
        total, sums = None, {}
        for real, mb, inputs, select in self._rank_micro_batches(rows):
            logp, ent = self.engine(inputs, select, temperature)
            loss, metrics = loss_fn(logp, ent, inputs, select, mb)
            if not real:
                loss = loss * 0.0  # same graph as a real micro-batch, no contribution
            self.engine.backward(loss, scale_wrt_gas=False)
            if real:  # kept on the device: no host sync per micro-batch
                total = loss.detach() if total is None else total + loss.detach()
                for k, v in metrics.items():
                    sums[k] = v.detach() if k not in sums else sums[k] + v.detach()
        self.engine.step()
        keys = sorted(sums)
        values = torch.stack([total.float()] + [sums[k].float() for k in keys]).tolist()
        return values[0], dict(zip(keys, values[1:]))

    def sft_step(self, rows: Sequence[Row]) -> dict[str, float]:
        """Token-mean negative log-likelihood of the trained tokens over the global batch."""
        (global_tokens,) = all_reduce_sum([sum(int(r.loss_mask.sum()) for r in rows)])
        norm = max(global_tokens, 1.0) / self.dist.world

        def loss_fn(logp, ent, inputs, select, mb):
            return -logp.sum() / norm, {"entropy_sum": ent.sum()}

        local, sums = self._accumulate(rows, loss_fn, 1.0)
        loss, ent = all_reduce_sum([local, sums.get("entropy_sum", 0.0)])
        return {"loss": loss / self.dist.world, "entropy": ent / max(global_tokens, 1.0),
                "grad_norm": _grad_norm(self.engine), "lr": self.lr(), "tokens": global_tokens}

    def rl_step(self, rows: Sequence[Row], *, agg: str, clip_low: float, clip_high: float, kl_coef: float,
                kl_estimator: str, temperature: float, reference: ReferencePolicy | None = None,
                norm_tokens: int = 256, entropy_coef: float = 0.0, rollout_correction: str | None = None,
                rollout_cap: float = 2.0) -> dict[str, float]:
        """One optimizer step of the clipped policy-gradient loss (+ KL to the reference) on
        this rank's rows; `agg` (an axpo.ops.policy_loss mode) over the GLOBAL batch (see module
        docstring); norm_tokens: seq-mean-token-sum-norm's constant length. Rows that carry
        rollout_logprobs (recompute_old_logprobs) get axpo.ops.policy_loss's rollout metrics and
        `rollout_correction` (None, "tis", "seq_mask") with `rollout_cap`."""
        world = self.dist.world
        tokens, streams = all_reduce_sum([sum(int(r.loss_mask.sum()) for r in rows), len(rows)])
        # global counts, divided by the world size because DeepSpeed averages the ranks' gradients
        if agg == "token-mean":
            counts = {"num_tokens": max(tokens, 1.0) / world}
        else:
            counts = {"num_seqs": max(streams, 1.0) / world}
            if agg == "seq-mean-token-sum-norm":
                counts["norm_tokens"] = norm_tokens
        use_kl = reference is not None and kl_coef > 0

        def loss_fn(logp, ent, inputs, select, mb):
            t = select.shape[1]
            old = _pad_field(mb, "old_logprobs", t, select.device)
            adv = _pad_field(mb, "advantages", t, select.device)
            ref = reference.logprobs(inputs, select, temperature) if use_kl else None
            rollout = (_pad_field(mb, "rollout_logprobs", t, select.device)
                       if all(r.rollout_logprobs is not None for r in mb) else None)
            loss, m = policy_loss(logp, old, adv, select, clip_low=clip_low, clip_high=clip_high,
                                  ref_logprobs=ref, kl_coef=kl_coef if use_kl else 0.0, kl_estimator=kl_estimator,
                                  agg=agg, rollout_logprobs=rollout,
                                  rollout_correction=rollout_correction if rollout is not None else None,
                                  rollout_cap=rollout_cap, **counts)
            entropy_sum = ent.sum()  # 0 off the selected tokens
            if entropy_coef > 0:
                loss = loss - entropy_coef * entropy_sum / (max(tokens, 1.0) / world)
            n = select.sum()
            out = {f"{k}_sum": v * n for k, v in m.items()}  # masked means -> sums
            out["entropy_sum"] = entropy_sum
            return loss, out

        local, sums = self._accumulate(rows, loss_fn, temperature)
        keys = sorted(sums)
        reduced = all_reduce_sum([local] + [sums[k] for k in keys])
        metrics = {"loss": reduced[0] / world, "grad_norm": _grad_norm(self.engine), "lr": self.lr(),
                   "train_tokens": tokens, "train_streams": streams}
        for k, v in zip(keys, reduced[1:]):
            metrics[k[:-4]] = v / max(tokens, 1.0)
        if "kl_mean" in metrics:  # KL to the reference, as the reports name it
            metrics["kl"] = metrics.pop("kl_mean")
        return metrics

    # -- checkpoints -----------------------------------------------------------------------------
    def save(self, directory: str, tag: str, client_state: dict) -> None:
        self.engine.save_checkpoint(directory, tag=tag, client_state=client_state)

    def load(self, directory: str, tag: str) -> dict:
        try:
            path, client_state = self.engine.load_checkpoint(directory, tag=tag)
        except Exception as e:  # DeepSpeed asserts on missing or partial files
            raise ValueError(f"cannot load checkpoint {tag!r} from {directory} ({type(e).__name__}: {e}): restore "
                             "it, or set log.resume=false to start over") from e
        if path is None:
            raise ValueError(f"no DeepSpeed checkpoint {tag!r} under {directory}: restore it, or set log.resume=false "
                             "to start over")
        return client_state or {}


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return float("nan")
    return float(norm)
