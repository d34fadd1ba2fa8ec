"""Batch model inputs for a list of token rows with their images: what the rollout engine's
prefill and a trainer's teacher-forced forward both need."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .loading import Policy

__all__ = ["batch_inputs"]


def batch_inputs(policy: Policy, rows: Sequence[Sequence[int]], images: Sequence[Sequence] | None = None, *,
                 pad_id: int = 0, left_pad: bool = True, device=None) -> dict[str, Tensor]:
    """Pads token rows into one batch and adds the vision inputs.

    rows: token ids per row; images: per row, the PIL images whose `<|image_pad|>` runs appear in
    that row, in order (None: no images). left_pad: True for generation (last tokens aligned),
    False for training.

    Returns input_ids and attention_mask [B, T] (int64) and, for a vision policy,
    mm_token_type_ids [B, T] (1 on image tokens) plus pixel_values and image_grid_thw when any row
    has images. Raises ValueError when a row's image tokens do not match its images.
    """
    if len(rows) == 0:
        raise ValueError("rows must not be empty")
    if images is not None and len(images) != len(rows):
        raise ValueError(f"images must have one entry per row ({len(rows)}), got {len(images)}")
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(rows), t), dtype=torch.int64)
    for b, row in enumerate(rows):
        if len(row) == 0:
            raise ValueError(f"rows[{b}] is empty")
        cols = slice(t - len(row), t) if left_pad else slice(0, len(row))
        ids[b, cols] = torch.as_tensor(list(row), dtype=torch.int64)
        mask[b, cols] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    processor = policy.image_processor
    if processor is None:
        if images is not None and any(len(x) for x in images):
            raise ValueError("images given for a text-only policy")
    else:
        image_token_id = policy.model.config.image_token_id
        pixel_values, grids = [], []
        for b, row_images in enumerate(images or [[] for _ in rows]):
            expected = 0
            for image in row_images:
                pv, grid = processor(image)
                pixel_values.append(pv)
                grids.append(grid)
                expected += int(grid.prod()) // processor.merge_size ** 2
            found = int((ids[b] == image_token_id).sum())
            if found != expected:
                raise ValueError(f"rows[{b}] has {found} <|image_pad|> tokens but its {len(row_images)} "
                                 f"image(s) need {expected}")
        out["mm_token_type_ids"] = ((ids == image_token_id) & mask.bool()).to(torch.int64)
        if pixel_values:
            out["pixel_values"] = torch.cat(pixel_values)
            out["image_grid_thw"] = torch.stack(grids)
    if device is not None:
        out = {k: v.to(device) for k, v in out.items()}
    if "pixel_values" in out:
        out["pixel_values"] = out["pixel_values"].to(next(policy.model.parameters()).dtype)
    return out
