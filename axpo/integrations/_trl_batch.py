"""TRL's generation batch <-> axpo records, for the AXPO step inside AxpoGRPOTrainer.

TRL keeps a row as unpadded lists while it generates (prompt ids, completion ids = every model
turn and tool result after the prompt, a tool mask with 0 on tool-result tokens) and as padded
tensors afterwards (prompt left-padded, completion right-padded). These helpers turn the lists
into `axpo.records.Rollout`s (token-level layout as in axpo's own agent loop) and append rows to
the padded batch. No trainer state: tensors and lists in, tensors and records out.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..records import Rollout, Stream, ToolCallRecord, Turn

__all__ = ["first_turn_len", "find_tool_call", "to_rollout", "pad_right", "append_rows"]


def first_turn_len(tool_mask: list[int] | None, n: int) -> int:
    """Tokens of the first model turn of a completion of n tokens: up to its first tool-result
    token (tool_mask 0), or all of it."""
    if tool_mask is None:
        return n
    for t, m in enumerate(tool_mask[:n]):
        if not m:
            return t
    return n


def _find(seq: list[int], sub: list[int], start: int, stop: int) -> int:
    k = len(sub)
    for t in range(start, stop - k + 1):
        if seq[t:t + k] == sub:
            return t
    return -1


def find_tool_call(completion: list[int], turn_len: int, open_ids: list[int],
                   close_ids: list[int]) -> tuple[int, int, int] | None:
    """The first `<tool_call>` of the first turn, as completion positions (start, open_end, end):
    the opening tag starts at `start` and ends before `open_end`; the closing tag ends before
    `end` (the end of the turn when the call never closes). None when the turn has no opening tag."""
    start = _find(completion, open_ids, 0, turn_len)
    if start < 0:
        return None
    open_end = start + len(open_ids)
    close = _find(completion, close_ids, open_end, turn_len)
    end = turn_len if close < 0 else close + len(close_ids)
    return start, open_end, max(end, open_end)


def to_rollout(prompt: list[int], completion: list[int], trainable: list[bool], *, uid: int, group_id: int,
               reward: float, call: tuple[int, int, int] | None, call_name: str | None = None,
               call_arguments: dict | None = None, logprobs: Tensor | None = None, entropies: Tensor | None = None,
               stream: Stream = Stream.ORIGINAL, source_uid: int | None = None,
               prefix_len: int | None = None) -> Rollout:
    """One TRL row as a Rollout. trainable, logprobs, entropies: completion positions
    (len(completion) entries); the prompt is never trainable and has log-prob 0."""
    P, C = len(prompt), len(completion)
    if len(trainable) != C:
        raise ValueError(f"trainable must have {C} entries like the completion, got {len(trainable)}")

    def full(x):
        if x is None:
            return None
        x = torch.as_tensor(x, dtype=torch.float32).reshape(-1)[:C]
        return torch.cat([torch.zeros(P), x, torch.zeros(C - x.numel())])

    calls = []
    if call is not None:
        s, o, e = call
        calls.append(ToolCallRecord(start=P + s, end=P + e, open_end=P + o, name=call_name, arguments=call_arguments))
    return Rollout(token_ids=torch.tensor(prompt + completion, dtype=torch.int64),
                   logprobs=full(logprobs) if logprobs is not None else torch.zeros(P + C),
                   trainable=torch.tensor([False] * P + [bool(t) for t in trainable]),
                   group_id=group_id, uid=uid, turns=[Turn("prompt", 0, P), Turn("model", P, P + C)],
                   tool_calls=calls, reward=float(reward), stream=stream, source_uid=source_uid,
                   prefix_len=prefix_len, entropies=full(entropies))


def pad_right(x: Tensor, width: int, value) -> Tensor:
    """[N, T] -> [N, width] (width >= T), filled with value on the right."""
    if x.shape[1] == width:
        return x
    return torch.cat([x, x.new_full((x.shape[0], width - x.shape[1]), value)], dim=1)


def append_rows(batch: dict, new: dict, width: int, pad_token_id: int) -> dict:
    """TRL's padded batch with rows appended.

    batch: TRL's tensors ([N, P] prompt_*, [N, C] completion-aligned, [N] or [N, C] advantages).
    new: the same keys for the new rows, completion-aligned ones already padded to `width`
        (>= C); prompt_ids / prompt_mask with the batch's prompt width.
    Completion-aligned tensors of the batch are right-padded to width (ids with pad_token_id,
    masks with 0, tool_mask with 1 as TRL pads it, log-probs and advantages with 0); advantages
    become per token [N + E, width]. Keys missing from `new` are a ValueError.
    """
    out = dict(batch)
    fill = {"completion_ids": pad_token_id, "completion_mask": 0, "tool_mask": 1}
    for key, value in batch.items():
        if not isinstance(value, Tensor) or value.dim() == 0:
            continue
        if key not in new:
            raise ValueError(f"append_rows: no values for the new rows of batch[{key!r}]")
        if key.startswith("prompt_"):
            out[key] = torch.cat([value, new[key].to(value)], dim=0)
            continue
        if key == "advantages" and value.dim() == 1:
            value = value.unsqueeze(1).expand(-1, batch["completion_ids"].shape[1]).clone()
        out[key] = torch.cat([pad_right(value, width, fill.get(key, 0)), new[key].to(value)], dim=0)
    return out
