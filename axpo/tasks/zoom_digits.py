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

Regimes (`REGIMES`, `ZoomDigitsTask.from_regime`; `task.regime` in `axpo train`):

- "gap" (the default of `axpo train`): the Thinking-Acting Gap of the paper. Two changes make
  thinking the safer default and the tool call the risky act:
  * the question names three candidate digits ("Digit at row 2, col 3? One of 1, 4, 8."), so an
    answer without the tool, reasoned from the text, is right about one time in three, and the
    right-or-wrong of the no-tool rollouts is spread evenly over the questions;
  * the warm-start traces come from a weak teacher that zooms into the asked cell with
    probability 0.5 at the top-left cell down to 0.1 at the bottom-right one (linear in
    row + col: it loses count of rows and columns the farther it goes) and otherwise into a
    neighbouring cell, answering what its zoom shows. The policy inherits the teacher's
    unreliable boxes, and its tool-using rollouts of the far cells are nearly always wrong, on
    the same questions.
  The variance is in the ACT: the zoom of the right box is as legible as ever (the images are
  those of "tool_safe", so its legibility test holds), so a correct call gives the answer, and
  resampling a failed call's arguments from its fixed thinking prefix with K = 4 draws finds the
  right box with probability 1 - (1 - p)^4 (0.34 at the teacher's p = 0.1, 0.76 at p = 0.3),
  which is what AXPO exploits. Why the subgroups differ: with G = 8 rollouts, ~30% of them
  tool-using, a question's tool-using subgroup has ~2.4 rollouts and its no-tool one ~5.6, and
  the far cells' calls fail together; a perfect imitation of the teacher (right box with p = 0.3
  on average, always read correctly) would give all-wrong tool-using subgroups on ~0.37 of the
  questions and all-wrong no-tool ones on ~0.12. Measured at RL start (`axpo train`, default
  config, seed 0, mean of the first 10 RL steps): tool-call rate 0.28, tool-using subgroups all
  wrong 0.67, no-tool ones 0.26. The warm-started policy is weaker than its teacher on both
  paths: it reads a right box's zoom with P(answer) 0.5-0.7 and not every no-tool answer is one
  of the candidates. AXPO triggers on 0.61 of the groups and 0.63 of its selected prefixes
  recover. README, "The Thinking-Acting Gap", has the table.
- "tool_safe": the original regime (no candidates in the question, an exact teacher): a tool call,
  once made, is right ~65-80% of the time and guessing is the failing path, so the gap is inverted
  (measured the same way with its 1000-step warm-start: tool-using subgroups all wrong on 0.20
  of the questions, no-tool ones on 0.55).
"""
from __future__ import annotations

import random

import numpy as np
from PIL import Image

from ..records import Prompt
from .base import SftTrace, Task, _check_int

__all__ = ["ZoomDigitsTask", "DIGIT_FONT", "REGIMES", "render_glyph"]

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

# ZoomDigitsTask keyword arguments of each named regime (see the module docstring)
REGIMES = {
    "gap": {"options": 3, "teacher_box_accuracy": (0.5, 0.1)},
    "tool_safe": {},
}


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
    options: 0 (default) or the number of candidate digits the question lists, the answer among
        them ("... One of 1, 4, 8."; in [2, 10]).
    teacher_box_accuracy: (at the top-left cell, at the bottom-right cell): the probability that
        the SFT teacher's zoom box is the asked cell's, linear in row + col in between; otherwise
        it zooms into a neighbouring cell (one row or column off, uniformly among those in the
        grid) and answers the digit that zoom shows. Default (1, 1): an exact teacher.
    """

    name = "zoom_digits"
    splits = ("train", "test")
    tool_names = ("zoom",)

    def __init__(self, *, seed: int = 0, grid: int = 3, pitch: int = 48, cell_size: int = 12,
                 glyph_scale: int = 1, stroke: int | None = None, jitter: int = 1, noise: int = 24,
                 view_max_pixels: int | None = 48 * 48, options: int = 0,
                 teacher_box_accuracy: tuple[float, float] = (1.0, 1.0)):
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
        if isinstance(options, bool) or not isinstance(options, int) or options == 1 or not 0 <= options <= 10:
            raise ValueError(f"options must be 0 (none) or an int in [2, 10], got {options!r}")
        self.options = options
        acc = tuple(teacher_box_accuracy) if isinstance(teacher_box_accuracy, (tuple, list)) else None
        if acc is None or len(acc) != 2 or not all(
                not isinstance(a, bool) and isinstance(a, (int, float)) and 0 <= a <= 1 for a in acc):
            raise ValueError("teacher_box_accuracy must be two probabilities in [0, 1] (top-left cell, "
                             f"bottom-right cell), got {teacher_box_accuracy!r}")
        if grid == 1 and min(acc) < 1:
            raise ValueError("teacher_box_accuracy below 1 needs a neighbouring cell to miss into: grid >= 2")
        self.teacher_box_accuracy = (float(acc[0]), float(acc[1]))
        self._glyphs = {d: render_glyph(d, glyph_scale, self.stroke) for d in DIGIT_FONT}
        # the glyph's offset range in its cell, per axis: up to jitter, as far as it stays inside
        self._jitter_xy = (min(jitter, (cell_size - 2 - gw) // 2), min(jitter, (cell_size - 2 - gh) // 2))

    @classmethod
    def from_regime(cls, regime: str, **kwargs) -> "ZoomDigitsTask":
        """The task of a named regime (REGIMES), kwargs (e.g. seed) added to or overriding it."""
        if regime not in REGIMES:
            raise ValueError(f"regime must be one of {list(REGIMES)}, got {regime!r}")
        return cls(**{**REGIMES[regime], **kwargs})

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
        question = f"Digit at row {row + 1}, col {col + 1}?"
        if self.options:  # drawn after the image, so the other regime's examples are unchanged
            others = rng.sample([d for d in DIGIT_FONT if d != digits[row][col]], self.options - 1)
            info["options"] = sorted(others + [digits[row][col]])
            question += f" One of {', '.join(info['options'])}."
        return Prompt(question, [image], answer=digits[row][col], info=info)

    def prompts(self, split: str, start: int, count: int, *, wrap: bool = False) -> list[Prompt]:
        return [self.example(split, i) for i in self.indices(split, start, count, wrap)]

    def teacher_accuracy(self, row: int, col: int) -> float:
        """The probability that the teacher's zoom box for cell (row, col) (0-based) is that cell's."""
        a0, a1 = self.teacher_box_accuracy
        return a0 if self.grid == 1 else a0 + (a1 - a0) * (row + col) / (2 * (self.grid - 1))

    def sft_trace(self, prompt: Prompt, use_tool: bool, rng: random.Random) -> SftTrace | None:
        """use_tool: think "r{R}c{C}", zoom into the teacher's box (the asked cell's with
        probability teacher_accuracy, else a neighbour's, drawn from rng), answer the digit that
        box shows. Otherwise the same thought and the right digit directly (as a teacher seeing
        full resolution writes)."""
        info = prompt.info
        if not all(k in info for k in ("row", "col", "bbox", "digits")):
            raise ValueError("prompt.info must hold row, col, bbox and digits (a ZoomDigitsTask prompt)")
        row, col = info["row"], info["col"]
        think = f"r{row + 1}c{col + 1}"
        if not use_tool:
            return SftTrace(think=think, tool_call=None, answer=str(prompt.answer))
        accuracy = self.teacher_accuracy(row, col)
        if accuracy < 1 and rng.random() >= accuracy:  # the teacher misses by one row or column
            near = [(r, c) for r, c in ((row - 1, col), (row + 1, col), (row, col - 1), (row, col + 1))
                    if 0 <= r < self.grid and 0 <= c < self.grid]
            row, col = near[rng.randrange(len(near))]
        call = {"name": "zoom", "arguments": {"bbox_2d": self.cell_bbox(row, col)}}
        return SftTrace(think=think, tool_call=call, answer=info["digits"][row][col])
