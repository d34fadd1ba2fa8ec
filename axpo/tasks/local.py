"""LocalDatasetTask: question / image(s) / answer rows from a dataset on the local disk (V*,
HR-Bench or your own data, in the usual Hugging Face `datasets` layouts). Nothing is downloaded.

Layouts read (`path`):
- a directory written by `Dataset.save_to_disk` (one split, "train") or `DatasetDict.save_to_disk`
  (its splits), read with `datasets.load_from_disk` (needs the `datasets` package);
- a directory of parquet / JSONL / JSON files, hub style: `data/{split}-*.parquet` (e.g.
  `data/test-00000-of-00001.parquet`), `{split}.parquet`, `{split}.jsonl`, `{split}.json` (several
  files of one split are concatenated in name order); `data/` is used when it holds any;
- a single .parquet / .jsonl / .json file: split "train" (or the one name given in `splits`).

A JSON file holds a list of row objects (or an object of column lists); JSONL one row per line.
Image values may be PIL images, `{"bytes": ..., "path": ...}` dicts (the `datasets` Image
feature), raw bytes, file paths (relative ones to the data file's directory), None (no image), or
lists of those (several images per row). A data set with no image column is text only. Images
are decoded lazily, when `prompts` asks for rows, and converted to RGB.
"""
from __future__ import annotations

import io
import json
import os
import random
import re
from typing import Any

from PIL import Image

from ..records import Prompt
from .base import SftTrace, Task, _check_int

__all__ = ["LocalDatasetTask", "QUESTION_KEYS", "IMAGE_KEYS", "ANSWER_KEYS"]

QUESTION_KEYS = ("question", "prompt", "query", "problem")
IMAGE_KEYS = ("image", "images")
ANSWER_KEYS = ("answer", "label", "gt", "ground_truth", "solution")

_DATA_FILE = re.compile(r"^(?P<split>\w+?)(?:-.*)?\.(?P<ext>parquet|jsonl|json)$")
_SPLIT_ORDER = {"train": 0, "validation": 1, "val": 1, "dev": 1, "test": 2}
# metadata files of datasets / the hub, never data
_NOT_DATA = {"dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json"}


class _Rows:
    """Row access to one split: len() and row(i) -> dict of the needed columns."""

    def __init__(self, columns: list[str], length: int, base_dir: str):
        self.columns, self.length, self.base_dir = columns, length, base_dir

    def __len__(self) -> int:
        return self.length

    def base_dir_of(self, i: int) -> str:
        """The directory relative image paths of row i are resolved against."""
        return self.base_dir


class _DatasetRows(_Rows):
    def __init__(self, dataset, base_dir: str):
        super().__init__(list(dataset.column_names), len(dataset), base_dir)
        self.dataset = dataset
        self._views: dict[tuple, Any] = {}

    def row(self, i: int, keys: list[str]) -> dict:
        key = tuple(dict.fromkeys(keys))
        if key not in self._views:  # decode only the needed columns
            self._views[key] = self.dataset.select_columns(list(key))
        return self._views[key][i]


class _ListRows(_Rows):
    """Rows of JSON / JSONL files (held in memory: text and image paths are small)."""

    def __init__(self, rows: list[dict], base_dirs: list[str]):
        columns = list(dict.fromkeys(k for r in rows for k in r))
        super().__init__(columns, len(rows), "")
        self.rows, self.base_dirs = rows, base_dirs

    def row(self, i: int, keys: list[str]) -> dict:
        return {k: self.rows[i].get(k) for k in keys}

    def base_dir_of(self, i: int) -> str:
        return self.base_dirs[i]


class _ParquetRows(_Rows):
    """Rows of parquet files, memory-mapped: image bytes are read only for the rows asked."""

    def __init__(self, files: list[str]):
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError("reading parquet files needs pyarrow: pip install pyarrow (or datasets)") from e
        self.tables, self.starts, self.dirs = [], [], []
        total, columns = 0, []
        for f in files:
            try:
                table = pq.read_table(f, memory_map=True)
            except Exception as e:
                raise ValueError(f"cannot read the parquet file {f}: {e}") from e
            self.tables.append(table)
            self.starts.append(total)
            self.dirs.append(os.path.dirname(os.path.abspath(f)))
            total += table.num_rows
            columns += [c for c in table.column_names if c not in columns]
        super().__init__(columns, total, "")

    def _locate(self, i: int) -> int:
        k = len(self.starts) - 1
        while self.starts[k] > i:
            k -= 1
        return k

    def row(self, i: int, keys: list[str]) -> dict:
        k = self._locate(i)
        table = self.tables[k]
        present = [c for c in keys if c in table.column_names]
        row = table.select(present).slice(i - self.starts[k], 1).to_pylist()[0]
        return {c: row.get(c) for c in keys}

    def base_dir_of(self, i: int) -> str:
        return self.dirs[self._locate(i)]


def _read_json_rows(path: str) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            if path.endswith(".jsonl"):
                rows = []
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rows.append(json.loads(line))
                    except ValueError as e:  # the file's line, not the row's own "line 1"
                        raise ValueError(f"line {lineno} is not a JSON object ({getattr(e, 'msg', e)})") from e
            else:
                data = json.load(f)
                if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
                    n = {len(v) for v in data.values()}
                    if len(n) != 1:
                        raise ValueError("its column lists have different lengths")
                    rows = [dict(zip(data, values)) for values in zip(*data.values())]
                else:
                    rows = data
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the JSON file {path}: {e}") from e
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"the JSON file {path} must hold a list of row objects (or an object of column lists)")
    return rows


def _file_rows(files: list[str]) -> _Rows:
    exts = {os.path.splitext(f)[1] for f in files}
    if exts == {".parquet"}:
        return _ParquetRows(files)
    if ".parquet" in exts:
        raise ValueError(f"one split mixes parquet and JSON files: {files}")
    rows, dirs = [], []
    for f in files:
        part = _read_json_rows(f)
        rows += part
        dirs += [os.path.dirname(os.path.abspath(f))] * len(part)
    return _ListRows(rows, dirs)


def _split_sort_key(name: str):
    return (_SPLIT_ORDER.get(name, 3), name)


class LocalDatasetTask(Task):
    """Prompts from a local dataset (see the module docstring for the layouts).

    path: a dataset directory or a data file. question_key / image_key / answer_key: the columns
        (None: the first present of QUESTION_KEYS / IMAGE_KEYS / ANSWER_KEYS).
    splits: the split names to serve (None: every split found; for a single file or a one-split
        save_to_disk directory, one name to call its split, default "train").
    view_max_pixels: the image budget the policy should see these images at (None: its own).

    Traces: direct answers only (no tool annotations): sft_trace(use_tool=True) is None.
    """

    name = "local"

    def __init__(self, path, *, question_key: str | None = None, image_key: str | None = None,
                 answer_key: str | None = None, splits=None, view_max_pixels: int | None = None):
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a local path, got {type(path).__name__}")
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"path {self.path!r} does not exist (LocalDatasetTask reads local data only)")
        for key, value in (("question_key", question_key), ("image_key", image_key), ("answer_key", answer_key)):
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{key} must be a non-empty str or None, got {value!r}")
        if splits is not None:
            if isinstance(splits, str) or not all(isinstance(s, str) and s for s in splits) or not splits:
                raise ValueError(f"splits must be a non-empty sequence of split names or None, got {splits!r}")
            splits = tuple(splits)
        if view_max_pixels is not None:
            _check_int(view_max_pixels, "view_max_pixels", 1)
        self.view_max_pixels = view_max_pixels
        found = self._discover(splits)
        if splits is not None:
            missing = [s for s in splits if s not in found]
            if missing:
                known = sorted(found, key=_split_sort_key)
                raise ValueError(f"splits: {missing} not found in {self.path} (found: {known})")
            found = {s: found[s] for s in splits}
        self.splits = tuple(sorted(found, key=_split_sort_key)) if splits is None else splits
        self._rows = found
        self._keys: dict[str, tuple[str, str | None, str]] = {}
        for split in self.splits:
            columns = found[split].columns
            self._keys[split] = (self._column(split, columns, question_key, QUESTION_KEYS, "question_key"),
                                 self._column(split, columns, image_key, IMAGE_KEYS, "image_key", optional=True),
                                 self._column(split, columns, answer_key, ANSWER_KEYS, "answer_key"))

    # -- discovery ------------------------------------------------------------------------------
    def _discover(self, splits) -> dict[str, _Rows]:
        path = self.path
        single = None
        if splits is not None and len(splits) == 1:
            single = splits[0]
        if os.path.isfile(path):
            if not path.endswith((".parquet", ".jsonl", ".json")):
                raise ValueError(f"path {path!r} must be a .parquet, .jsonl or .json file, or a dataset directory")
            if splits is not None and len(splits) != 1:
                raise ValueError(f"splits must name one split for a single data file, got {splits!r}")
            return {single or "train": _file_rows([path])}
        if os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(os.path.join(path, "state.json")):
            return self._load_from_disk(single)
        for folder in (os.path.join(path, "data"), path):
            if not os.path.isdir(folder):
                continue
            by_split: dict[str, list[str]] = {}
            for name in sorted(os.listdir(folder)):
                m = _DATA_FILE.match(name)
                if m and name not in _NOT_DATA and os.path.isfile(os.path.join(folder, name)):
                    by_split.setdefault(m.group("split"), []).append(os.path.join(folder, name))
            if by_split:
                return {s: _file_rows(files) for s, files in by_split.items()}
        raise FileNotFoundError(
            f"no dataset found in {path!r}: expected a save_to_disk directory (dataset_dict.json or state.json), "
            f"data/{{split}}-*.parquet, {{split}}.parquet, {{split}}.jsonl or {{split}}.json")

    def _load_from_disk(self, single: str | None) -> dict[str, _Rows]:
        try:
            import datasets
        except ImportError as e:
            raise ImportError(f"{self.path} was written by datasets' save_to_disk: reading it needs the "
                              f"datasets package (pip install datasets)") from e
        loaded = datasets.load_from_disk(self.path)
        if isinstance(loaded, datasets.DatasetDict):
            return {name: _DatasetRows(ds, self.path) for name, ds in loaded.items()}
        return {single or "train": _DatasetRows(loaded, self.path)}

    def _column(self, split: str, columns: list[str], given: str | None, aliases: tuple[str, ...], arg: str,
                optional: bool = False) -> str | None:
        if given is not None:
            if given not in columns:
                raise ValueError(f"{arg}={given!r}: no such column in split {split!r} of {self.path} "
                                 f"(columns: {columns})")
            return given
        for alias in aliases:
            if alias in columns:
                return alias
        if optional:  # e.g. no image column: a text-only data set
            return None
        raise ValueError(f"split {split!r} of {self.path} has no {arg[:-4]} column: none of {list(aliases)} "
                         f"among its columns {columns}; pass {arg}=")

    # -- the Task interface -----------------------------------------------------------------------
    def size(self, split: str) -> int:
        return len(self._rows[self.check_split(split)])

    def prompts(self, split: str, start: int, count: int, *, wrap: bool = False) -> list[Prompt]:
        return [self._prompt(split, i) for i in self.indices(split, start, count, wrap)]

    def _prompt(self, split: str, index: int) -> Prompt:
        rows = self._rows[split]
        qk, ik, ak = self._keys[split]
        row = rows.row(index, [k for k in (qk, ik, ak) if k is not None])
        where = f"row {index} of split {split!r}"
        question = row[qk]
        if not isinstance(question, str):
            raise ValueError(f"{where}: the question column {qk!r} must hold text, got {type(question).__name__}")
        images = [] if ik is None else _images(row[ik], rows.base_dir_of(index), f"{where}, column {ik!r}")
        return Prompt(question, images, answer=_answer(row[ak], f"{where}, column {ak!r}"),
                      info={"split": split, "index": index})

    def sft_trace(self, prompt: Prompt, use_tool: bool, rng: random.Random) -> SftTrace | None:
        """A direct answer (empty thought) when the row has an answer; no tool traces."""
        if use_tool or prompt.answer is None:
            return None
        return SftTrace(think="", tool_call=None, answer=prompt.answer)

    def __repr__(self) -> str:
        return f"LocalDatasetTask({self.path!r}, splits={self.splits!r})"


def _answer(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)):
        return str(value)
    raise ValueError(f"{where}: an answer must be text or a number, got {type(value).__name__}")


def _images(value: Any, base_dir: str, where: str) -> list:
    """The images of one cell (see the module docstring for the accepted values)."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [im for k, v in enumerate(value) for im in _images(v, base_dir, f"{where}[{k}]")]
    if isinstance(value, Image.Image):
        return [_rgb(value, where)]
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        if value.get("bytes") is not None:
            return _images(value["bytes"], base_dir, where)
        if value.get("path") is not None:
            return _images(value["path"], base_dir, where)
        raise ValueError(f"{where}: an image dict must hold bytes or a path, got both empty")
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            image = Image.open(io.BytesIO(bytes(value)))
        except Exception as e:
            raise ValueError(f"{where}: unreadable image bytes ({type(e).__name__}: {e})") from e
        return [_rgb(image, where)]
    if isinstance(value, (str, os.PathLike)):
        file = os.path.join(base_dir, os.fspath(value))
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{where}: image file {file!r} not found")
        try:
            image = Image.open(file)
        except Exception as e:
            raise ValueError(f"{where}: unreadable image file {file!r} ({type(e).__name__}: {e})") from e
        return [_rgb(image, f"{where} ({file})")]
    raise ValueError(f"{where}: an image must be a PIL image, a {{'bytes', 'path'}} dict, bytes, a file path "
                     f"or a list of those, got {type(value).__name__}")


def _rgb(image: Image.Image, where: str) -> Image.Image:
    try:
        image.load()
        return image if image.mode == "RGB" else image.convert("RGB")
    except Exception as e:
        raise ValueError(f"{where}: unreadable image ({type(e).__name__}: {e})") from e
