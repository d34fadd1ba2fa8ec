"""The metrics log (one fsynced JSON line per step, TensorBoard mirror) and the progress bar.

Plain Python on floats (tqdm / TensorBoard are imported only by the functions that use them), so
the trainer can log from its hot loop and every plot can be redrawn from `metrics.jsonl` alone,
on any machine, after a crash.

    with MetricsLogger(out_dir, resume_step=ckpt_step) as log, Progress(n_steps, "rl") as bar:
        for step in ...:
            log.log("rl", step, global_step, metrics)   # one fsynced JSON line
            bar.update(metrics)
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

__all__ = ["DEFAULT_KEYS", "METRICS_FILE", "MetricsLogger", "Progress", "format_metrics", "read_metrics"]

METRICS_FILE = "metrics.jsonl"
RESERVED_FIELDS = ("stage", "step", "global_step", "time")
# (short label, metric key): what the progress bar and one-line logs show by default.
DEFAULT_KEYS = (("reward", "pass1"), ("tool", "tool_call_rate"), ("trig", "triggered_frac"),
                ("rec", "recovery_rate"), ("loss", "loss"), ("kl", "kl"))




def _int_arg(x, name: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name} must be an int, got {type(x).__name__} {x!r}")
    return x


# --------------------------------------------------------------------------------------------
# The metrics log
# --------------------------------------------------------------------------------------------

def _parse_line(line: str) -> dict | None:
    """A record from one line, or None when the line is not a whole JSON object."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("global_step"), int):
        return None
    return rec


def read_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl file, in order (NaN / inf were written as None).

    A partial or garbled LAST line (a writer killed mid-write) is skipped; a garbled line
    anywhere else means the file was damaged otherwise and is a ValueError naming the line.
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        rec = _parse_line(line)
        if rec is None:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not a metrics record: {line[:80]!r}")
        out.append(rec)
    return out


def _tensorboard_writer(setting, log_dir: Path, purge_step: int | None):
    """A SummaryWriter, or None; setting None = when importable, True = required, False = off."""
    if setting is False:
        return None
    if setting is not None and setting is not True:
        raise TypeError(f"tensorboard must be None, True or False, got {setting!r}")
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        if setting is None:
            return None
        raise ImportError("MetricsLogger(tensorboard=True) needs the tensorboard package "
                          f"(pip install tensorboard), which is not importable: {e}") from e
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


class MetricsLogger:
    """Appends one JSON line per `log` call to out_dir/metrics.jsonl, and mirrors the scalars to
    TensorBoard when asked (or, by default, when it is installed).

    Each line is `{"stage", "step", "global_step", "time", <metrics>...}`, written with a single
    write, flushed and fsynced: a process killed (even with SIGKILL) leaves whole lines plus at
    most one partial last line, which `read_metrics` skips. NaN / inf are written as null.

    resume_step: None starts a fresh file (an existing one is truncated); an int keeps only the
        existing records with global_step <= resume_step (the checkpoint resumed from), so the
        steps replayed after a restart are not logged twice. The rewrite is atomic.
    tensorboard: None = use torch.utils.tensorboard when importable, True = required
        (ImportError if missing), False = off. Scalars go to f"{stage}/{key}" at global_step,
        under out_dir/tensorboard; on resume, TensorBoard drops events after resume_step.
    """

    def __init__(self, out_dir, *, resume_step: int | None = None, tensorboard: bool | None = None):
        if resume_step is not None:
            _int_arg(resume_step, "resume_step")
            if resume_step < 0:
                raise ValueError(f"resume_step must be >= 0 or None, got {resume_step}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / METRICS_FILE
        self.resume_step = resume_step
        if resume_step is None:
            self._file = open(self.path, "wb", buffering=0)
        else:
            self._rewrite_up_to(resume_step)
            self._file = open(self.path, "ab", buffering=0)
        try:
            self._tb = _tensorboard_writer(tensorboard, self.out_dir / "tensorboard",
                                           None if resume_step is None else resume_step + 1)
        except BaseException:
            self._file.close()
            raise

    @property
    def tensorboard_enabled(self) -> bool:
        """Whether scalars also go to TensorBoard."""
        return self._tb is not None

    def _rewrite_up_to(self, resume_step: int) -> None:
        kept = []
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                rec = _parse_line(line)
                if rec is not None and rec["global_step"] <= resume_step:
                    kept.append(line.strip() + "\n")
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(self.out_dir)

    def log(self, stage: str, step: int, global_step: int, metrics: Mapping) -> None:
        """Write one record: stage ("sft" / "rl" / "eval" ...), the stage's step, the global
        step (the x axis of every curve), the wall time, and the metrics as floats."""
        if self._file is None:
            raise ValueError("MetricsLogger is closed")
        if not isinstance(stage, str) or not stage:
            raise ValueError(f"stage must be a non-empty str, got {stage!r}")
        for name, v in (("step", step), ("global_step", global_step)):
            if _int_arg(v, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {v}")
        if not isinstance(metrics, Mapping):
            raise TypeError(f"metrics must be a dict of str -> number, got {type(metrics).__name__}")
        rec: dict = {"stage": stage, "step": step, "global_step": global_step, "time": time.time()}
        values: dict[str, float] = {}
        for key, value in metrics.items():
            if not isinstance(key, str):
                raise TypeError(f"metrics keys must be str, got {key!r}")
            if key in RESERVED_FIELDS:
                raise ValueError(f"metrics key {key!r} clashes with a record field {RESERVED_FIELDS}")
            try:
                values[key] = float(value)
            except (TypeError, ValueError):
                raise TypeError(f"metrics[{key!r}] must be a number, got {value!r}") from None
            rec[key] = values[key] if math.isfinite(values[key]) else None
        data = (json.dumps(rec, allow_nan=False) + "\n").encode("utf-8")
        self._file.write(data)  # unbuffered: one write call per line
        os.fsync(self._file.fileno())
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(f"{stage}/{key}", value, global_step)
            self._tb.flush()

    def close(self) -> None:
        """Close the file (and the TensorBoard writer); idempotent."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------

def _key_pairs(keys) -> list[tuple[str, str]]:
    """(label, key) pairs from a {label: key} mapping or a list of keys / (label, key) pairs."""
    if isinstance(keys, Mapping):
        return [(str(label), str(key)) for label, key in keys.items()]
    if isinstance(keys, str) or not isinstance(keys, Iterable):
        raise TypeError(f"keys must be a list of keys or (label, key) pairs, got {keys!r}")
    out = []
    for item in keys:
        if isinstance(item, str):
            out.append((item, item))
        elif isinstance(item, tuple) and len(item) == 2:
            out.append((str(item[0]), str(item[1])))
        else:
            raise TypeError(f"keys entries must be a key or a (label, key) pair, got {item!r}")
    return out


def format_metrics(metrics: Mapping, keys=DEFAULT_KEYS) -> str:
    """`label=value` for the chosen keys present in metrics (3 significant digits), joined by
    spaces: a compact line for logs and progress bars. Absent / None values are skipped."""
    parts = []
    for label, key in _key_pairs(keys):
        v = metrics.get(key)
        if v is None or isinstance(v, bool):
            continue
        parts.append(f"{label}={float(v):.3g}")
    return " ".join(parts)


class Progress:
    """A tqdm bar on stderr with a compact postfix of the latest metrics; enabled=False prints
    nothing at all (e.g. on non-zero ranks)."""

    def __init__(self, total: int, desc: str, *, enabled: bool = True, keys=DEFAULT_KEYS, initial: int = 0):
        """initial: steps already done (a resumed run)."""
        _int_arg(total, "total")
        _int_arg(initial, "initial")
        if total < 0 or not 0 <= initial <= total:
            raise ValueError(f"total must be >= 0 and initial in [0, total], got total={total}, initial={initial}")
        self.keys = _key_pairs(keys)
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, file=sys.stderr, dynamic_ncols=True)

    def update(self, metrics: Mapping | None = None) -> None:
        """Advance by one step and show the chosen metrics."""
        if self._bar is None:
            return
        if metrics:
            self._bar.set_postfix_str(format_metrics(metrics, self.keys), refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
