"""ZoomDigitsTask: determinism, the cell boxes, the traces' tool call, argument checks, and the
legibility gap (the digit is read from the zoom, much less from the full view) measured on the
pixels the policy actually gets."""
import json
import random

import numpy as np
import pytest
from PIL import Image

from axpo.models import ImagePreprocessor, smart_resize
from axpo.rollout import Prompt
from axpo.tasks import SftTrace, ZoomDigitsTask
from axpo.tasks.zoom_digits import DIGIT_FONT
from axpo.tools import ToolContext

DIGITS = "0123456789"


@pytest.fixture(scope="module")
def processor(task):
    # what policy_from_model gives the tiny Qwen3-VL (patch 4, merge 2), at the task's budget
    return ImagePreprocessor(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=64,
                             max_pixels=task.view_max_pixels)


def pixels(image):
    return np.asarray(image, dtype=np.int16)


def zoom(tools, image, bbox):
    result = tools.execute(json.dumps({"name": "zoom", "arguments": {"bbox_2d": bbox}}), ToolContext(images=[image]))
    assert result.ok, result.text
    return result.images[0]


def test_examples_are_deterministic_and_streams_differ(task):
    a = task.prompts("train", 5, 3)
    b = task.prompts("train", 5, 3)
    assert [p.question for p in a] == [p.question for p in b] and [p.answer for p in a] == [p.answer for p in b]
    assert all((pixels(x.images[0]) == pixels(y.images[0])).all() for x, y in zip(a, b))
    assert [p.info for p in a] == [p.info for p in b]
    assert all(p.group_id is None for p in a)
    # index i of prompts(start) is example start + i
    assert (pixels(task.prompts("train", 6, 1)[0].images[0]) == pixels(a[1].images[0])).all()
    test = task.prompts("test", 5, 3)
    other_seed = ZoomDigitsTask(seed=1).prompts("train", 5, 3)
    for x, y, z in zip(a, test, other_seed):
        assert not (pixels(x.images[0]) == pixels(y.images[0])).all()
        assert not (pixels(x.images[0]) == pixels(z.images[0])).all()
    assert [p.info["digits"] for p in a] != [p.info["digits"] for p in test]
    assert task.size("train") is None and task.size("test") is None


def test_question_answer_and_info(task):
    for p in task.prompts("test", 0, 20):
        r, c = p.info["row"], p.info["col"]
        assert p.question == f"Digit at row {r + 1}, col {c + 1}?"
        assert p.answer == p.info["digits"][r][c] and p.answer in DIGITS
        assert p.images[0].size == (task.image_size, task.image_size) and p.images[0].mode == "RGB"
        assert p.info["bbox"] == task.cell_bbox(r, c)


def test_the_bbox_holds_the_asked_glyph(task):
    """The dark pixels of the image are the glyphs, one per cell box; inside the asked box they
    are exactly the asked digit's bitmap."""
    for p in task.prompts("train", 0, 30):
        gray = pixels(p.images[0])[:, :, 0]
        ink = gray < 115  # ink <= 80 + noise 24; background >= 200 - 24, outline >= 150 - 24
        inside = np.zeros_like(ink)
        for r in range(task.grid):
            for c in range(task.grid):
                x1, y1, x2, y2 = task.cell_bbox(r, c)
                inside[y1:y2, x1:x2] = True
        assert not (ink & ~inside).any()
        x1, y1, x2, y2 = p.info["bbox"]
        cell = ink[y1:y2, x1:x2]
        ys, xs = np.nonzero(cell)
        found = cell[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        expected = np.array([[ch == "#" for ch in row] for row in DIGIT_FONT[p.answer]])
        assert found.shape == expected.shape and (found == expected).all()


def test_traces(task, tools):
    p = task.prompts("train", 3, 1)[0]
    r, c = p.info["row"] + 1, p.info["col"] + 1
    tool = task.sft_trace(p, True, random.Random(0))
    direct = task.sft_trace(p, False, random.Random(0))
    assert tool == SftTrace(f"r{r}c{c}", {"name": "zoom", "arguments": {"bbox_2d": p.info["bbox"]}}, p.answer)
    assert direct == SftTrace(f"r{r}c{c}", None, p.answer)
    result = tools.execute(json.dumps(tool.tool_call), ToolContext(images=list(p.images)))
    assert result.ok, result.text
    [image] = result.images
    assert isinstance(image, Image.Image) and image.size == (64, 64)
    with pytest.raises(ValueError, match="prompt.info"):
        task.sft_trace(Prompt("q", [], "1"), True, random.Random(0))


@pytest.mark.parametrize("kwargs, name", [
    (dict(grid=0), "grid"), (dict(grid=10), "grid"), (dict(cell_size=60), "cell_size"),
    (dict(cell_size=8), "glyph_scale"), (dict(glyph_scale=0), "glyph_scale"), (dict(stroke=2), "stroke"),
    (dict(jitter=-1), "jitter"), (dict(noise=101), "noise"), (dict(view_max_pixels=0), "view_max_pixels"),
    (dict(seed="0"), "seed"), (dict(pitch=True), "pitch"),
])
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ZoomDigitsTask(**kwargs)


def test_bad_prompt_requests(task):
    for args, name in [(("val", 0, 1), "split"), (("train", -1, 1), "start"), (("train", 0, -1), "count"),
                       (("train", 0.5, 1), "start")]:
        with pytest.raises(ValueError, match=name):
            task.prompts(*args)
    assert task.prompts("train", 0, 0) == []


# -- legibility: what the policy sees ---------------------------------------------------------------

def policy_view(image, processor):
    """The pixels the policy gets, as gray levels: ImagePreprocessor's resize (smart_resize, bicubic)."""
    h, w = smart_resize(image.height, image.width, processor.patch_size * processor.merge_size,
                        processor.min_pixels, processor.max_pixels)
    img = image.convert("RGB")
    if (img.height, img.width) != (h, w):
        img = img.resize((w, h), resample=Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float32)


def patches(view, processor):
    """view [H, W, 3] in 0..255 -> the preprocessor's pixel_values layout (to check policy_view)."""
    x = (view / 255.0 - np.float32(0.5)) / np.float32(0.5)
    x = np.repeat(x.transpose(2, 0, 1)[None], processor.temporal_patch_size, axis=0)
    tp, p, m = processor.temporal_patch_size, processor.patch_size, processor.merge_size
    gh, gw = view.shape[0] // p, view.shape[1] // p
    x = x.reshape(1, tp, 3, gh // m, m, p, gw // m, m, p).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gh * gw, -1)


def best_correlation(x, template, shift):
    """Max over shifts (|dy|, |dx| <= shift) of the normalized correlation of x and the shifted template."""
    best, (h, w) = -2.0, x.shape
    for dy in range(-shift, shift + 1):
        for dx in range(-shift, shift + 1):
            a = x[max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)]
            b = template[max(0, -dy):h + min(0, -dy), max(0, -dx):w + min(0, -dx)]
            a, b = a - a.mean(), b - b.mean()
            best = max(best, float((a * b).sum() / (np.sqrt((a * a).sum() * (b * b).sum()) + 1e-6)))
    return best


def test_policy_view_reproduces_the_preprocessor(task, processor, tools):
    p = task.prompts("test", 0, 1)[0]
    for image in (p.images[0], zoom(tools, p.images[0], p.info["bbox"])):
        pv, _ = processor(image)
        assert np.allclose(patches(policy_view(image, processor), processor), pv.numpy(), atol=1e-6)


def test_digit_is_legible_through_zoom_and_mostly_not_without(task, processor, tools):
    """Nearest-template reading (templates: each digit in the canonical rendering, viewed the same
    way) of 200 test cells: from the zoom tool's output for the cell's box, and from the cell's
    region of the full view. Measured: zoom 1.00, full view 0.385."""
    n, prompts = task.grid, task.prompts("test", 0, 200)
    canonical = {d: task.render([[d] * n] * n, None) for d in DIGITS}
    full_templates = {d: policy_view(im, processor).mean(-1) for d, im in canonical.items()}
    zoom_templates = {}
    correct_full = correct_zoom = 0
    for p in prompts:
        bbox = p.info["bbox"]
        key = tuple(bbox)
        if key not in zoom_templates:
            zoom_templates[key] = {d: policy_view(zoom(tools, im, bbox), processor).mean(-1)
                                   for d, im in canonical.items()}
        zoomed = policy_view(zoom(tools, p.images[0], bbox), processor).mean(-1)
        shift = int(np.ceil(task.jitter * zoomed.shape[1] / task.cell_size))
        guess = max(DIGITS, key=lambda d: best_correlation(zoomed, zoom_templates[key][d], shift))
        correct_zoom += guess == p.answer
        full = policy_view(p.images[0], processor).mean(-1)
        s = full.shape[1] / p.images[0].width
        x1, y1 = max(0, int(bbox[0] * s) - 1), max(0, int(bbox[1] * s) - 1)
        x2, y2 = int(np.ceil(bbox[2] * s)) + 1, int(np.ceil(bbox[3] * s)) + 1
        guess = max(DIGITS, key=lambda d: best_correlation(full[y1:y2, x1:x2], full_templates[d][y1:y2, x1:x2], 1))
        correct_full += guess == p.answer
    zoom_acc, full_acc = correct_zoom / len(prompts), correct_full / len(prompts)
    print(f"legibility: zoom {zoom_acc:.3f}, full view {full_acc:.3f}")
    assert zoom_acc >= 0.95
    assert 0.10 < full_acc <= 0.60


# -- the "gap" regime: candidates in the question, a weak teacher --------------------------------

@pytest.fixture(scope="module")
def gap():
    return ZoomDigitsTask.from_regime("gap")


def test_gap_regime_renders_the_same_images(task, gap):
    """Only the question and the teacher change: the pixels (hence the legibility measured above)
    are those of the tool_safe regime, example for example."""
    for a, b in zip(task.prompts("test", 0, 20), gap.prompts("test", 0, 20)):
        assert (pixels(a.images[0]) == pixels(b.images[0])).all() and a.answer == b.answer
        assert b.question.startswith(a.question)
    assert ZoomDigitsTask.from_regime("tool_safe").options == 0
    with pytest.raises(ValueError, match="regime must be one of"):
        ZoomDigitsTask.from_regime("hard")


def test_gap_questions_list_three_candidates_with_the_answer(gap):
    positions = set()
    for p in gap.prompts("train", 0, 200):
        opts = p.info["options"]
        assert len(set(opts)) == 3 and opts == sorted(opts) and p.answer in opts
        assert p.question.endswith(f" One of {', '.join(opts)}.")
        positions.add(opts.index(p.answer))
    assert positions == {0, 1, 2}  # the answer's place among them tells nothing


def test_gap_teacher_misses_by_one_cell_at_its_rates_and_answers_what_it_zoomed(gap, tools):
    """The teacher's box is the asked cell's with probability 0.5 (top-left) .. 0.1 (bottom-right),
    else a neighbour's; the answer is that box's digit, so every trace is what its zoom shows."""
    hits: dict = {}
    rng = random.Random(0)
    for p in gap.prompts("train", 0, 900):
        t = gap.sft_trace(p, True, rng)
        x1, y1 = t.tool_call["arguments"]["bbox_2d"][:2]
        cells = [(r, c) for r in range(3) for c in range(3) if gap.cell_bbox(r, c)[:2] == [x1, y1]]
        assert len(cells) == 1
        (r, c), (row, col) = cells[0], (p.info["row"], p.info["col"])
        assert abs(r - row) + abs(c - col) <= 1
        assert t.answer == p.info["digits"][r][c] and t.think == f"r{row + 1}c{col + 1}"
        hits.setdefault(row + col, []).append((r, c) == (row, col))
        if len(hits[row + col]) == 1:  # the call runs
            assert tools.execute(json.dumps(t.tool_call), ToolContext(images=list(p.images))).ok
    for d, want in zip(range(5), (0.5, 0.4, 0.3, 0.2, 0.1)):
        got = np.mean(hits[d])
        assert abs(got - want) < 3.5 * np.sqrt(want * (1 - want) / len(hits[d])) + 0.01, (d, got, len(hits[d]))
    assert gap.sft_trace(p, False, rng) == SftTrace(f"r{row + 1}c{col + 1}", None, p.answer)


@pytest.mark.parametrize("kwargs, name", [
    (dict(options=1), "options"), (dict(options=11), "options"), (dict(options=True), "options"),
    (dict(teacher_box_accuracy=(1.2, 0.1)), "teacher_box_accuracy"), (dict(teacher_box_accuracy=0.5), "teacher"),
    (dict(grid=1, teacher_box_accuracy=(0.5, 0.5)), "neighbouring cell"),
])
def test_gap_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ZoomDigitsTask(**kwargs)
