"""The task interface: where prompts (question, images, ground truth) and supervised traces come from.

A Task serves numbered examples of named splits, deterministically (the same arguments give the
same prompts, images pixel-identical), so that a trainer can resume at any step and two runs see
the same data. It may also write a supervised trace for a prompt (the warm-start SFT data of
axpo.tasks.sft): a short thought, optionally one tool call, and the answer.
"""
from __future__ import annotations

import abc
import random
from dataclasses import dataclass

from ..records import Prompt

__all__ = ["SftTrace", "Task"]


@dataclass
class SftTrace:
    """One supervised trace: `<think>{think}</think>`, then, when tool_call is not None,
    `<tool_call>{json}</tool_call>` and the tool's response, then `<answer>{answer}</answer>`.

    tool_call: {"name": ..., "arguments": {...}}, or None for a direct answer.
    """
    think: str
    tool_call: dict | None
    answer: str


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class Task(abc.ABC):
    """A source of prompts and supervised traces.

    name: a short identifier. splits: the split names (e.g. ("train", "test")).
    view_max_pixels: the image budget (resized area) the policy should see this task's images at,
        e.g. set on `policy.image_processor.max_pixels`; None: the policy's own.
    tool_names: the tools its SFT traces call (a run's registry must have them).
    """

    name: str = "task"
    splits: tuple[str, ...] = ()
    view_max_pixels: int | None = None
    tool_names: tuple[str, ...] = ()

    @abc.abstractmethod
    def prompts(self, split: str, start: int, count: int, *, wrap: bool = False) -> list[Prompt]:
        """Examples [start, start + count) of `split`, deterministic (same arguments, same prompts
        with pixel-identical images), group_id None. For a finite split, start + count past its
        size is a ValueError unless wrap=True (indices are then taken modulo the size)."""

    def size(self, split: str) -> int | None:
        """The number of examples in `split`; None when it is unbounded (generated)."""
        self.check_split(split)
        return None

    def sft_trace(self, prompt: Prompt, use_tool: bool, rng: random.Random) -> SftTrace | None:
        """A supervised trace for `prompt` (one of this task's), calling a tool when use_tool; None
        when the task cannot write that kind (e.g. a dataset without tool annotations)."""
        return None

    # -- helpers for implementations ------------------------------------------------------------
    def check_split(self, split: str) -> str:
        if split not in self.splits:
            raise ValueError(f"split must be one of {list(self.splits)}, got {split!r}")
        return split

    def indices(self, split: str, start: int, count: int, wrap: bool = False) -> list[int]:
        """Validates a `prompts` request and returns the example indices it covers."""
        self.check_split(split)
        _check_int(start, "start", 0)
        _check_int(count, "count", 0)
        n = self.size(split)
        if n is None:
            return list(range(start, start + count))
        if wrap:
            if n == 0 and count > 0:
                raise ValueError(f"split {split!r} is empty: cannot wrap around it")
            return [(start + i) % n for i in range(count)]
        if start + count > n:
            raise ValueError(f"start + count must be <= the size of split {split!r} ({n}), got "
                             f"start={start}, count={count} (pass wrap=True to wrap around)")
        return list(range(start, start + count))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, splits={self.splits!r})"
