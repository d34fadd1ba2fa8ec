"""The zoom tool: the crop's content, size and mode; clipping; refused boxes and indices."""
import json
import math

import numpy as np
import pytest
from PIL import Image

from axpo.tools import ToolContext, ToolRegistry, ZoomTool, zoom_tool

RED, WHITE = (255, 0, 0), (255, 255, 255)


def question_image():
    """64x64 white with a red square covering x in [16, 32), y in [24, 40)."""
    image = Image.new("RGB", (64, 64), WHITE)
    image.paste(RED, (16, 24, 32, 40))
    return image


@pytest.fixture
def registry():
    registry = ToolRegistry()
    registry.add(zoom_tool())
    return registry


def zoom(registry, images, **arguments):
    return registry.execute(json.dumps({"name": "zoom", "arguments": arguments}), ToolContext(images=images))


def test_zoom_on_the_square_is_all_red(registry):
    result = zoom(registry, [question_image()], bbox_2d=[16, 24, 32, 40])
    assert result.ok, result.text
    (out,) = result.images
    assert out.mode == "RGB" and out.size == (64, 64)  # 16x16 crop, 2x = 32, raised to min_side 64
    pixels = np.asarray(out).reshape(-1, 3)
    assert (pixels == RED).all()
    assert result.text == "Zoomed in on [16, 24, 32, 40] of image 0; the result is image 1 (64x64)."


def test_zoom_keeps_layout(registry):
    # the box [8, 16, 40, 48] holds the square at [8, 8, 24, 24) of a 32x32 crop -> 64x64: [16, 48)
    (out,) = zoom(registry, [question_image()], bbox_2d=[8, 16, 40, 48]).images
    a = np.asarray(out).astype(int)
    assert out.size == (64, 64)
    assert (a[20:44, 20:44] == RED).all()  # inside the square, away from the bicubic edge
    assert (a[:12, :] == WHITE).all() and (a[52:, :] == WHITE).all()
    assert (a[:, :12] == WHITE).all() and (a[:, 52:] == WHITE).all()


def test_zoom_clips_to_the_image(registry):
    result = zoom(registry, [question_image()], bbox_2d=[-10, -5.5, 20, 30])
    assert result.ok
    assert result.text.startswith("Zoomed in on [0, 0, 20, 30] of image 0 (the box was clipped")
    assert result.images[0].size == (math.floor(20 * 64 / 30), 64)  # aspect kept, longer side 64


def test_fractional_box_covers_every_touched_pixel(registry):
    result = zoom(registry, [question_image()], bbox_2d=[15.5, 23.2, 32.7, 40.0])
    assert result.ok and "[15, 23, 33, 40]" in result.text and "clipped" not in result.text
    assert result.images[0].size == (64, math.floor(17 * 64 / 18))


def test_result_index_counts_existing_images_and_negative_index(registry):
    images = [question_image(), Image.new("L", (10, 20), 128)]
    result = zoom(registry, images, bbox_2d=[0, 0, 10, 20], image_index=-1)
    assert result.ok and "of image 1;" in result.text and "is image 2 " in result.text
    assert result.images[0].mode == "RGB" and result.images[0].getpixel((3, 3)) == (128, 128, 128)
    assert zoom(registry, images, bbox_2d=[0, 0, 10, 20], image_index=1).ok


@pytest.mark.parametrize("bbox, fragment", [
    ([30, 10, 10, 20], "empty or inverted"),
    ([10, 10, 10, 20], "empty or inverted"),
    ([10, 20, 30, 20], "empty or inverted"),
    ([100, 100, 120, 120], "lies outside the image"),
    ([-20, 0, -1, 10], "lies outside the image"),
])
def test_bad_boxes(registry, bbox, fragment):
    result = zoom(registry, [question_image()], bbox_2d=bbox)
    assert result.error == "bad_arguments" and fragment in result.text
    assert "64x64" in result.text and result.images == []


@pytest.mark.parametrize("arguments, fragment", [
    ({"bbox_2d": ["a", 1, 2, 3]}, "bbox_2d[0] must be a number"),
    ({"bbox_2d": [1, 2, 3]}, "at least 4 items"),
    ({"bbox_2d": [1, 2, 3, 4, 5]}, "at most 4 items"),
    ({"bbox_2d": [0, 0, True, 4]}, "bbox_2d[2] must be a number"),
    ({"bbox_2d": "0,0,4,4"}, "must be an array"),
    ({"bbox_2d": [0, 0, 4, 4], "image_index": 0.0}, "image_index must be an integer"),
    ({"bbox_2d": [0, 0, 4, 4], "image_index": True}, "image_index must be an integer"),
    ({"bbox_2d": [0, 0, 4, 4], "zoom": 2}, 'unknown property "zoom"'),
    ({"image_index": 0}, 'missing the required property "bbox_2d"'),
])
def test_bad_arguments(registry, arguments, fragment):
    result = zoom(registry, [question_image()], **arguments)
    assert result.error == "bad_arguments" and fragment in result.text


def test_non_finite_coordinates(registry):
    text = '{"name": "zoom", "arguments": {"bbox_2d": [0, 0, NaN, 4]}}'  # Python's json accepts NaN
    assert registry.execute(text, ToolContext([question_image()])).error == "bad_arguments"
    direct = ZoomTool()(ToolContext([question_image()]), bbox_2d=[0, 0, float("nan"), 4])
    assert direct.error == "bad_arguments" and "finite" in direct.text
    direct = ZoomTool()(ToolContext([question_image()]), bbox_2d=[0, 0, float("inf"), 4])
    assert direct.error == "bad_arguments"


@pytest.mark.parametrize("index, n, fragment", [(1, 1, "valid: 0, or -1..-1"), (-2, 1, "out of range"),
                                                (3, 2, "valid: 0..1, or -2..-1")])
def test_bad_image_index(registry, index, n, fragment):
    result = zoom(registry, [question_image()] * n, bbox_2d=[0, 0, 4, 4], image_index=index)
    assert result.error == "bad_arguments" and fragment in result.text


def test_no_images(registry):
    result = zoom(registry, [], bbox_2d=[0, 0, 4, 4])
    assert result.error == "bad_arguments" and "no image" in result.text


def test_not_an_image_in_context_is_a_tool_exception(registry):
    assert zoom(registry, ["not an image"], bbox_2d=[0, 0, 4, 4]).error == "tool_exception"


def test_size_limits():
    context = ToolContext([Image.new("RGB", (300, 100), WHITE)])
    assert ZoomTool(max_side=100)(context, [0, 0, 300, 100]).images[0].size == (100, 33)
    out = ZoomTool(max_pixels=1000)(context, [0, 0, 300, 100]).images[0]
    assert out.size[0] * out.size[1] <= 1000 and abs(out.size[0] / out.size[1] - 3) < 0.2
    assert ZoomTool(scale=1.0, min_side=1)(context, [0, 0, 30, 10]).images[0].size == (30, 10)
    assert ZoomTool().output_size(1, 64) == (2, 128)  # a thin box stays thin, never 0 wide


@pytest.mark.parametrize("options, fragment", [
    ({"min_side": 0}, "min_side"), ({"max_side": 2.5}, "max_side"), ({"min_side": 100, "max_side": 50}, "min_side"),
    ({"scale": 0}, "scale"), ({"scale": float("inf")}, "scale"), ({"max_pixels": -1}, "max_pixels"),
])
def test_bad_options(options, fragment):
    with pytest.raises(ValueError, match=fragment):
        ZoomTool(**options)
    with pytest.raises(TypeError):
        zoom_tool(upscale=3)


def test_relative_coordinates_are_thousandths_of_the_image():
    """coordinates="relative" (Qwen3-VL's 0..1000 boxes): the same crop as the pixel box it scales to."""
    image = Image.fromarray(np.arange(200 * 100 * 3, dtype=np.uint32).reshape(100, 200, 3).astype(np.uint8))
    relative = ZoomTool(coordinates="relative")
    pixel = ZoomTool()
    ctx = ToolContext(images=[image])
    a, b = relative(ctx, [250, 100, 500, 600]), pixel(ctx, [50, 10, 100, 60])
    assert a.error is None and np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    assert relative(ctx, [0, 0, 1e308, 1e308]).error is None  # clipped to the image
    assert relative(ToolContext(images=[image.resize((4000, 100))]), [0, 0, 1e308, 10]).error == "bad_arguments"
    assert relative(ctx, [600, 0, 500, 10]).error == "bad_arguments"
    assert "0..1000" in relative.tool().spec()["function"]["parameters"]["properties"]["bbox_2d"]["description"]
    with pytest.raises(ValueError, match="coordinates must be one of"):
        ZoomTool(coordinates="normalized")
