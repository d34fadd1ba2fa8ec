"""Tasks: where prompts and supervised warm-start traces come from.

- `Task` (axpo.tasks.base): numbered, deterministic examples of named splits, and a supervised
  trace (`SftTrace`: think, optional tool call, answer) per prompt.
- `ZoomDigitsTask`: a synthetic grid-of-digits task whose answer is only legible through `zoom`.
- `LocalDatasetTask`: question / image(s) / answer rows from local Hugging Face-style data.
- `encode_trace`, `sft_batch` (axpo.tasks.sft): traces as token ids and labels, exactly as a
  rollout with the same choices would contain them.
"""
from .base import SftTrace, Task
from .local import LocalDatasetTask
from .sft import SftExample, encode_trace, sft_batch
from .zoom_digits import ZoomDigitsTask

__all__ = ["Task", "SftTrace", "ZoomDigitsTask", "LocalDatasetTask", "SftExample", "encode_trace", "sft_batch",
           "make_task", "TASKS"]

TASKS = {"zoom_digits": ZoomDigitsTask, "local": LocalDatasetTask}


def make_task(name: str, **kwargs) -> Task:
    """The task called `name` ("zoom_digits" or "local"), built with kwargs (e.g.
    make_task("local", path="data/vstar", splits=["test"]), make_task("zoom_digits", regime="gap"))."""
    if name not in TASKS:
        raise ValueError(f"name must be one of {sorted(TASKS)}, got {name!r}")
    if name == "local":
        if "path" not in kwargs:
            raise ValueError('make_task("local", ...) needs path=, the dataset\'s local path')
        return LocalDatasetTask(kwargs.pop("path"), **kwargs)
    if name == "zoom_digits" and "regime" in kwargs:
        return ZoomDigitsTask.from_regime(kwargs.pop("regime"), **kwargs)
    return TASKS[name](**kwargs)
