"""The image zoom-in tool: crop a box of one of the conversation's images and enlarge it.

Call: {"name": "zoom", "arguments": {"bbox_2d": [x1, y1, x2, y2], "image_index": 0}}
  bbox_2d: the box in pixel coordinates of the referenced image (x to the right, y down,
      x1 < x2 and y1 < y2; ints or floats), or, with coordinates="relative", in thousandths of its
      width and height (0..1000: Qwen3-VL's grounding convention). It is clipped to the image; the
      crop covers every pixel the box touches (floor of x1/y1, ceiling of x2/y2).
  image_index: which image (default 0, the question's image). Negative values count from the
      latest image as in Python (-1 = the most recent one, e.g. the previous zoom's result).
Result: the crop as an RGB image, resized with bicubic resampling so that its longer side is
  `scale` times the crop's, kept within [min_side, max_side] and max_pixels; the text says which
  box of which image was zoomed and that the result is image len(context.images) (the agent loop
  appends it to the conversation's images).
"""
from __future__ import annotations

import math

from PIL import Image

from .registry import Tool, ToolContext, ToolResult

__all__ = ["ZoomTool", "zoom_tool", "ZOOM_SCHEMA"]

ZOOM_SCHEMA = {
    "type": "object",
    "properties": {
        "bbox_2d": {
            "type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4,
            "description": "The region [x1, y1, x2, y2] to zoom into, in pixel coordinates of the "
                           "image (x to the right, y down; x1 < x2, y1 < y2).",
        },
        "image_index": {
            "type": "integer",
            "description": "Which image to zoom into: 0 is the question's image (default); "
                           "negative values count from the latest image (-1 = the most recent).",
        },
    },
    "required": ["bbox_2d"],
    "additionalProperties": False,
}


COORDINATES = ("pixel", "relative")  # relative: 0..1000 of the width / height


def _schema(coordinates: str) -> dict:
    if coordinates == "pixel":
        return ZOOM_SCHEMA
    schema = {**ZOOM_SCHEMA, "properties": dict(ZOOM_SCHEMA["properties"])}
    schema["properties"]["bbox_2d"] = {
        **ZOOM_SCHEMA["properties"]["bbox_2d"],
        "description": "The region [x1, y1, x2, y2] to zoom into, in thousandths of the image's width and "
                       "height (0..1000; x to the right, y down; x1 < x2, y1 < y2)."}
    return schema


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class ZoomTool:
    """Crop-and-enlarge, sized for small images (e.g. 64x64 digit glyphs).

    scale: the result's longer side is `scale` times the crop's longer side (default 2.0)...
    min_side: ...but at least this many pixels (default 64: a 16x16 crop of a 64x64 image becomes 64x64)...
    max_side: ...and at most this many (default 512).
    max_pixels: the result's width * height is at most this (default 512 * 512); the aspect ratio
        is kept, so a very thin box gives a thin result.
    coordinates: "pixel" (default: bbox_2d in the image's pixels) or "relative" (in 0..1000 of
        its width and height, as Qwen3-VL writes boxes).
    """

    name = "zoom"

    def __init__(self, *, scale: float = 2.0, min_side: int = 64, max_side: int = 512,
                 max_pixels: int = 512 * 512, coordinates: str = "pixel"):
        if coordinates not in COORDINATES:
            raise ValueError(f"coordinates must be one of {list(COORDINATES)}, got {coordinates!r}")
        self.coordinates = coordinates
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (0 < scale < math.inf):
            raise ValueError(f"scale must be a positive finite number, got {scale!r}")
        self.scale = float(scale)
        self.min_side = _positive_int(min_side, "min_side")
        self.max_side = _positive_int(max_side, "max_side")
        self.max_pixels = _positive_int(max_pixels, "max_pixels")
        if self.min_side > self.max_side:
            raise ValueError(f"min_side ({min_side}) must be <= max_side ({max_side})")

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """The result's (width, height) for a crop of (width, height) pixels."""
        longer = max(width, height)
        target = min(max(round(longer * self.scale), self.min_side), self.max_side)
        factor = target / longer
        if width * height * factor * factor > self.max_pixels:
            factor = math.sqrt(self.max_pixels / (width * height))
        return max(1, math.floor(width * factor)), max(1, math.floor(height * factor))

    def __call__(self, context: ToolContext, bbox_2d: list, image_index: int = 0) -> ToolResult:
        images = context.images if context is not None else []
        n = len(images)
        if n == 0:
            return ToolResult.failure("bad_arguments", "there is no image in the conversation to zoom into")
        if not -n <= image_index < n:
            valid = "0" if n == 1 else f"0..{n - 1}"
            return ToolResult.failure("bad_arguments", f"image_index {image_index} is out of range: there "
                                      f"{'is 1 image' if n == 1 else f'are {n} images'} (valid: {valid}, or "
                                      f"{-n}..-1 counting from the latest)")
        index = image_index % n
        image = images[index]
        if not isinstance(image, Image.Image):
            raise TypeError(f"context.images[{index}] is a {type(image).__name__}, not a PIL image")
        width, height = image.size
        if len(bbox_2d) != 4:  # the schema says so; checked again for direct calls
            return ToolResult.failure("bad_arguments", f"bbox_2d must have 4 numbers, got {len(bbox_2d)}")
        if not all(_finite_number(v) for v in bbox_2d):
            return ToolResult.failure("bad_arguments", f"bbox_2d must hold 4 finite numbers, got {bbox_2d!r:.80}")
        x1, y1, x2, y2 = bbox_2d
        bounds = f"image {index} is {width}x{height}: x in [0, {width}], y in [0, {height}]"
        if self.coordinates == "relative":
            sx, sy = width / 1000, height / 1000
            x1, x2, y1, y2 = x1 * sx, x2 * sx, y1 * sy, y2 * sy
            bounds = "x and y in [0, 1000] of the image's width and height"
            if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):  # 1e308 scaled by the width
                return ToolResult.failure("bad_arguments", f"bbox_2d {_fmt_box(bbox_2d)} is out of range ({bounds})")
        if not (x1 < x2 and y1 < y2):
            return ToolResult.failure("bad_arguments", f"the box {_fmt_box(bbox_2d)} is empty or inverted: "
                                      f"it needs x1 < x2 and y1 < y2 ({bounds})")
        left, top = max(0, math.floor(x1)), max(0, math.floor(y1))
        right, bottom = min(width, math.ceil(x2)), min(height, math.ceil(y2))
        if not (left < right and top < bottom):
            return ToolResult.failure("bad_arguments", f"the box {_fmt_box(bbox_2d)} lies outside the image "
                                      f"({bounds})")
        clipped = x1 < 0 or y1 < 0 or x2 > width or y2 > height
        crop = image.crop((left, top, right, bottom))
        if crop.mode != "RGB":
            crop = crop.convert("RGB")
        size = self.output_size(right - left, bottom - top)
        zoomed = crop.resize(size, Image.Resampling.BICUBIC)
        note = f" (the box was clipped to the image, {width}x{height})" if clipped else ""
        text = (f"Zoomed in on [{left}, {top}, {right}, {bottom}] of image {index}{note}; "
                f"the result is image {n} ({size[0]}x{size[1]}).")
        return ToolResult(text=text, images=[zoomed])

    def tool(self) -> Tool:
        """This zoom as a registry Tool named "zoom"."""
        units = "pixel coordinates" if self.coordinates == "pixel" else "0..1000 of the width and height"
        return Tool(self.name, self, _schema(self.coordinates), description=(
            f"Zoom in on a region of an image: crops the box bbox_2d = [x1, y1, x2, y2] ({units}) of the "
            "chosen image and returns it enlarged as a new image."))


def _finite_number(v) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int too large for a float (a model can write 400 digits)
        return False


def _fmt_box(box) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"


def zoom_tool(**options) -> Tool:
    """The zoom Tool; `options` are ZoomTool's (scale, min_side, max_side, max_pixels, coordinates)."""
    return ZoomTool(**options).tool()
