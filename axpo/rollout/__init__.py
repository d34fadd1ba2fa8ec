"""Rollouts: the multi-turn tool agent loop and the engines that sample for it."""
from .chat import ChatFormat
from .engine import Prompt, RolloutEngine, SamplingSettings, TurnOutput, TurnRequest
from .reward import exact_match, extract_answer
from .transformers_engine import TransformersEngine

__all__ = ["ChatFormat", "Prompt", "RolloutEngine", "SamplingSettings", "TransformersEngine", "TurnOutput",
           "TurnRequest", "exact_match", "extract_answer"]
