"""The AXPO algorithm, pure: scored rollout records in, selection plans / advantages / masks out.

Methods (grpo, drgrpo, axpo and its ablations) are registered entries (axpo.algo.methods:
`Method`, `register_method`, `get_method`, `method_names`); AxpoConfig.algorithm names one.

One step (see docs in each module):
    plan = plan_resample(rollouts, num_questions, group_size, cfg)       # steps 1-4
    # the engine generates cfg.k continuations from each plan.selected prefix, then scores them
    samples = assemble_advantages(rollouts, continuations, cfg)         # step 6
    batch = pack_samples(samples, pad_token_id)
    log(step_diagnostics(rollouts, plan, continuations, extra))
No engine, no tokenizer, no I/O: tensors and plain records only.
"""
from .advantages import STREAM_CODES, TrainSample, assemble_advantages, pack_samples
from .config import AxpoConfig
from .diagnostics import step_diagnostics
from .methods import Method, get_method, method_names, register_method
from ..records import Rollout, Stream, ToolCallRecord, Turn
from .selection import (
    PrefixCandidate,
    ResamplePlan,
    candidate_prefixes,
    entropy_from_logits,
    plan_resample,
    prefix_budget,
    select_prefixes,
    span_confidence,
    span_mean_entropy,
    triggered_groups,
)

__all__ = [
    "STREAM_CODES",
    "AxpoConfig",
    "Method",
    "PrefixCandidate",
    "ResamplePlan",
    "Rollout",
    "Stream",
    "ToolCallRecord",
    "TrainSample",
    "Turn",
    "assemble_advantages",
    "candidate_prefixes",
    "entropy_from_logits",
    "get_method",
    "method_names",
    "pack_samples",
    "plan_resample",
    "prefix_budget",
    "register_method",
    "select_prefixes",
    "span_confidence",
    "span_mean_entropy",
    "step_diagnostics",
    "triggered_groups",
]
