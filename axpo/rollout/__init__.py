"""Rollouts: the multi-turn tool agent loop (`AgentLoop`) over samplers of model turns
(`TransformersSampler`, `VllmSampler`); `TransformersEngine` / `VllmEngine` are the loop over each."""
from ..records import Prompt
from .agent_loop import AgentLoop, RewardFn
from .chat import ChatFormat
from .reward import exact_match, extract_answer
from .sampler import Sampler, SamplingSettings, TurnOutput, TurnRequest, TurnStop
from .transformers_sampler import TransformersEngine, TransformersSampler
from .vllm_sampler import VllmEngine, VllmSampler  # imports vllm only when constructed

__all__ = ["AgentLoop", "ChatFormat", "Prompt", "RewardFn", "Sampler", "SamplingSettings", "TransformersEngine",
           "TransformersSampler", "TurnOutput", "TurnRequest", "TurnStop", "VllmEngine", "VllmSampler",
           "exact_match", "extract_answer"]
