"""Reporting for training runs: Pass@k evaluation, the metrics log, learning curves, progress
bars, and the method-comparison table.

Everything here is plain Python on floats (matplotlib / tqdm / TensorBoard are imported only by
the functions that use them), so the trainer can log from its hot loop and the plots can be
redrawn from `metrics.jsonl` alone, on any machine, after a crash.

    with MetricsLogger(out_dir, resume_step=ckpt_step) as log, Progress(n_steps, "rl") as bar:
        for step in ...:
            log.log("rl", step, global_step, metrics)   # one fsynced JSON line
            bar.update(metrics)
    plot_learning_curves(out_dir / "metrics.jsonl", out_dir / "curves.png")
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from axpo.algo import _checks
from axpo.algo.records import Stream

__all__ = [
    "DEFAULT_KEYS",
    "METRICS_FILE",
    "MetricsLogger",
    "Progress",
    "compare_table",
    "eval_summary",
    "format_metrics",
    "pass_at_k",
    "plot_compare",
    "plot_learning_curves",
    "read_metrics",
]

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
# Pass@k
# --------------------------------------------------------------------------------------------

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k from n samples of which c are correct (Chen et al. 2021):
    1 - C(n-c, k) / C(n, k), the chance that k samples drawn without replacement contain a
    correct one. Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i): no huge binomials, stable.
    """
    n, c, k = _int_arg(n, "n"), _int_arg(c, "c"), _int_arg(k, "k")
    if n < 1:
        raise ValueError(f"n must be >= 1 (samples drawn), got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"c must satisfy 0 <= c <= n (n={n}), got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must satisfy 1 <= k <= n (n={n}), got {k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def _default_ks(smallest: int) -> list[int]:
    ks, k = [], 1
    while k <= smallest:
        ks.append(k)
        k *= 2
    if ks[-1] != smallest:
        ks.append(smallest)
    return ks


def eval_summary(rollouts, ks=None) -> dict[str, float]:
    """Pass@k of an evaluation: rollouts grouped by group_id (one question, n samples each;
    correct = reward > 0), the unbiased estimator averaged over questions.

    Keys (floats): n_questions, n_samples, tool_call_rate, and for each k in ks:
        pass@k                   over all samples of every question;
        pass@k_tool, pass@k_no_tool: over the tool-using / no-tool samples only, averaged over
            the questions that have >= k such samples (absent when none has), with the counts
            n_questions_tool@k / n_questions_no_tool@k (always present).
    ks default: 1, 2, 4, ... (powers of two) up to the smallest group size, plus that size.
    A k larger than the smallest group is a ValueError (Pass@k needs >= k samples everywhere).
    """
    rollouts = _checks.rollout_list(rollouts, "rollouts")
    if not rollouts:
        raise ValueError("rollouts must be non-empty: nothing to evaluate")
    # per question: [n, c, n_tool, c_tool, n_no_tool, c_no_tool]
    stats: dict[int, list[int]] = {}
    for i, r in enumerate(rollouts):
        if r.stream != Stream.ORIGINAL:
            raise ValueError(f"rollouts[{i}] must have stream ORIGINAL (independent samples), "
                             f"got {r.stream.value!r}")
        ok = int(_checks.is_correct(_checks.reward_of(r, f"rollouts[{i}]")))
        s = stats.setdefault(r.group_id, [0] * 6)
        j = 2 if r.uses_tools else 4
        s[0] += 1
        s[1] += ok
        s[j] += 1
        s[j + 1] += ok
    smallest = min(s[0] for s in stats.values())
    if ks is None:
        ks = _default_ks(smallest)
    else:
        if isinstance(ks, (int, str)) or not isinstance(ks, Iterable):
            raise TypeError(f"ks must be a list of ints, got {type(ks).__name__}")
        ks = list(ks)
        if not ks:
            raise ValueError("ks must be non-empty")
        for i, k in enumerate(ks):
            _int_arg(k, f"ks[{i}]")
            if not 1 <= k <= smallest:
                raise ValueError(f"ks[{i}] must satisfy 1 <= k <= the smallest group size "
                                 f"({smallest}), got {k}")
        ks = sorted(set(ks))

    n_samples = sum(s[0] for s in stats.values())
    out: dict[str, float] = {
        "n_questions": float(len(stats)),
        "n_samples": float(n_samples),
        "tool_call_rate": sum(s[2] for s in stats.values()) / n_samples,
    }
    for k in ks:
        out[f"pass@{k}"] = statistics.fmean(pass_at_k(s[0], s[1], k) for s in stats.values())
        for name, j in (("tool", 2), ("no_tool", 4)):
            vals = [pass_at_k(s[j], s[j + 1], k) for s in stats.values() if s[j] >= k]
            out[f"n_questions_{name}@{k}"] = float(len(vals))
            if vals:
                out[f"pass@{k}_{name}"] = statistics.fmean(vals)
    return out


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
# Learning curves
# --------------------------------------------------------------------------------------------

def _new_figure(nrows: int, ncols: int, figsize):
    """A Figure on its own Agg canvas: no pyplot state, the user's backend untouched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig, png_path) -> str:
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    return str(png_path)


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(global steps, values) of the records that have a finite `key`."""
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(r["global_step"])
            ys.append(float(v))
    return xs, ys


def _moving_average(ys: list[float], window: int) -> list[float]:
    """Trailing mean over up to `window` points (the first points average what exists)."""
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= window:
            acc -= ys[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _plot_noisy(ax, xs, ys, label, color=None, smooth=True) -> None:
    """Raw points faint plus a light moving average when there are enough points."""
    window = max(1, len(ys) // 20)
    if smooth and len(ys) >= 10 and window > 1:
        (raw,) = ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(xs, _moving_average(ys, window), color=raw.get_color(), linewidth=1.8,
                label=f"{label} (avg {window})")
    else:
        ax.plot(xs, ys, color=color, linewidth=1.5, marker="." if len(ys) < 30 else None, label=label)


def _panel(ax, title: str, records: list[dict], keys, *, ylabel=None, smooth=True, ylim=None) -> bool:
    """Draw keys (key or (key, label)) from records; "no data" when none has any point."""
    ax.set_title(title, fontsize=10)
    drawn = False
    for item in keys:
        key, label = (item, item) if isinstance(item, str) else item
        xs, ys = _series(records, key)
        if xs:
            _plot_noisy(ax, xs, ys, label, smooth=smooth)
            drawn = True
    return _finish(ax, drawn, ylabel=ylabel, ylim=ylim)


def _finish(ax, drawn, *, ylabel=None, ylim=None) -> bool:
    """Axis labels, grid and legend of a drawn panel, or "no data"; returns whether drawn."""
    if not drawn:
        _no_data(ax)
        return False
    ax.set_xlabel("global step", fontsize=8)
    if ylabel:
        ax.set_ylabel(ylabel, fontsize=8)
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.tick_params(labelsize=8)
    return True


def _no_data(ax) -> None:
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


def _pass_ks(records: list[dict]) -> list[int]:
    ks = set()
    for r in records:
        for key in r:
            if key.startswith("pass@") and key[5:].isdigit():
                ks.add(int(key[5:]))
    return sorted(ks)


def plot_learning_curves(metrics_path, png_path, title: str | None = None, *, rl_stage: str = "rl",
                         eval_stage: str = "eval") -> str:
    """A 2x3 grid of RL learning curves from a metrics.jsonl, against the global step:
    (a) train reward (pass1, tool / no-tool), (b) eval Pass@1 and the largest Pass@k logged,
    (c) tool-call rate, (d) all-wrong rates of tool vs no-tool subgroups, (e) AXPO trigger /
    recovery, (f) loss, with KL and clip fraction on a twin axis. A panel without data says so.
    Returns png_path (as a str).
    """
    records = read_metrics(metrics_path)
    rl = [r for r in records if r.get("stage") == rl_stage]
    ev = [r for r in records if r.get("stage") == eval_stage]
    fig, axes = _new_figure(2, 3, (16, 9))
    a, b, c, d, e, f = axes.flat
    unit = (-0.03, 1.03)

    _panel(a, "(a) train reward (pass1)", rl,
           [("pass1", "all"), ("pass1_tool", "tool"), ("pass1_no_tool", "no tool")], ylim=unit)

    ks = _pass_ks(ev)
    eval_keys = [("pass@1", "pass@1")] if 1 in ks else []
    if ks and ks[-1] != 1:
        eval_keys.append((f"pass@{ks[-1]}", f"pass@{ks[-1]}"))
    eval_keys += [("pass@1_tool", "pass@1 tool"), ("pass@1_no_tool", "pass@1 no tool")]
    _panel(b, "(b) eval Pass@k", ev, eval_keys, smooth=False, ylim=unit)

    c.set_title("(c) tool-call rate", fontsize=10)
    xs, ys = _series(rl, "tool_call_rate")
    if xs:
        _plot_noisy(c, xs, ys, "train")
    xe, ye = _series(ev, "tool_call_rate")
    if xe:
        c.plot(xe, ye, marker="o", linewidth=1.2, label="eval")
    _finish(c, bool(xs or xe), ylim=unit)

    _panel(d, "(d) all-wrong rate of subgroups", rl,
           [("all_wrong_rate_tool", "tool-using"), ("all_wrong_rate_no_tool", "no-tool")], ylim=unit)
    _panel(e, "(e) AXPO trigger / recovery", rl,
           [("triggered_frac", "triggered groups"), ("recovery_rate", "prefix recovery"),
            ("triggered_groups_recovered_frac", "triggered groups recovered")], ylim=unit)

    twin = [(k, c_) for k, c_ in (("kl", "tab:red"), ("clipfrac", "tab:green")) if _series(rl, k)[0]]
    if _panel(f, "(f) loss / KL / clipfrac", rl, [("loss", "loss")], ylabel="loss") and twin:
        f2 = f.twinx()
        for key, color in twin:
            xs, ys = _series(rl, key)
            _plot_noisy(f2, xs, ys, key, color=color)
        f2.set_ylabel("kl / clipfrac", fontsize=8)
        f2.tick_params(labelsize=8)
        h1, l1 = f.get_legend_handles_labels()
        h2, l2 = f2.get_legend_handles_labels()
        f.legend(h1 + h2, l1 + l2, fontsize=7, loc="best")
    elif twin:  # no loss: KL / clipfrac on the main axis
        f.cla()
        _panel(f, "(f) KL / clipfrac", rl, [k for k, _ in twin])

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, png_path)


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


# --------------------------------------------------------------------------------------------
# Comparing methods
# --------------------------------------------------------------------------------------------

def _fmt(x: float, big: bool | None = None) -> str:
    """Counts (|x| >= 100) as integers with thousands separators, rates with 3 decimals."""
    big = abs(x) >= 100 if big is None else big
    return f"{x:,.0f}" if big else f"{x:.3f}"


def _mean_std(values: list[float]) -> str:
    """"mean ± std" (sample std, n - 1); "mean ± 0" for a single value (no spread measured)."""
    if not values:
        return "—"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{_fmt(mean)} ± 0"
    big = abs(mean) >= 100
    return f"{_fmt(mean, big)} ± {_fmt(statistics.stdev(values), big)}"


def _number(run: dict, key: str, where: str) -> float | None:
    v = run.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{where}[{key!r}] must be a number, got {v!r}")
    return float(v)


def compare_table(runs: list[dict], metrics: list[str]) -> str:
    """Markdown comparing methods over seeds.

    runs: dicts {"method": str, "seed": ..., "metrics": {name: final value}, "rollouts": int,
        "rollout_tokens": int} (the last two optional). metrics: the metric names to show.
    Returns a summary table (one row per method, in first-appearance order: mean ± sample std,
    n - 1 denominator, "± 0" with a single seed; column n = seeds) then a per-seed table. A value a
    run lacks shows as "—" and is left out of its method's mean.
    """
    if not isinstance(runs, (list, tuple)) or not runs:
        raise ValueError("runs must be a non-empty list of run dicts")
    if isinstance(metrics, str) or not isinstance(metrics, (list, tuple)):
        raise TypeError(f"metrics must be a list of metric names, got {metrics!r}")
    by_method: dict[str, list[dict]] = {}
    seen = set()
    for i, run in enumerate(runs):
        if not isinstance(run, Mapping):
            raise TypeError(f"runs[{i}] must be a dict, got {type(run).__name__}")
        for field in ("method", "seed", "metrics"):
            if field not in run:
                raise ValueError(f"runs[{i}] must have a {field!r} field")
        if not isinstance(run["metrics"], Mapping):
            raise TypeError(f"runs[{i}]['metrics'] must be a dict, got {type(run['metrics']).__name__}")
        key = (str(run["method"]), run["seed"])
        if key in seen:
            raise ValueError(f"runs[{i}] repeats method {key[0]!r} seed {key[1]!r}")
        seen.add(key)
        by_method.setdefault(key[0], []).append(run)

    cols = list(metrics) + ["rollouts", "rollout tokens"]

    def values(run: dict, i_where: str) -> list[float | None]:
        return ([_number(run["metrics"], m, f"{i_where}['metrics']") for m in metrics]
                + [_number(run, "rollouts", i_where), _number(run, "rollout_tokens", i_where)])

    lines = ["| method | n | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for method, mruns in by_method.items():
        table = [values(r, f"run {method!r} seed {r['seed']!r}") for r in mruns]
        cells = [_mean_std([row[j] for row in table if row[j] is not None]) for j in range(len(cols))]
        lines.append(f"| {method} | {len(mruns)} | " + " | ".join(cells) + " |")

    lines += ["", "| method | seed | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for method, mruns in by_method.items():
        for r in mruns:
            cells = ["—" if v is None else _fmt(v) for v in values(r, f"run {method!r}")]
            lines.append(f"| {method} | {r['seed']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_compare(curves: dict[str, list[list[float]]], png_path, ylabel: str, title: str | None = None) -> str:
    """One curve per method vs step: each seed's curve faint, the mean over seeds bold (over
    the steps every seed reached; NaN / None points are left out of the mean). Returns png_path."""
    import numpy as np

    if not isinstance(curves, Mapping) or not curves:
        raise ValueError("curves must be a non-empty dict {method: [per-seed curve, ...]}")
    fig, axes = _new_figure(1, 1, (8, 5))
    ax = axes[0, 0]
    for method, seeds in curves.items():
        if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Iterable):
            raise TypeError(f"curves[{method!r}] must be a list of per-seed curves")
        seeds = [np.asarray([np.nan if v is None else v for v in s], dtype=float) for s in seeds]
        if not seeds or any(s.ndim != 1 or s.size == 0 for s in seeds):
            raise ValueError(f"curves[{method!r}] must hold non-empty 1-D curves, one per seed")
        color = None
        for s in seeds:
            (line,) = ax.plot(np.arange(s.size), s, color=color, alpha=0.25, linewidth=0.8)
            color = line.get_color()
        n = min(s.size for s in seeds)
        stacked = np.stack([s[:n] for s in seeds])
        with np.errstate(all="ignore"):
            finite = np.isfinite(stacked)
            mean = np.where(finite, stacked, 0.0).sum(0) / finite.sum(0)
        ax.plot(np.arange(n), mean, color=color, linewidth=2.0, label=f"{method} (n={len(seeds)})")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, png_path)
