"""Rollouts: the multi-turn tool agent loop and the engines that sample for it."""
from .chat import ChatFormat
from .engine import Prompt, RolloutEngine, SamplingSettings, TurnOutput, TurnRequest
from .reward import exact_match, extract_answer
from .transformers_engine import TransformersEngine
from .vllm_engine import VllmEngine  # imports vllm only when constructed

__all__ = ["ChatFormat", "Prompt", "RolloutEngine", "SamplingSettings", "TransformersEngine", "TurnOutput",
           "TurnRequest", "VllmEngine", "exact_match", "extract_answer"]
