"""The transformers sampler (the embedded default engine): batched sampling with a KV cache for
Qwen3-VL and Qwen3 models, and resampling from forked prefix caches. `TransformersEngine` is the
agent loop over it.

One model turn of a batch: left-padded prefill (images preprocessed by axpo, `mm_token_type_ids`
and Qwen3-VL's 3-D rope positions computed from the token layout), then a decode loop with
explicit positions. The first turn of every original rollout keeps its KV ("retained"); a
resample of prefix n of that rollout copies the first n - 1 cached tokens into new rows with
`axpo.ops.fork_cache` and feeds only the prefix's last token, instead of prefilling n tokens.
`stats["prefill_tokens_saved"]` (and `resample_prefill_tokens_saved` of `resample_prompt_tokens`)
count what that saved.

Retained KV stays in memory until `release()` (or the next `generate`): one DynamicCache per
sampled batch. That is what a trainer on one device wants between rollout and resample; at
scale, use the vLLM engine, whose prefix cache does the same job.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..models.inputs import batch_inputs
from ..ops import fork_cache, token_logprob_entropy
from .agent_loop import AgentLoop
from .chat import ChatFormat
from .sampler import Sampler, SamplingSettings, TurnOutput, TurnRequest, TurnStop, Weights, checked_weights, turn_budget

__all__ = ["TransformersSampler", "TransformersEngine"]


@dataclass
class _Batch:
    """KV and layout of one sampled batch. Column c of row b holds the token fed at that column;
    row b's conversation token j sits at column first_col[b] + j (left padding before)."""
    cache: object
    mask: Tensor          # int64 [B, T]: 1 real token, 0 padding / finished rows
    positions: Tensor     # int64 [P, B, T]: rope positions (P = 3 for Qwen3-VL's mrope, 1 for text)
    first_col: list[int]  # [B]
    fed: list[list[int]]  # [B] tokens fed so far per row (the conversation, then sampled tokens)


def _filter_logits(scaled: Tensor, top_k: int, top_p: float) -> Tensor:
    if top_k > 0 and top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        scaled = torch.full_like(scaled, float("-inf")).scatter(-1, order, sorted_logits)
    return scaled


class TransformersSampler(Sampler):
    """Model turns sampled with a transformers model.

    policy: an axpo.models.Policy (model, tokenizer, image preprocessor), e.g. from
        axpo.models.load_policy(path_or_hub_name) or policy_from_model(*build_tiny_policy()).
    chat: a ChatFormat (default: ChatFormat.for_tokenizer(policy's tokenizer and preprocessor)).
    max_batch_size: rows per forward.
    logits_processor: optional fn(rows, logits) -> logits applied before sampling, where rows[b]
        is row b's tokens so far (conversation + this turn); e.g. constrained decoding. The
        recorded log-probs are those of the processed logits (what was sampled from).
    """

    def __init__(self, policy, *, chat: ChatFormat | None = None, max_batch_size: int = 64,
                 logits_processor=None):
        super().__init__(chat or ChatFormat.for_tokenizer(policy.tokenizer, policy.image_processor))
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an int >= 1, got {max_batch_size!r}")
        self.policy = policy
        self.model = policy.model
        self.max_batch_size = max_batch_size
        self.logits_processor = logits_processor
        self.is_vision = getattr(self.model.config, "vision_config", None) is not None
        if self.is_vision and policy.image_processor is None:
            raise ValueError("policy.image_processor is required for a vision-language model")
        self._retained: dict[int, tuple[_Batch, int]] = {}
        self._banned = torch.tensor(sorted(self.chat.vision_placeholder_ids), dtype=torch.int64)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- weights and retained KV ------------------------------------------------------------------
    def load_weights(self, weights: Weights) -> None:
        own = self.model.state_dict()
        items = checked_weights(weights, {name: tuple(t.shape) for name, t in own.items()})
        with torch.no_grad():
            for name, value in items:
                own[name].copy_(value)
        self.release()  # KV computed with the old weights must not be forked

    def release(self) -> None:
        self._retained.clear()

    # -- one model turn -------------------------------------------------------------------------
    def _fork_source(self, req: TurnRequest) -> tuple[_Batch, int] | None:
        """The retained batch row whose cached tokens cover req's fork prefix, if usable."""
        if req.fork_from is None or req.fork_from[0] not in self._retained:
            return None
        n = req.fork_from[1]
        batch, row = self._retained[req.fork_from[0]]
        # token n-1 is fed anew (its logits start the continuation); tokens [0, n-1) come from the cache
        if len(req.token_ids) != n or n < 2 or len(batch.fed[row]) < n or batch.fed[row][:n] != req.token_ids:
            return None
        return batch, row

    @torch.no_grad()
    def sample_turns(self, requests: Sequence[TurnRequest], sampling: SamplingSettings,
                     generator: torch.Generator | None) -> list[TurnOutput]:
        outputs: list[TurnOutput | None] = [None] * len(requests)
        if generator is not None and generator.device != self.device:
            # sample on the model's device, from a generator seeded by the caller's
            seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
            generator = torch.Generator(self.device).manual_seed(seed)
        fresh, forked = [], {}
        for i, req in enumerate(requests):
            src = self._fork_source(req)
            if req.fork_from is not None:
                self.stats["resample_prompt_tokens"] += len(req.token_ids)
            if src is None:
                if req.fork_from is not None:
                    self.stats["fork_fallbacks"] += 1
                fresh.append(i)
            else:
                forked.setdefault(id(src[0]), []).append(i)
        chunks = [fresh[s:s + self.max_batch_size] for s in range(0, len(fresh), self.max_batch_size)]
        chunks += [g[s:s + self.max_batch_size] for g in forked.values() for s in range(0, len(g), self.max_batch_size)]
        for chunk in chunks:
            reqs = [requests[i] for i in chunk]
            batch, logits = self._prefill(reqs)
            for i, out in zip(chunk, self._decode(batch, logits, reqs, sampling, generator)):
                outputs[i] = out
            for row, req in enumerate(reqs):
                if req.retain:
                    self._retained[req.key] = (batch, row)
        return outputs

    @torch.no_grad()
    def first_token_logits(self, requests: Sequence[TurnRequest]) -> Tensor:
        """float32 [len(requests), V]: the logits of the next token after each request's tokens,
        computed as sample_turns would (forked from retained KV where possible)."""
        return self._prefill(list(requests))[1]

    def _prefill(self, reqs: list[TurnRequest]) -> tuple[_Batch, Tensor]:
        srcs = [self._fork_source(r) for r in reqs]
        if all(s is not None for s in srcs) and len({id(s[0]) for s in srcs}) == 1:
            return self._prefill_forked(reqs, srcs)
        return self._prefill_fresh(reqs)

    def _forward(self, input_ids, mask, positions, cache, **vision) -> Tensor:
        pos = positions if self.is_vision else positions[0]
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                         use_cache=True, logits_to_keep=1, **vision)
        return out.logits[:, -1, :].float()

    def _prefill_fresh(self, reqs: list[TurnRequest]) -> tuple[_Batch, Tensor]:
        from transformers import DynamicCache

        inputs = batch_inputs(self.policy, [r.token_ids for r in reqs], [r.images for r in reqs],
                              pad_id=self.chat.pad_id, left_pad=True, device=self.device)
        ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
        if self.is_vision:
            positions, _ = self.model.model.get_rope_index(ids, inputs["mm_token_type_ids"],
                                                          inputs.get("image_grid_thw"), attention_mask=mask)
        else:
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[None]
        positions = positions * mask[None]
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(ids, mask, positions, cache, **inputs)
        lengths = [len(r.token_ids) for r in reqs]
        self.stats["prefill_tokens"] += sum(lengths)
        t = ids.shape[1]
        return _Batch(cache, mask, positions, [t - n for n in lengths], [list(r.token_ids) for r in reqs]), logits

    def _prefill_forked(self, reqs: list[TurnRequest], srcs: list[tuple[_Batch, int]]) -> tuple[_Batch, Tensor]:
        src = srcs[0][0]
        rows = [row for _, row in srcs]
        n = [r.fork_from[1] for r in reqs]
        start = [src.first_col[row] for row in rows]
        forked = fork_cache(src.cache, torch.tensor(rows), torch.tensor(start), torch.tensor([k - 1 for k in n]),
                            src_attention_mask=src.mask)
        out_len = forked.attention_mask.shape[1]
        last_col = torch.tensor([s + k - 1 for s, k in zip(start, n)])
        # positions of the forked tokens (left padded like the KV rows) and of the fed last token
        cols = torch.arange(out_len)[None, :] - (out_len - torch.tensor(n)[:, None] + 1) + torch.tensor(start)[:, None]
        cols = cols.clamp(min=0).to(src.positions.device)
        row_idx = torch.tensor(rows, device=src.positions.device)
        past_pos = src.positions[:, row_idx[:, None], cols] * forked.attention_mask[None]
        new_pos = src.positions[:, row_idx, last_col.to(src.positions.device)][..., None]
        ids = torch.tensor([[r.token_ids[-1]] for r in reqs], dtype=torch.int64, device=self.device)
        mask = torch.cat([forked.attention_mask, torch.ones_like(ids)], dim=1)
        logits = self._forward(ids, mask, new_pos, forked.cache)
        self.stats["prefill_tokens"] += len(reqs)
        self.stats["prefill_tokens_saved"] += sum(k - 1 for k in n)
        self.stats["resample_prefill_tokens_saved"] += sum(k - 1 for k in n)
        positions = torch.cat([past_pos, new_pos], dim=2)
        batch = _Batch(forked.cache, mask, positions, [out_len - (k - 1) for k in n], [list(r.token_ids) for r in reqs])
        return batch, logits

    def _sample(self, logits: Tensor, sampling: SamplingSettings, generator) -> tuple[Tensor, Tensor, Tensor]:
        """-> sampled tokens, and their log-probs and the entropies of softmax(logits / temperature):
        the policy's own distribution, as the trainer recomputes it (the placeholder ban and
        top-k / top-p only shape what is drawn)."""
        scaled = logits if sampling.temperature == 0 else logits / sampling.temperature
        allowed = scaled.index_fill(-1, self._banned.to(logits.device), float("-inf")) if self._banned.numel() else scaled
        if sampling.temperature == 0:
            tokens = allowed.argmax(-1)
        else:
            probs = torch.softmax(_filter_logits(allowed, sampling.top_k, sampling.top_p), dim=-1)
            tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        logprobs, entropy = token_logprob_entropy(scaled, tokens)
        return tokens, logprobs, entropy

    def _decode(self, batch: _Batch, logits: Tensor, reqs: list[TurnRequest], sampling: SamplingSettings,
                generator) -> list[TurnOutput]:
        chat, device = self.chat, self.device
        bsz = len(reqs)
        budget = [turn_budget(r, sampling) for r in reqs]
        stops = [TurnStop(chat, r) for r in reqs]
        gen = [stop.tokens for stop in stops]
        lps = [[] for _ in reqs]
        ents = [[] for _ in reqs]
        finish = ["length" if budget[b] <= 0 else None for b in range(bsz)]
        next_pos = batch.positions.amax(dim=(0, 2)) + 1  # [B]
        # mask and positions grow by one column per step: written into buffers sized for the turn
        t = batch.mask.shape[1]
        mask = batch.mask.new_zeros((bsz, t + max(budget + [0])))
        positions = batch.positions.new_zeros((batch.positions.shape[0], bsz, mask.shape[1]))
        mask[:, :t], positions[:, :, :t] = batch.mask, batch.positions
        while any(f is None for f in finish):
            if self.logits_processor is not None:
                logits = self.logits_processor([list(r.token_ids) + g for r, g in zip(reqs, gen)], logits)
            tokens, logprobs, entropy = self._sample(logits, sampling, generator)
            # one device-to-host copy per step (the stop checks need the tokens on the host)
            host = torch.stack([tokens.double(), logprobs.double(), entropy.double()]).tolist()
            for b in range(bsz):
                if finish[b] is not None:
                    continue
                tok = int(host[0][b])
                lps[b].append(host[1][b])
                ents[b].append(host[2][b])
                self.stats["generated_tokens"] += 1
                finish[b] = stops[b].push(tok)
                if finish[b] is None and len(gen[b]) >= budget[b]:
                    finish[b] = "length"
                if finish[b] is None:
                    batch.fed[b].append(tok)
            if all(f is not None for f in finish):
                break
            # feed the sampled tokens of the rows still running (finished rows: masked padding)
            running = torch.tensor([f is None for f in finish], device=device)
            feed = torch.where(running, tokens, torch.full_like(tokens, chat.pad_id))
            pos = next_pos[None, :, None].expand(positions.shape[0], bsz, 1)
            mask[:, t] = running
            positions[:, :, t] = pos[..., 0] * running
            t += 1
            logits = self._forward(feed[:, None], mask[:, :t], pos, batch.cache)
            next_pos = next_pos + running.to(next_pos.dtype)
        batch.mask, batch.positions = mask[:, :t], positions[:, :, :t]
        return [TurnOutput(gen[b], lps[b], ents[b], finish[b]) for b in range(bsz)]


class TransformersEngine(AgentLoop):
    """The agent loop over a TransformersSampler: TransformersEngine(policy, tools=, reward_fn=, answer_fn=,
    chat=..., max_batch_size=..., logits_processor=...)."""

    def __init__(self, policy, *, tools=None, reward_fn=None, answer_fn=None, **sampler_options):
        super().__init__(TransformersSampler(policy, **sampler_options), tools=tools, reward_fn=reward_fn,
                         answer_fn=answer_fn)
