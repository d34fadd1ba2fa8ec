"""`axpo compare`: registered methods over seeds, each seed's methods from the same warm-start.

For each seed: one SFT warm-start (seed{s}/sft), then RL with each method from its sft_policy
(seed{s}/{method}): the same questions in the same order, the same start, the same held-out
evaluation. `jobs` > 1 runs that many `axpo train` processes at once (OMP_NUM_THREADS = cores //
jobs each unless set), a seed's methods after its warm-start. A run directory that already holds
the summary.json of the same config is reused, so an interrupted study resumes where it stopped.

Outputs: compare.md (per method mean ± std over seeds, paired differences with a 95% t interval
over seeds, per-seed rows, the AXPO diagnostics), compare.json (every run's numbers and curves)
and compare_*.png (per-method curves: mean and ± 1 std band over seeds).
"""
from __future__ import annotations

import copy
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

import numpy as np
import yaml

from ..algo.methods import get_method
from .checkpoint import SFT_POLICY
from .config import Config, config_to_dict
from .distributed import setup
from .logs import METRICS_FILE, read_metrics
from .plots import plot_compare
from .run import train

__all__ = ["compare", "compare_table", "paired_differences", "t_quantile_975", "run_record"]

# two-sided 95% quantiles of Student's t, df = 1..30
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)
# final-evaluation metrics of the outcome table ({k}: eval.samples), and what the runs' RL steps add
OUTCOME = ("pass@1", "pass@{k}", "pass@1_tool", "pass@1_no_tool", "tool_call_rate", "all_wrong_rate_tool")
DIAGNOSTICS = ("train_reward_last5", "tool_call_rate_last5", "all_wrong_rate_tool_last5",
               "all_wrong_rate_no_tool_first10", "all_wrong_rate_tool_first10", "triggered_frac_mean",
               "recovery_rate_mean", "prefixes_selected_mean", "confidence_selected_mean", "confidence_rest_mean")


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with df degrees of freedom (table to 30, then the
    normal quantile with its first correction term)."""
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"df must be an int >= 1, got {df!r}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df)


def paired_differences(runs: Sequence[Mapping], method: str, baseline: str, metric: str) -> dict | None:
    """method - baseline on `metric`, paired by seed (the seeds both have): {"n", "mean", "diffs"}
    and, from 2 pairs on, the sample "std" and the 95% paired-t interval "low" / "high" = mean ±
    t(n-1) * std / sqrt(n). None when no seed has both."""
    by = {(r["method"], r["seed"]): r["metrics"].get(metric) for r in runs}
    seeds = sorted({r["seed"] for r in runs if r["method"] == method})
    diffs = [by[(method, s)] - by[(baseline, s)] for s in seeds
             if by.get((method, s)) is not None and by.get((baseline, s)) is not None]
    if not diffs:
        return None
    mean = statistics.fmean(diffs)
    out = {"n": len(diffs), "mean": mean, "diffs": diffs}
    if len(diffs) >= 2:
        sd = statistics.stdev(diffs)
        half = t_quantile_975(len(diffs) - 1) * sd / math.sqrt(len(diffs))
        out.update(std=sd, low=mean - half, high=mean + half)
    return out


_EXTRA_LABELS = {"rollout_tokens": "rollout tokens", "wall_time_s": "wall time (s)"}


def _fmt(x: float, big: bool | None = None) -> str:
    """Counts (|x| >= 100) as integers with thousands separators, rates with 3 decimals."""
    big = abs(x) >= 100 if big is None else big
    return f"{x:,.0f}" if big else f"{x:.3f}"


def _mean_std(values: list[float], count: bool = False) -> str:
    """"mean ± std" (sample std, n - 1); "mean ± 0" for a single value (no spread measured).
    count: format as a count (no decimals) whatever the size."""
    if not values:
        return "—"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{_fmt(mean, True if count else None)} ± 0"
    big = count or abs(mean) >= 100
    return f"{_fmt(mean, big)} ± {_fmt(statistics.stdev(values), big)}"


def _number(run: dict, key: str, where: str) -> float | None:
    v = run.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{where}[{key!r}] must be a number, got {v!r}")
    return float(v)


def compare_table(runs: list[dict], metrics: list[str], extra: Sequence[str] = ("rollouts", "rollout_tokens")) -> str:
    """Markdown comparing methods over seeds.

    runs: dicts {"method": str, "seed": ..., "metrics": {name: final value}, and the run-level
        numbers named in `extra` (e.g. "rollouts", "rollout_tokens", "wall_time_s"; optional)}.
    metrics: the metric names to show; extra: the run-level columns after them.
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

    cols = list(metrics) + [_EXTRA_LABELS.get(e, e) for e in extra]

    def values(run: dict, i_where: str) -> list[float | None]:
        return ([_number(run["metrics"], m, f"{i_where}['metrics']") for m in metrics]
                + [_number(run, e, i_where) for e in extra])

    lines = ["| method | n | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for method, mruns in by_method.items():
        table = [values(r, f"run {method!r} seed {r['seed']!r}") for r in mruns]
        cells = [_mean_std([row[j] for row in table if row[j] is not None], count=j >= len(metrics))
                 for j in range(len(cols))]
        lines.append(f"| {method} | {len(mruns)} | " + " | ".join(cells) + " |")

    lines += ["", "| method | seed | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for method, mruns in by_method.items():
        for r in mruns:
            cells = ["—" if v is None else _fmt(v, True if j >= len(metrics) else None)
                     for j, v in enumerate(values(r, f"run {method!r}"))]
            lines.append(f"| {method} | {r['seed']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def run_record(method: str, seed, run_dir: str, summary: Mapping) -> dict:
    """One run's numbers for the study: its final evaluation, the means of its RL diagnostics
    over the first 10 / last 5 steps and over all steps, rollouts and tokens spent, wall time, and
    its curves (per RL step and per evaluation)."""
    lines = read_metrics(os.path.join(run_dir, METRICS_FILE))
    rl = [m for m in lines if m["stage"] == "rl"]
    evals = [m for m in lines if m["stage"] == "eval"]
    metrics = dict(summary.get("final_eval") or {})
    series = {key: [m.get(key) for m in rl] for key in ("pass1", "tool_call_rate", "all_wrong_rate_tool",
                                                          "all_wrong_rate_no_tool", "triggered_frac",
                                                          "recovery_rate", "prefixes_selected",
                                                          "confidence_selected_mean", "confidence_rest_mean")}
    metrics["train_reward_last5"] = _mean(series["pass1"][-5:])
    for key in ("tool_call_rate", "all_wrong_rate_tool"):
        metrics[f"{key}_last5"] = _mean(series[key][-5:])
    for key in ("all_wrong_rate_tool", "all_wrong_rate_no_tool"):
        metrics[f"{key}_first10"] = _mean(series[key][:10])
    for key in ("triggered_frac", "recovery_rate", "prefixes_selected", "confidence_selected_mean",
                "confidence_rest_mean"):
        name = key if key.endswith("_mean") else f"{key}_mean"
        metrics[name] = _mean(series[key])
    return {"method": method, "seed": seed, "metrics": {k: v for k, v in metrics.items() if v is not None},
            "rollouts": int(sum(m.get("rollouts", 0) or 0 for m in rl)),
            "rollout_tokens": int(sum(m.get("rollout_tokens", 0) or 0 for m in rl)),
            "wall_time_s": float(summary.get("wall_time_s", float("nan"))),
            "curves": {"eval_step": [m["step"] for m in evals], "eval_pass@1": [m.get("pass@1") for m in evals],
                       **series}}


def _finished(run_dir: str, cfg: Config) -> dict | None:
    """The summary of a finished run of exactly this config in run_dir, else None."""
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
        with open(os.path.join(run_dir, "config.yaml")) as f:
            same = yaml.safe_load(f) == json.loads(json.dumps(config_to_dict(cfg)))
    except (OSError, ValueError):
        return None
    return summary if same else None


class _Runner:
    """Runs `train(cfg)` for a list of configs, in this process (jobs=1) or `jobs` subprocesses."""

    def __init__(self, jobs: int):
        self.jobs = jobs
        self.env = dict(os.environ)
        if jobs > 1:
            self.env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
            for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
                self.env.pop(key, None)  # each child is a world of one on its own port

    def run_all(self, cfgs: Sequence[Config]) -> list[dict]:
        todo = [c for c in cfgs if _finished(c.log.output_dir, c) is None]
        if self.jobs == 1:
            for c in todo:
                train(c)
        else:
            running: list[tuple[subprocess.Popen, Config, object]] = []
            while todo or running:
                while todo and len(running) < self.jobs:
                    running.append(self._start(todo.pop(0)))
                time.sleep(0.5)
                for item in list(running):
                    proc, c, log = item
                    if proc.poll() is None:
                        continue
                    running.remove(item)
                    log.close()
                    if proc.returncode != 0:
                        for p, _, lg in running:
                            p.kill()
                            lg.close()
                        raise RuntimeError(f"axpo train for {c.log.output_dir} exited with {proc.returncode}; "
                                           f"its output is in {os.path.join(c.log.output_dir, 'train.log')}")
        out = []
        for c in cfgs:
            summary = _finished(c.log.output_dir, c)
            if summary is None:
                raise RuntimeError(f"{c.log.output_dir} has no summary.json after its run")
            out.append(summary)
        return out

    def _start(self, c: Config):
        os.makedirs(c.log.output_dir, exist_ok=True)
        path = os.path.join(c.log.output_dir, "run_config.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(config_to_dict(c), f, sort_keys=False)
        log = open(os.path.join(c.log.output_dir, "train.log"), "w")
        proc = subprocess.Popen([sys.executable, "-m", "axpo.cli", "train", "--config", path], env=self.env,
                                stdout=log, stderr=subprocess.STDOUT)
        return proc, c, log


def compare(cfg: Config, seeds: Sequence[int], methods: Sequence[str] = ("grpo", "axpo"), *,
            output_dir: str | None = None, jobs: int = 1) -> dict:
    """For each seed: one SFT warm-start, then RL with each method from it (same data, same
    starting weights). Writes compare.md, compare.json and compare_*.png; returns
    {"runs", "table", "output_dir"} (the table and directory on the main rank)."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an int >= 1, got {jobs!r}")
    if jobs > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("jobs > 1 runs its own processes: launch axpo compare without torchrun for that")
    dist = setup(cfg.trainer.device) if jobs == 1 else None
    out = output_dir or os.path.join(os.path.dirname(cfg.log.output_dir.rstrip("/")) or ".", "compare")
    runner = _Runner(jobs)
    t0 = time.perf_counter()
    sft_cfgs, method_cfgs = [], []
    for seed in seeds:
        base = copy.deepcopy(cfg)
        base.seed = seed
        base.log.plot = False
        sft_dir = os.path.join(out, f"seed{seed}", "sft")
        if cfg.sft.steps > 0:
            sft_cfg = copy.deepcopy(base)
            sft_cfg.rl.steps = 0
            sft_cfg.eval.questions = 0
            sft_cfg.log.output_dir = sft_dir
            sft_cfgs.append(sft_cfg)
        for method in methods:
            run_cfg = copy.deepcopy(base)
            run_cfg.rl.algorithm = method
            run_cfg.sft.steps = 0
            if cfg.sft.steps > 0:
                run_cfg.model.name_or_path = os.path.join(sft_dir, SFT_POLICY)
            run_cfg.log.output_dir = os.path.join(out, f"seed{seed}", method)
            method_cfgs.append(run_cfg.validate())
    runner.run_all(sft_cfgs)  # the warm-starts first (each seed's methods start from its own)
    summaries = runner.run_all(method_cfgs)
    runs = [run_record(c.rl.algorithm, c.seed, c.log.output_dir, s) for c, s in zip(method_cfgs, summaries)]
    result: dict = {"runs": runs}
    if dist is None or dist.is_main:
        result.update(write_study(cfg, runs, out, seeds=list(seeds), wall_time_s=time.perf_counter() - t0))
    return result


def write_study(cfg: Config, runs: list[dict], out: str, *, seeds: list, wall_time_s: float) -> dict:
    """compare.md / compare.json / compare_*.png of a study's runs (run_record dicts)."""
    os.makedirs(out, exist_ok=True)
    k = cfg.eval.samples
    outcome = [m.format(k=k) for m in OUTCOME]
    methods = list(dict.fromkeys(r["method"] for r in runs))
    header = (f"# {' vs '.join(methods)} on {cfg.task.name}"
              + (f" ({cfg.task.regime})" if cfg.task.name == "zoom_digits" else "") + "\n\n"
              f"Seeds {seeds}; per seed one SFT warm-start ({cfg.sft.steps} steps) shared by the methods, then "
              f"{cfg.rl.steps} RL steps of {cfg.rl.questions_per_step} questions x rollouts per question: "
              + ", ".join(f"{m} {get_method(m).group_size(cfg.rl.group_size, cfg.rl.ratio)}" for m in methods)
              + f"; the resampling methods add r={cfg.rl.ratio}, K={cfg.rl.k}. Final evaluation: {cfg.eval.questions} held-out questions x "
              f"{k} samples (temperature {cfg.eval.temperature}). Study wall time {wall_time_s / 60:.1f} min "
              f"(the runs' own: wall time column).\n\n")
    lines = ["## Outcome (final held-out evaluation; rollouts and tokens over all RL steps)\n",
             compare_table(runs, outcome, extra=("rollouts", "rollout_tokens", "wall_time_s")),
             "## Paired differences over seeds (95% paired-t interval: mean ± t(n-1) · sd / √n)\n"]
    pairs = [("axpo", b) for b in methods if b != "axpo"] if "axpo" in methods else []
    if pairs:
        lines.append("| difference | metric | n | mean | sd | 95% interval | per seed |")
        lines.append("|---|---|---|---|---|---|---|")
        for m, b in pairs:
            for metric in ("pass@1", f"pass@{k}"):
                d = paired_differences(runs, m, b, metric)
                if d is None:
                    continue
                interval = f"[{d['low']:+.3f}, {d['high']:+.3f}]" if "low" in d else "—"
                sd = f"{d['std']:.3f}" if "std" in d else "—"
                per_seed = ", ".join(f"{x:+.3f}" for x in d["diffs"])
                lines.append(f"| {m} − {b} | {metric} | {d['n']} | {d['mean']:+.3f} | {sd} | {interval} | {per_seed} |")
        lines.append("")
    lines += ["## Diagnostics (means over RL steps: first 10, last 5, or all)\n",
              compare_table(runs, list(DIAGNOSTICS), extra=())]
    text = header + "\n".join(lines)
    with open(os.path.join(out, "compare.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "compare.json"), "w") as f:
        json.dump(runs, f, indent=2, default=float)
    for name, key, ylabel, x in (("eval_pass1", "eval_pass@1", "held-out pass@1", "eval_step"),
                                 ("train_reward", "pass1", "train reward (pass1)", None),
                                 ("tool_call_rate", "tool_call_rate", "tool-call rate (train rollouts)", None),
                                 ("all_wrong_tool", "all_wrong_rate_tool", "all-wrong rate, tool-using subgroups",
                                  None)):
        curves = {m: [r["curves"][key] for r in runs if r["method"] == m] for m in methods}
        steps = {m: [r["curves"][x] for r in runs if r["method"] == m] for m in methods} if x else None
        plot_compare(curves, os.path.join(out, f"compare_{name}.png"), ylabel=ylabel, title=f"{ylabel}, per method",
                     steps=steps, smooth=5 if x is None else 1)
    return {"table": text, "output_dir": out}
