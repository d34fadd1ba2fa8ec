"""Plots, drawn from metrics.jsonl records alone: a run's learning curves, and per-method curves
over seeds for `axpo compare`. Each figure is on its own Agg canvas (no pyplot state)."""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path

from .logs import read_metrics

__all__ = ["plot_learning_curves", "plot_compare"]


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


def _moving_average(ys, window: int) -> list[float]:
    """Trailing mean over up to `window` points (the first points average what exists); NaN
    points are left out, and a window holding none gives NaN."""
    out, acc, n = [], 0.0, 0
    for i, y in enumerate(ys):
        if math.isfinite(y):
            acc, n = acc + y, n + 1
        if i >= window and math.isfinite(ys[i - window]):
            acc, n = acc - ys[i - window], n - 1
        out.append(acc / n if n else math.nan)
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


def plot_compare(curves: dict[str, list[list[float]]], png_path, ylabel: str, title: str | None = None, *,
                 steps: dict[str, list[list[float]]] | None = None, smooth: int = 1) -> str:
    """One curve per method: each seed's curve faint, the mean over seeds bold with a ± 1 std band
    (over the points every seed reached; NaN / None points are left out of the mean and std).

    curves: {method: [per-seed values]}. steps: the same shape, the x of each value (default
    0, 1, 2, ...). smooth: a trailing moving average over that many points, applied to every seed
    before the mean (1: none). Returns png_path."""
    import numpy as np

    if not isinstance(curves, Mapping) or not curves:
        raise ValueError("curves must be a non-empty dict {method: [per-seed curve, ...]}")
    if isinstance(smooth, bool) or not isinstance(smooth, int) or smooth < 1:
        raise ValueError(f"smooth must be an int >= 1, got {smooth!r}")
    fig, axes = _new_figure(1, 1, (8, 5))
    ax = axes[0, 0]
    for method, seeds in curves.items():
        if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Iterable):
            raise TypeError(f"curves[{method!r}] must be a list of per-seed curves")
        seeds = [np.asarray([np.nan if v is None else v for v in s], dtype=float) for s in seeds]
        if not seeds or any(s.ndim != 1 or s.size == 0 for s in seeds):
            raise ValueError(f"curves[{method!r}] must hold non-empty 1-D curves, one per seed")
        xs = [np.arange(s.size, dtype=float) for s in seeds]
        if steps is not None:
            xs = [np.asarray(x, dtype=float) for x in steps[method]]
            if len(xs) != len(seeds) or any(x.shape != s.shape for x, s in zip(xs, seeds)):
                raise ValueError(f"steps[{method!r}] must match the shape of curves[{method!r}]")
        if smooth > 1:
            seeds = [np.asarray(_moving_average(s.tolist(), smooth)) for s in seeds]
        color = None
        for x, s in zip(xs, seeds):
            (line,) = ax.plot(x, s, color=color, alpha=0.2, linewidth=0.8)
            color = line.get_color()
        n = min(s.size for s in seeds)
        stacked = np.stack([s[:n] for s in seeds])
        with np.errstate(all="ignore"):
            finite = np.isfinite(stacked)
            count = finite.sum(0)
            mean = np.where(finite, stacked, 0.0).sum(0) / count
            var = np.where(finite, (stacked - mean) ** 2, 0.0).sum(0) / np.maximum(count - 1, 1)
        x = xs[0][:n]
        ax.plot(x, mean, color=color, linewidth=2.0, label=f"{method} (n={len(seeds)})")
        if len(seeds) > 1:
            sd = np.sqrt(var)
            ax.fill_between(x, mean - sd, mean + sd, color=color, alpha=0.12, linewidth=0)
    ax.set_xlabel("RL step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, png_path)
