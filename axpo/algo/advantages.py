"""AXPO step 6: per-token advantages and loss masks of every stream, and batch packing.

Streams (see records.Stream):
- ORIGINAL: the group advantage (GRPO / Dr.GRPO) on every trainable token.
- SOURCE_PREFIX (Eq. 3-4): a source rollout with continuations; only its trainable tokens before
  prefix_len are trained, with the group advantage recomputed after replacing only its reward by
  r_prefix = 1 if any continuation is correct (reward > 0) else 0. Its own failed continuation
  is masked out.
- CONTINUATION (Eq. 2): only the trainable tokens from prefix_len on, with the advantage
  normalized over the continuations of the same source; the prefix copy is masked out.
The method's fields (axpo.algo.methods) change two of these: without `prefix_credit` a source
stays ORIGINAL (its GRPO advantage on all its tokens), and with continuation_group="original"
the continuations are normalized with the statistics of their whole group (its originals and
every continuation of that group). Every group statistic comes from one call of
axpo.ops.group_advantages.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor

from axpo.ops import group_advantages

from . import _checks
from .config import AxpoConfig
from ..records import Rollout, Stream

__all__ = ["TrainSample", "assemble_advantages", "pack_samples", "STREAM_CODES"]

# integer codes of the `stream` tensor of pack_samples
STREAM_CODES = {Stream.ORIGINAL: 0, Stream.SOURCE_PREFIX: 1, Stream.CONTINUATION: 2}


@dataclass
class TrainSample:
    """One training sequence.

    rollout: the tokens (rollout.token_ids [T]) and sampling log-probs.
    advantages: float32 [T], 0 wherever loss_mask is False.
    loss_mask: bool [T], the tokens this sample trains (a subset of rollout.trainable).
    stream: ORIGINAL, SOURCE_PREFIX or CONTINUATION.
    """
    rollout: Rollout
    advantages: Tensor
    loss_mask: Tensor
    stream: Stream

    @property
    def old_logprobs(self) -> Tensor:
        """float32 [T]: the sampling log-probs (rollout.logprobs)."""
        return self.rollout.logprobs

    @property
    def group_id(self) -> int:
        return self.rollout.group_id


def _sample(rollout: Rollout, advantage: Tensor, mask: Tensor, stream: Stream) -> TrainSample:
    """Broadcast a scalar advantage over the masked positions (exact 0 elsewhere)."""
    adv = torch.where(mask, advantage.to(torch.float32), torch.zeros((), dtype=torch.float32))
    return TrainSample(rollout=rollout, advantages=adv, loss_mask=mask, stream=stream)


def _continuations_by_source(continuations, by_uid: dict[int, Rollout]) -> dict[int, list[int]]:
    """Check the continuations; source uid -> indices into continuations (input order)."""
    groups: dict[int, list[int]] = defaultdict(list)
    for i, c in enumerate(continuations):
        name = f"continuations[{i}]"
        if c.stream != Stream.CONTINUATION:
            raise ValueError(f"{name} must have stream CONTINUATION, got {c.stream.value!r}")
        _checks.reward_of(c, name)
        if c.source_uid is None or c.source_uid not in by_uid:
            raise ValueError(f"{name} source_uid must be the uid of one of the rollouts, got {c.source_uid!r}")
        if c.prefix_len is None:
            raise ValueError(f"{name} prefix_len must be set (tokens [0, prefix_len) are the fixed prefix)")
        source = by_uid[c.source_uid]
        if c.group_id != source.group_id:
            raise ValueError(f"{name} group_id {c.group_id} differs from its source's ({source.group_id})")
        if c.prefix_len > len(source) or not torch.equal(c.token_ids[: c.prefix_len],
                                                         source.token_ids[: c.prefix_len]):
            raise ValueError(f"{name} tokens [0, prefix_len={c.prefix_len}) must equal those of its source "
                             f"(uid={source.uid}, {len(source)} tokens)")
        if groups[c.source_uid]:
            first = continuations[groups[c.source_uid][0]]
            if first.prefix_len != c.prefix_len:
                raise ValueError(f"{name} prefix_len {c.prefix_len} differs from that of another continuation "
                                 f"of source uid {c.source_uid} ({first.prefix_len})")
        groups[c.source_uid].append(i)
    return groups


def assemble_advantages(rollouts, continuations, cfg: AxpoConfig) -> list[TrainSample]:
    """Advantages and loss masks of every training sample of a step.

    Args:
        rollouts: the step's ORIGINAL rollouts (R of them, all scored, uids unique).
        continuations: CONTINUATION rollouts (source_uid, prefix_len, reward set; any number per
            source); must be empty unless cfg resamples (a resampling method, resample=True).
        cfg: AxpoConfig (algorithm, resample, scale, eps).
    Returns:
        one TrainSample per rollout, in input order (a source with continuations as a
        SOURCE_PREFIX sample when the method gives prefix credit, the others ORIGINAL), then one
        CONTINUATION sample per continuation, in input order. A selected source with no
        continuations stays ORIGINAL.
    """
    if not isinstance(cfg, AxpoConfig):
        raise TypeError(f"cfg must be an AxpoConfig, got {type(cfg).__name__}")
    rollouts = _checks.originals(rollouts, "rollouts")
    continuations = _checks.rollout_list([] if continuations is None else continuations, "continuations")
    if continuations and not cfg.resampling:
        raise ValueError(f"continuations must be empty when the resample step is off "
                         f"(algorithm={cfg.algorithm!r}, resample={cfg.resample}); got {len(continuations)}")
    scale, eps = cfg.advantage_scale, float(cfg.eps)
    rewards = torch.tensor([float(r.reward) for r in rollouts], dtype=torch.float32)
    group_ids = torch.tensor([r.group_id for r in rollouts], dtype=torch.int64)

    if not continuations:  # plain GRPO / Dr.GRPO: the exact same call as the baselines
        adv = group_advantages(rewards, group_ids, scale=scale, eps=eps)
        return [_sample(r, adv[i], r.trainable, Stream.ORIGINAL) for i, r in enumerate(rollouts)]

    by_uid = {r.uid: r for r in rollouts}
    cont_of = _continuations_by_source(continuations, by_uid)
    index_of = {r.uid: i for i, r in enumerate(rollouts)}
    sources = [r.uid for r in rollouts if r.uid in cont_of]  # rollouts' order
    R, S, C = len(rollouts), len(sources), len(continuations)
    method = cfg.method

    # One batched call over labelled segments: [0, n_groups) the original groups, then per source
    # s its Eq. 4 copy of the group (its reward replaced by r_prefix), then the continuations'
    # groups: per source (Eq. 2), or per original group with a copy of its originals ("original").
    _, dense = torch.unique(group_ids, return_inverse=True)
    n_groups = int(dense.max()) + 1
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(dense.tolist()):
        members[g].append(i)
    source_of_cont = [0] * C
    for s, uid in enumerate(sources):
        for j in cont_of[uid]:
            source_of_cont[j] = s
    cont_source = torch.tensor(source_of_cont, dtype=torch.int64)
    cont_rewards = torch.tensor([float(c.reward) for c in continuations], dtype=torch.float32)
    seg_rewards, seg_labels, next_label, size = [rewards], [dense], n_groups, [R]

    def segment(values: Tensor, label: int | Tensor) -> int:
        """Appends a segment (one label, or one per value); returns its offset in the batched output."""
        offset = size[0]
        size[0] += len(values)
        seg_rewards.append(values)
        seg_labels.append(label if isinstance(label, Tensor) else torch.full((len(values),), label, dtype=torch.int64))
        return offset

    prefix_pos: dict[int, int] = {}
    if method.prefix_credit:
        # Eq. 3: r_prefix = 1 if any continuation of the source is correct (reward > 0)
        best = torch.full((S,), float("-inf")).scatter_reduce(0, cont_source, cont_rewards, "amax")
        r_prefix = (best > 0).to(torch.float32)
        for s, uid in enumerate(sources):
            group = members[int(dense[index_of[uid]])]
            at = group.index(index_of[uid])
            copy = rewards[torch.tensor(group, dtype=torch.int64)]  # indexing copies
            copy[at] = r_prefix[s]
            prefix_pos[uid] = segment(copy, next_label) + at
            next_label += 1
    if method.continuation_group == "own":  # Eq. 2
        cont_offset = segment(cont_rewards, next_label + cont_source)
    else:  # with the statistics of the source's whole group: its originals and all its continuations
        cont_group = dense[torch.tensor([index_of[c.source_uid] for c in continuations], dtype=torch.int64)]
        for g in sorted(set(cont_group.tolist())):
            group = members[g]
            segment(rewards[torch.tensor(group, dtype=torch.int64)], next_label + g)
        cont_offset = segment(cont_rewards, next_label + cont_group)
    adv = group_advantages(torch.cat(seg_rewards), torch.cat(seg_labels), scale=scale, eps=eps)
    orig_adv, cont_adv = adv[:R], adv[cont_offset:cont_offset + C]

    samples = []
    for i, r in enumerate(rollouts):
        if r.uid in prefix_pos:
            prefix_len = continuations[cont_of[r.uid][0]].prefix_len
            mask = r.trainable & (torch.arange(len(r)) < prefix_len)
            samples.append(_sample(r, adv[prefix_pos[r.uid]], mask, Stream.SOURCE_PREFIX))
        else:
            samples.append(_sample(r, orig_adv[i], r.trainable, Stream.ORIGINAL))
    for j, c in enumerate(continuations):
        mask = c.trainable & (torch.arange(len(c)) >= c.prefix_len)
        samples.append(_sample(c, cont_adv[j], mask, Stream.CONTINUATION))
    return samples


def pack_samples(samples, pad_token_id: int = 0) -> dict[str, Tensor]:
    """Right-pad samples into a batch.

    Args:
        samples: TrainSample list (N of them, longest Tmax tokens).
        pad_token_id: the input id of padding positions.
    Returns:
        input_ids int64 [N, Tmax] (pad_token_id on padding), attention_mask int64 [N, Tmax]
        (1 on real tokens), loss_mask bool [N, Tmax], advantages float32 [N, Tmax],
        old_logprobs float32 [N, Tmax] (0 on padding), stream int64 [N] (STREAM_CODES),
        group_id int64 [N]. N = 0 gives [0, 0] / [0] tensors.
    """
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int):
        raise TypeError(f"pad_token_id must be an int, got {pad_token_id!r}")
    samples = list(samples)
    for i, s in enumerate(samples):
        if not isinstance(s, TrainSample):
            raise TypeError(f"samples[{i}] must be a TrainSample, got {type(s).__name__}")
        T = len(s.rollout)
        if s.advantages.shape != (T,) or s.loss_mask.shape != (T,):
            raise ValueError(f"samples[{i}] advantages and loss_mask must have shape ({T},) like its tokens, "
                             f"got {tuple(s.advantages.shape)} and {tuple(s.loss_mask.shape)}")

    def pad(seqs, value, dtype):
        if not seqs:
            return torch.zeros((0, 0), dtype=dtype)
        return torch.nn.utils.rnn.pad_sequence([x.to(dtype) for x in seqs], batch_first=True,
                                               padding_value=value)

    return {
        "input_ids": pad([s.rollout.token_ids for s in samples], pad_token_id, torch.int64),
        "attention_mask": pad([torch.ones(len(s.rollout), dtype=torch.int64) for s in samples], 0, torch.int64),
        "loss_mask": pad([s.loss_mask for s in samples], False, torch.bool),
        "advantages": pad([s.advantages for s in samples], 0.0, torch.float32),
        "old_logprobs": pad([s.old_logprobs for s in samples], 0.0, torch.float32),
        "stream": torch.tensor([STREAM_CODES[Stream(s.stream)] for s in samples], dtype=torch.int64),
        "group_id": torch.tensor([s.rollout.group_id for s in samples], dtype=torch.int64),
    }
