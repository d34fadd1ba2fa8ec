"""LocalDatasetTask on small datasets written in each supported layout, its errors, and make_task."""
import io
import json
import random

import datasets  # installed by scripts/install.sh: its absence fails rather than skips
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from axpo.tasks import LocalDatasetTask, SftTrace, Task, ZoomDigitsTask, make_task


def image(i: int, size=(8, 6)) -> Image.Image:
    return Image.new("RGB", size, (20 * i, 255 - 20 * i, 7))


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and (np.asarray(a.convert("RGB")) == np.asarray(b.convert("RGB"))).all()


def rows(n: int, offset: int = 0):
    return [{"question": f"Q{offset + i}?", "answer": str(offset + i)} for i in range(n)]


def check(task: Task, split: str, n: int, offset: int = 0, images_per_row: int = 1):
    assert task.size(split) == n
    prompts = task.prompts(split, 0, n)
    for i, p in enumerate(prompts):
        assert p.question == f"Q{offset + i}?" and p.answer == str(offset + i)
        assert len(p.images) == images_per_row and p.group_id is None
        assert all(im.mode == "RGB" for im in p.images)
        assert same(p.images[0], image(offset + i))
        assert p.info == {"split": split, "index": i}
    return prompts


def test_save_to_disk_dataset_dict(tmp_path):
    features = datasets.Features({"question": datasets.Value("string"), "image": datasets.Image(),
                                  "answer": datasets.Value("string")})

    def split(n, offset):
        r = rows(n, offset)
        return datasets.Dataset.from_dict({"question": [x["question"] for x in r],
                                           "image": [image(offset + i) for i in range(n)],
                                           "answer": [x["answer"] for x in r]}, features=features)

    datasets.DatasetDict({"train": split(3, 0), "test": split(2, 10)}).save_to_disk(str(tmp_path / "dd"))
    task = LocalDatasetTask(tmp_path / "dd")
    assert task.splits == ("train", "test")
    check(task, "train", 3)
    check(task, "test", 2, offset=10)
    assert LocalDatasetTask(tmp_path / "dd", splits=["test"]).splits == ("test",)
    # a single Dataset: split "train", or the one name given
    split(2, 0).save_to_disk(str(tmp_path / "one"))
    assert LocalDatasetTask(tmp_path / "one").splits == ("train",)
    check(LocalDatasetTask(tmp_path / "one", splits=["test"]), "test", 2)


def test_parquet_hub_layout_with_shards(tmp_path):
    (tmp_path / "data").mkdir()

    def write(name, r, offset):
        table = pa.table({"query": [x["question"] for x in r],
                          "image": [{"bytes": png_bytes(image(offset + i)), "path": None} for i in range(len(r))],
                          "gt": [int(x["answer"]) for x in r]})
        pq.write_table(table, tmp_path / "data" / name)

    write("train-00000-of-00001.parquet", rows(3), 0)
    write("test-00000-of-00002.parquet", rows(2, 10), 10)
    write("test-00001-of-00002.parquet", rows(2, 12), 12)
    (tmp_path / "README.md").write_text("a dataset card")
    task = LocalDatasetTask(tmp_path)
    assert task.splits == ("train", "test")
    check(task, "train", 3)
    check(task, "test", 4, offset=10)  # the two shards, in name order
    assert [p.answer for p in task.prompts("test", 3, 3, wrap=True)] == ["13", "10", "11"]


def test_split_named_parquet_and_json_files(tmp_path):

    ds = datasets.Dataset.from_dict({"problem": ["Q0?", "Q1?"], "images": [[image(0)], [image(1)]],
                                     "solution": ["0", "1"]},
                                    features=datasets.Features({"problem": datasets.Value("string"),
                                                                "images": datasets.Sequence(datasets.Image()),
                                                                "solution": datasets.Value("string")}))
    ds.to_parquet(str(tmp_path / "validation.parquet"))
    check(LocalDatasetTask(tmp_path), "validation", 2)
    # a single JSON file (a list of rows), with explicit keys and an image path relative to it
    image(5).save(tmp_path / "five.png")
    (tmp_path / "rows.json").write_text(json.dumps([{"q": "Q5?", "pic": "five.png", "a": 5.0}]))
    task = LocalDatasetTask(tmp_path / "rows.json", question_key="q", image_key="pic", answer_key="a")
    [p] = task.prompts("train", 0, 1)
    assert p.question == "Q5?" and p.answer == "5.0" and same(p.images[0], image(5))


def test_jsonl_with_relative_paths_and_several_images(tmp_path):
    (tmp_path / "imgs").mkdir()
    for i in range(6):
        image(i).save(tmp_path / "imgs" / f"{i}.png")
    with open(tmp_path / "train.jsonl", "w") as f:
        for i in range(3):
            row = {"prompt": f"Q{i}?", "images": [f"imgs/{i}.png", f"imgs/{i + 3}.png"], "label": i}
            f.write(json.dumps(row) + "\n\n")
    with open(tmp_path / "test.jsonl", "w") as f:
        f.write(json.dumps({"prompt": "Q4?", "images": {"bytes": None, "path": "imgs/4.png"}, "label": "4"}) + "\n")
    task = LocalDatasetTask(tmp_path)
    assert task.splits == ("train", "test")
    prompts = check(task, "train", 3, images_per_row=2)
    assert all(same(p.images[1], image(i + 3)) for i, p in enumerate(prompts))
    check(task, "test", 1, offset=4)
    # the same file read directly: split "train"
    check(LocalDatasetTask(tmp_path / "train.jsonl"), "train", 3, images_per_row=2)


def test_traces_are_direct_answers_only(tmp_path):
    image(0).save(tmp_path / "0.png")
    (tmp_path / "train.jsonl").write_text(json.dumps({"question": "Q?", "image": "0.png", "answer": "7"}))
    task = LocalDatasetTask(tmp_path)
    [p] = task.prompts("train", 0, 1)
    assert task.sft_trace(p, True, random.Random(0)) is None
    assert task.sft_trace(p, False, random.Random(0)) == SftTrace("", None, "7")


def test_a_data_set_without_an_image_column_is_text_only(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"question": "Q?", "answer": "7"}))
    [p] = LocalDatasetTask(tmp_path).prompts("train", 0, 1)
    assert (p.question, p.images, p.answer) == ("Q?", [], "7")
    with pytest.raises(ValueError, match="image_key='pic': no such column"):  # named, but missing: an error
        LocalDatasetTask(tmp_path, image_key="pic")


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LocalDatasetTask(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no dataset found"):
        LocalDatasetTask(tmp_path)
    image(0).save(tmp_path / "0.png")
    (tmp_path / "train.jsonl").write_text(json.dumps({"text": "Q?", "image": "0.png", "answer": "7"}))
    with pytest.raises(ValueError, match="no question column.*question_key"):
        LocalDatasetTask(tmp_path)
    with pytest.raises(ValueError, match="answer_key='ans'"):
        LocalDatasetTask(tmp_path, question_key="text", answer_key="ans")
    task = LocalDatasetTask(tmp_path, question_key="text")
    with pytest.raises(ValueError, match="split"):
        task.prompts("test", 0, 1)
    with pytest.raises(ValueError, match="start \\+ count"):
        task.prompts("train", 0, 2)
    with pytest.raises(ValueError, match="splits"):
        LocalDatasetTask(tmp_path, question_key="text", splits=["test"])
    (tmp_path / "train.jsonl").write_text(json.dumps({"question": "Q?", "image": "missing.png", "answer": "7"}))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        LocalDatasetTask(tmp_path).prompts("train", 0, 1)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    (tmp_path / "train.jsonl").write_text(json.dumps({"question": "Q?", "image": ["0.png", "bad.png"], "answer": "7"}))
    with pytest.raises(ValueError, match=r"row 0 of split 'train', column 'image'\[1\].*unreadable"):
        LocalDatasetTask(tmp_path).prompts("train", 0, 1)
    (tmp_path / "train.jsonl").write_text('{"question": "a", "answer": "1"}\n\n{"question": "b", "answer": "2"}\n{bad\n')
    with pytest.raises(ValueError, match=r"train.jsonl: line 4 is not a JSON object"):  # the file's own line
        LocalDatasetTask(tmp_path / "train.jsonl")
    (tmp_path / "train.jsonl").write_text("{not json")
    with pytest.raises(ValueError, match="train.jsonl"):
        LocalDatasetTask(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="path"):
        LocalDatasetTask(tmp_path / "notes.txt")


def test_make_task(tmp_path):
    assert isinstance(make_task("zoom_digits", seed=3), ZoomDigitsTask) and make_task("zoom_digits", seed=3).seed == 3
    image(0).save(tmp_path / "0.png")
    (tmp_path / "test.jsonl").write_text(json.dumps({"question": "Q?", "image": "0.png", "answer": "7"}))
    task = make_task("local", path=tmp_path, view_max_pixels=1024)
    assert isinstance(task, LocalDatasetTask) and task.splits == ("test",) and task.view_max_pixels == 1024
    with pytest.raises(ValueError, match="local.*zoom_digits"):
        make_task("vstar")
    with pytest.raises(ValueError, match="path"):
        make_task("local")
