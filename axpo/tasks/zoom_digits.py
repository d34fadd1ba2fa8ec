"""ZoomDigits: a synthetic task that shows the Thinking-Acting Gap in miniature.

The image is a grid (default 3x3) of small cells, each holding one digit glyph (a 5x7 bitmap font
defined here, 1-pixel strokes, a faint cell outline, light noise). The policy sees the image at a
small pixel budget (`view_max_pixels`, default 48x48 for the 144x144 image): a cell is 4 pixels
there and its glyph a 2x2 blur, mostly illegible. The `zoom` tool's crop of the asked cell,
resized to the same budget, shows the glyph 12 times larger (about 20x28 pixels), where it is
legible. So guessing from the full view is possible but clearly worse, and one correct tool call
makes the answer derivable. (Measured with a nearest-template reader on 200 test cells: about 40%
from the full view, 100% from the zoom; tests/tasks/test_zoom_digits.py.)

Question: "Digit at row R, col C?" (1-based); answer: the digit, as a string. Every example is a
function of (seed, split, index) only.
"""
from __future__ import annotations

import random

import numpy as np
from PIL import Image

from ..rollout.engine import Prompt
from .base import SftTrace, Task, _check_int

__all__ = ["ZoomDigitsTask", "DIGIT_FONT", "render_glyph"]

# 5x7 bitmap glyphs, one string of 7 rows of 5 columns per digit ("#" = ink).
DIGIT_FONT = {
    "0": (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    "1": ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "3": ("#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."),
    "4": ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "6": ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    "7": ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    "8": (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
}
_FONT_W, _FONT_H = 5, 7


def render_glyph(digit: str, scale: int, stroke: int) -> np.ndarray:
    """bool [7*scale, 5*scale]: the digit's bitmap, each font pixel a scale x scale block of
    which the top-left stroke x stroke part is inked (thin strokes when stroke < scale)."""
    rows = DIGIT_FONT[digit]
    out = np.zeros((_FONT_H * scale, _FONT_W * scale), bool)
    for y, row in enumerate(rows):
        for x, ch in enumerate(row):
            if ch == "#":
                out[y * scale:y * scale + stroke, x * scale:x * scale + stroke] = True
    # join horizontal / vertical neighbours so strokes stay connected when stroke < scale
    for y, row in enumerate(rows):
        for x, ch in enumerate(row):
            if ch != "#":
                continue
            if x + 1 < _FONT_W and row[x + 1] == "#":
                out[y * scale:y * scale + stroke, x * scale:(x + 1) * scale + stroke] = True
            if y + 1 < _FONT_H and rows[y + 1][x] == "#":
                out[y * scale:(y + 1) * scale + stroke, x * scale:x * scale + stroke] = True
    return out


class ZoomDigitsTask(Task):
    """Grid-of-digits images; asks for the digit of one cell. Splits "train" and "test" are
    disjoint generated streams (unbounded: size None).

    seed: selects the streams. grid: cells per side (default 3, at most 9).
    pitch: pixels between cell centers (default 48; the image is grid * pitch square).
    cell_size: side of a cell's box, centered in its pitch x pitch square (default 12): the box
        info["bbox"] gives and the tool trace zooms into. The zoom's magnification over the full
        view grows with pitch / cell_size.
    glyph_scale: pixels per font pixel (default 1: a 5x7 glyph). stroke: inked pixels per font
        pixel (default glyph_scale: solid; smaller = thinner strokes).
    jitter: the glyph's random offset from its cell's center, in pixels, per axis (default 1, and
        at most what keeps it inside the outline). Sub-pixel in the full view, it changes how the
        glyph's few pixels blur there, which is what makes the full view unreliable.
    noise: amplitude of uniform pixel noise, in 0-255 levels (default 24, at most 100).
    view_max_pixels: the budget the policy should see images at (default 48*48; None: its own).
    """

    name = "zoom_digits"
    splits = ("train", "test")

    def __init__(self, *, seed: int = 0, grid: int = 3, pitch: int = 48, cell_size: int = 12,
                 glyph_scale: int = 1, stroke: int | None = None, jitter: int = 1, noise: int = 24,
                 view_max_pixels: int | None = 48 * 48):
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        self.grid = _check_int(grid, "grid", 1)
        if grid > 9:
            raise ValueError(f"grid must be an int in [1, 9] (one-digit row/col numbers), got {grid!r}")
        self.pitch = _check_int(pitch, "pitch", 4)
        self.cell_size = _check_int(cell_size, "cell_size", 4)
        if cell_size > pitch:
            raise ValueError(f"cell_size must be <= pitch ({pitch}), got {cell_size!r}")
        self.glyph_scale = _check_int(glyph_scale, "glyph_scale", 1)
        stroke = self.glyph_scale if stroke is None else stroke
        self.stroke = _check_int(stroke, "stroke", 1)
        if stroke > glyph_scale:
            raise ValueError(f"stroke must be <= glyph_scale ({glyph_scale}), got {stroke!r}")
        gw, gh = _FONT_W * glyph_scale, _FONT_H * glyph_scale
        if gh + 2 > cell_size:
            raise ValueError(f"a {gw}x{gh} glyph (glyph_scale={glyph_scale}) must fit in a cell of cell_size="
                             f"{cell_size} with a 1-pixel margin: lower glyph_scale or raise cell_size")
        self.jitter = _check_int(jitter, "jitter", 0)
        self.noise = _check_int(noise, "noise", 0)
        if noise > 100:
            raise ValueError(f"noise must be an int in [0, 100], got {noise!r}")
        if view_max_pixels is not None:
            _check_int(view_max_pixels, "view_max_pixels", 1)
        self.view_max_pixels = view_max_pixels
        self._glyphs = {d: render_glyph(d, glyph_scale, self.stroke) for d in DIGIT_FONT}
        # the glyph's offset range in its cell, per axis: up to jitter, as far as it stays inside
        self._jitter_xy = (min(jitter, (cell_size - 2 - gw) // 2), min(jitter, (cell_size - 2 - gh) // 2))

    @property
    def image_size(self) -> int:
        """Pixels per image side."""
        return self.grid * self.pitch

    def cell_bbox(self, row: int, col: int) -> list[int]:
        """[x1, y1, x2, y2]: the pixel box of cell (row, col) (0-based) in the image: cell_size
        square, centered in its pitch x pitch square of the grid."""
        p, c = self.pitch, self.cell_size
        x, y = col * p + (p - c) // 2, row * p + (p - c) // 2
        return [x, y, x + c, y + c]

    def render(self, digits: list[list[str]], rng: random.Random | None) -> Image.Image:
        """The grid image for digits[row][col]: light background, a faint outline around each
        cell, each glyph dark at a random offset from its cell's center, uniform noise. rng draws
        the shades, the offsets and the noise (the same rng state, the same image); None gives the
        canonical rendering (middle shades, centered glyphs, no noise), e.g. for templates."""
        if len(digits) != self.grid or any(len(r) != self.grid or any(d not in DIGIT_FONT for d in r) for r in digits):
            raise ValueError(f"digits must be {self.grid} rows of {self.grid} digit characters, got {digits!r}")
        size = self.image_size
        background = 220 if rng is None else rng.randint(200, 240)
        canvas = np.full((size, size), float(background), np.float32)
        line = float(background - (35 if rng is None else rng.randint(20, 50)))
        gh, gw = self._glyphs["0"].shape
        jx, jy = self._jitter_xy
        for r in range(self.grid):
            for col in range(self.grid):
                x1, y1, x2, y2 = self.cell_bbox(r, col)
                canvas[y1, x1:x2] = canvas[y2 - 1, x1:x2] = line  # the cell's faint outline
                canvas[y1:y2, x1] = canvas[y1:y2, x2 - 1] = line
                y = y1 + (self.cell_size - gh) // 2 + (0 if rng is None else rng.randint(-jy, jy))
                x = x1 + (self.cell_size - gw) // 2 + (0 if rng is None else rng.randint(-jx, jx))
                ink = 45 if rng is None else rng.randint(10, 80)
                canvas[y:y + gh, x:x + gw][self._glyphs[digits[r][col]]] = float(ink)
        if rng is not None and self.noise:
            gen = np.random.default_rng(rng.getrandbits(64))
            canvas += gen.uniform(-self.noise, self.noise, canvas.shape).astype(np.float32)
        gray = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), "RGB")

    def example(self, split: str, index: int) -> Prompt:
        """Example `index` of `split`: a function of (seed, split, index) only."""
        self.check_split(split)
        _check_int(index, "index", 0)
        rng = random.Random(f"zoom_digits:{self.seed}:{split}:{index}")
        digits = [[str(rng.randrange(10)) for _ in range(self.grid)] for _ in range(self.grid)]
        row, col = rng.randrange(self.grid), rng.randrange(self.grid)
        image = self.render(digits, rng)
        info = {"row": row, "col": col, "bbox": self.cell_bbox(row, col),
                "digits": ["".join(r) for r in digits], "split": split, "index": index}
        return Prompt(f"Digit at row {row + 1}, col {col + 1}?", [image], answer=digits[row][col], info=info)

    def prompts(self, split: str, start: int, count: int, *, wrap: bool = False) -> list[Prompt]:
        return [self.example(split, i) for i in self.indices(split, start, count, wrap)]

    def sft_trace(self, prompt: Prompt, use_tool: bool, rng: random.Random) -> SftTrace | None:
        """use_tool: think "r{R}c{C}", zoom into the asked cell's box, answer the digit. Otherwise
        the same thought and the digit directly (as a teacher seeing full resolution writes)."""
        info = prompt.info
        if not all(k in info for k in ("row", "col", "bbox")):
            raise ValueError("prompt.info must hold row, col and bbox (a ZoomDigitsTask prompt)")
        think = f"r{info['row'] + 1}c{info['col'] + 1}"
        call = {"name": "zoom", "arguments": {"bbox_2d": list(info["bbox"])}} if use_tool else None
        return SftTrace(think=think, tool_call=call, answer=str(prompt.answer))
