"""Qwen-VL image preprocessing without torchvision: resize to a multiple of patch*merge within a
pixel budget, normalize, cut into flattened patches.

Produces exactly what transformers' Qwen2VL image processor produces (the PIL backend; tested in
tests/models/test_vision.py): `pixel_values` [grid_t*grid_h*grid_w, C*temporal_patch*patch*patch]
and `image_grid_thw` [3]. The Qwen3-VL *processor* needs torchvision for its video part, so axpo
preprocesses images itself and expands `<|image_pad|>` itself (axpo.rollout.chat).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

__all__ = ["ImagePreprocessor", "smart_resize"]


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen-VL's resize rule: both sides multiples of `factor`, area within [min_pixels, max_pixels],
    aspect ratio kept as closely as possible."""
    if height < 1 or width < 1:
        raise ValueError(f"image must be at least 1x1, got {width}x{height}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image aspect ratio must be <= 200, got {width}x{height}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass
class ImagePreprocessor:
    """Image -> (pixel_values, grid_thw) for a Qwen2/2.5/3-VL vision tower.

    patch_size, merge_size, temporal_patch_size: the vision config's (Qwen3-VL: 16, 2, 2).
    min_pixels, max_pixels: the resize budget (area after resizing).
    image_mean, image_std: per-channel normalization (Qwen3-VL: 0.5, 0.5; Qwen2-VL: CLIP's).
    """
    patch_size: int = 16
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @classmethod
    def from_pretrained(cls, path: str, vision_config=None) -> "ImagePreprocessor":
        """From a model directory's preprocessor_config.json (if any) and its vision config."""
        kw = {}
        if vision_config is not None:
            kw = dict(patch_size=vision_config.patch_size, merge_size=vision_config.spatial_merge_size,
                      temporal_patch_size=vision_config.temporal_patch_size)
        cfg_path = os.path.join(path, "preprocessor_config.json")
        if os.path.isfile(cfg_path):
            with open(cfg_path) as f:
                cfg = json.load(f)
            for key in ("patch_size", "merge_size", "temporal_patch_size", "min_pixels", "max_pixels"):
                if cfg.get(key) is not None:
                    kw[key] = int(cfg[key])
            size = cfg.get("size") or {}
            if "shortest_edge" in size:
                kw["min_pixels"] = int(size["shortest_edge"])
            if "longest_edge" in size:
                kw["max_pixels"] = int(size["longest_edge"])
            for key in ("image_mean", "image_std"):
                if cfg.get(key) is not None:
                    kw[key] = tuple(float(v) for v in cfg[key])
        return cls(**kw)

    def save_pretrained(self, path: str) -> None:
        with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
            json.dump({"patch_size": self.patch_size, "merge_size": self.merge_size,
                       "temporal_patch_size": self.temporal_patch_size, "min_pixels": self.min_pixels,
                       "max_pixels": self.max_pixels, "image_mean": list(self.image_mean),
                       "image_std": list(self.image_std)}, f, indent=2)

    def resized_size(self, image: Image.Image) -> tuple[int, int]:
        """(height, width) after resizing."""
        return smart_resize(image.height, image.width, self.patch_size * self.merge_size,
                            self.min_pixels, self.max_pixels)

    def num_image_tokens(self, image: Image.Image) -> int:
        """How many `<|image_pad|>` tokens the image becomes in the language model."""
        h, w = self.resized_size(image)
        return (h // self.patch_size) * (w // self.patch_size) // (self.merge_size ** 2)

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        """-> pixel_values float32 [grid_t*grid_h*grid_w, 3*temporal*patch*patch], grid_thw int64 [3]."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
        h, w = self.resized_size(image)
        img = image.convert("RGB")
        if (img.height, img.width) != (h, w):
            img = img.resize((w, h), resample=Image.Resampling.BICUBIC)
        x = np.asarray(img, dtype=np.float32) / 255.0                       # [H, W, C]
        x = (x - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        x = x.transpose(2, 0, 1)[None]                                       # [1, C, H, W]
        tp, p, m = self.temporal_patch_size, self.patch_size, self.merge_size
        x = np.repeat(x, tp, axis=0)                                         # one frame, repeated
        c = x.shape[1]
        gt, gh, gw = 1, h // p, w // p
        x = x.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
        x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        flat = x.reshape(gt * gh * gw, c * tp * p * p)
        return torch.from_numpy(np.ascontiguousarray(flat)), torch.tensor([gt, gh, gw], dtype=torch.int64)
