"""The reports of axpo.train: Pass@k and the eval summary (evaluate), the metrics log and progress
(logs), plots, the comparison table and paired differences (compare)."""
from __future__ import annotations

import importlib.util
import itertools
import json
import math
import sys
from fractions import Fraction

import pytest
import torch

from axpo.algo import Rollout, ToolCallRecord
from axpo.train.compare import compare_table, paired_differences, t_quantile_975
from axpo.train.evaluate import eval_summary, pass_at_k
from axpo.train.logs import MetricsLogger, Progress, format_metrics, read_metrics
from axpo.train.plots import plot_compare, plot_learning_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- pass@k

def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of the k-subsets of n samples (the first c correct) holding a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_enumeration():
    for n in range(1, 7):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_known_values_and_large_n():
    assert pass_at_k(10, 1, 1) == pytest.approx(0.1)
    assert pass_at_k(5, 1, 4) == pytest.approx(0.8)
    assert pass_at_k(8, 0, 8) == 0.0 and pass_at_k(8, 8, 1) == 1.0
    assert pass_at_k(4, 2, 3) == 1.0  # n - c < k: every 3-subset holds a correct one
    # huge binomials: compare with exact rational arithmetic
    n, c, k = 2000, 7, 300
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)
    assert pass_at_k(10**6, 3, 1) == pytest.approx(3e-6, rel=1e-9)


@pytest.mark.parametrize("args, exc, match", [
    ((4, 5, 1), ValueError, "c must"), ((4, -1, 1), ValueError, "c must"),
    ((4, 1, 0), ValueError, "k must"), ((4, 1, 5), ValueError, "k must"),
    ((0, 0, 1), ValueError, "n must"), ((4.0, 1, 1), TypeError, "n must"),
    ((4, True, 1), TypeError, "c must"),
])
def test_pass_at_k_errors(args, exc, match):
    with pytest.raises(exc, match=match):
        pass_at_k(*args)


# ---------------------------------------------------------------- eval_summary

def rollout(group_id: int, uid: int, reward: float, tool: bool) -> Rollout:
    """A minimal 6-token record; one tool call spanning tokens [2, 5) when tool."""
    calls = [ToolCallRecord(start=2, end=5, open_end=3, name="zoom", arguments={})] if tool else []
    return Rollout(token_ids=torch.arange(6), logprobs=torch.zeros(6), trainable=torch.ones(6, dtype=torch.bool),
                   group_id=group_id, uid=uid, tool_calls=calls, reward=reward)


def eval_batch() -> list[Rollout]:
    spec = {  # group: [(reward, uses tools), ...]
        0: [(1.0, True), (0.0, True), (0.0, False), (0.0, False)],
        1: [(0.0, True), (0.0, True), (0.0, True), (1.0, False)],
        2: [(1.0, False), (0.0, False), (0.0, False), (0.0, False), (0.0, False)],
    }
    out, uid = [], 0
    for g, samples in spec.items():
        for reward, tool in samples:
            out.append(rollout(g, uid, reward, tool))
            uid += 1
    return out


def test_eval_summary_by_hand():
    s = eval_summary(eval_batch())
    assert s["n_questions"] == 3 and s["n_samples"] == 13
    assert s["tool_call_rate"] == pytest.approx(5 / 13)
    # default ks: 1, 2, 4 (smallest group has 4 samples)
    assert sorted(k for k in s if k.startswith("pass@") and k[5:].isdigit()) == ["pass@1", "pass@2", "pass@4"]
    # all samples: g0 n=4 c=1, g1 n=4 c=1, g2 n=5 c=1
    assert s["pass@1"] == pytest.approx((0.25 + 0.25 + 0.2) / 3)
    assert s["pass@2"] == pytest.approx((0.5 + 0.5 + 0.4) / 3)     # 1 - C(3,2)/C(4,2); 1 - C(4,2)/C(5,2)
    assert s["pass@4"] == pytest.approx((1.0 + 1.0 + 0.8) / 3)     # 1 - C(4,4)/C(5,4) = 0.8
    # tool samples: g0 n=2 c=1, g1 n=3 c=0, g2 none
    assert s["n_questions_tool@1"] == 2 and s["pass@1_tool"] == pytest.approx(0.25)
    assert s["n_questions_tool@2"] == 2 and s["pass@2_tool"] == pytest.approx(0.5)
    assert s["n_questions_tool@4"] == 0 and "pass@4_tool" not in s
    # no-tool samples: g0 n=2 c=0, g1 n=1 c=1, g2 n=5 c=1
    assert s["n_questions_no_tool@1"] == 3 and s["pass@1_no_tool"] == pytest.approx((0 + 1 + 0.2) / 3)
    assert s["n_questions_no_tool@2"] == 2 and s["pass@2_no_tool"] == pytest.approx((0 + 0.4) / 2)
    assert s["n_questions_no_tool@4"] == 1 and s["pass@4_no_tool"] == pytest.approx(0.8)
    # all wrong: tool-using samples of g0 (1 right) no, g1 (0 of 3) yes; no-tool ones of g0 yes, g1 and g2 no
    assert s["all_wrong_rate_tool"] == pytest.approx(1 / 2) and s["all_wrong_rate_no_tool"] == pytest.approx(1 / 3)
    assert all(isinstance(v, float) and math.isfinite(v) for v in s.values())


def test_eval_summary_ks_and_errors():
    rs = eval_batch()
    s = eval_summary(rs, ks=[3, 1])
    assert "pass@3" in s and "pass@1" in s and "pass@2" not in s
    assert s["pass@3"] == pytest.approx((pass_at_k(4, 1, 3) * 2 + pass_at_k(5, 1, 3)) / 3)
    # default ks end with the smallest group size when it is not a power of two
    three = [rollout(g, 10 * g + i, float(i == 0), False) for g in range(2) for i in range(3)]
    assert {k for k in eval_summary(three) if k[5:].isdigit()} == {"pass@1", "pass@2", "pass@3"}
    with pytest.raises(ValueError, match=r"ks\[1\] must satisfy 1 <= k <= the smallest group size \(4\)"):
        eval_summary(rs, ks=[1, 5])
    with pytest.raises(ValueError, match="rollouts must be non-empty"):
        eval_summary([])
    unscored = rollout(0, 99, 0.0, False)
    unscored.reward = None
    with pytest.raises(ValueError, match="no reward"):
        eval_summary([unscored])


# ---------------------------------------------------------------- MetricsLogger

def test_metrics_logger_lines_and_nan(tmp_path):
    with MetricsLogger(tmp_path / "run", tensorboard=False) as log:
        log.log("sft", 0, 0, {"loss": 2.0, "lr": 1e-5, "grad_norm": 3})
        log.log("rl", 0, 1, {"pass1": 0.5, "kl": float("nan"), "grad_norm": float("inf")})
    path = tmp_path / "run" / "metrics.jsonl"
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert list(first)[:4] == ["stage", "step", "global_step", "time"]
    assert first["stage"] == "sft" and first["global_step"] == 0 and first["grad_norm"] == 3.0
    assert '"kl": null' in lines[1] and '"grad_norm": null' in lines[1]
    recs = read_metrics(path)
    assert recs[1]["kl"] is None and recs[1]["pass1"] == 0.5
    with pytest.raises(ValueError, match="closed"):
        log.log("rl", 1, 2, {})


def test_metrics_logger_rejects_bad_input(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        with pytest.raises(TypeError, match=r"metrics\['x'\] must be a number"):
            log.log("rl", 0, 0, {"x": "abc"})
        with pytest.raises(ValueError, match="clashes"):
            log.log("rl", 0, 0, {"step": 1.0})
        with pytest.raises(ValueError, match="global_step must be >= 0"):
            log.log("rl", 0, -1, {})
    assert read_metrics(tmp_path / "metrics.jsonl") == []


def test_metrics_logger_resume_truncates_and_drops_partial_line(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for g in range(6):
            log.log("rl", g, g, {"loss": float(g)})
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as f:  # a writer killed mid-line
        f.write('{"stage": "rl", "step": 6, "global_st')
    assert [r["global_step"] for r in read_metrics(path)] == list(range(6))

    with MetricsLogger(tmp_path, resume_step=3, tensorboard=False) as log:
        assert [r["global_step"] for r in read_metrics(path)] == [0, 1, 2, 3]
        log.log("rl", 4, 4, {"loss": 40.0})
    recs = read_metrics(path)
    assert [r["global_step"] for r in recs] == [0, 1, 2, 3, 4] and recs[-1]["loss"] == 40.0
    assert not (tmp_path / "metrics.jsonl.tmp").exists()

    MetricsLogger(tmp_path, tensorboard=False).close()  # resume_step None: a fresh file
    assert path.read_text() == ""


def test_read_metrics_garbled_middle_line_is_an_error(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"stage": "rl", "step": 0, "global_step": 0}\nxx garbage\n'
                    '{"stage": "rl", "step": 1, "global_step": 1}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(path)
    path.write_text('{"stage": "rl", "step": 0, "global_step": 0}\n\x00\x00garbage')
    assert len(read_metrics(path)) == 1


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_tensorboard_required_but_missing(tmp_path):
    with pytest.raises(ImportError, match=r"tensorboard=True\) needs the tensorboard package"):
        MetricsLogger(tmp_path, tensorboard=True)
    with MetricsLogger(tmp_path) as log:  # None: off when not importable
        assert not log.tensorboard_enabled


# ---------------------------------------------------------------- plots

def write_run(path, n_rl: int = 25, full: bool = True):
    with MetricsLogger(path, tensorboard=False) as log:
        for s in range(3):
            log.log("sft", s, s, {"loss": 2.0 - s * 0.1, "lr": 1e-5, "grad_norm": 1.0})
        for s in range(n_rl):
            g = 3 + s
            m = {"loss": 1.0 / (1 + s)}
            if full:
                m.update(pass1=0.3 + 0.01 * s, pass1_tool=0.2 + 0.01 * s, pass1_no_tool=0.35,
                         tool_call_rate=0.3 + 0.02 * s, all_wrong_rate_tool=0.4, all_wrong_rate_no_tool=0.25,
                         triggered_frac=0.3, kl=1e-3 * s, clipfrac=0.05, grad_norm=1.0, lr=1e-6)
                if s % 3:  # absent on some steps, as step_diagnostics omits empty rates
                    m.update(recovery_rate=0.2, triggered_groups_recovered_frac=0.12)
            log.log("rl", s, g, m)
            if full and s % 10 == 0:
                log.log("eval", s, g, {"pass@1": 0.4 + 0.01 * s, "pass@4": 0.6, "pass@1_tool": 0.3,
                                       "pass@1_no_tool": 0.45, "tool_call_rate": 0.3, "n_questions": 8.0})
    return path / "metrics.jsonl"


@pytest.mark.parametrize("full", [True, False])
def test_plot_learning_curves(tmp_path, full):
    had_pyplot = "matplotlib.pyplot" in sys.modules
    metrics = write_run(tmp_path, full=full)
    out = plot_learning_curves(metrics, tmp_path / "plots" / "curves.png", title="run")
    data = open(out, "rb").read()
    assert out == str(tmp_path / "plots" / "curves.png")
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    assert ("matplotlib.pyplot" in sys.modules) == had_pyplot  # no pyplot global state


def test_plot_learning_curves_empty_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    out = plot_learning_curves(tmp_path / "metrics.jsonl", tmp_path / "c.png")
    assert open(out, "rb").read().startswith(PNG_MAGIC)


def test_plot_compare(tmp_path):
    curves = {"grpo": [[0.1, 0.2, 0.3], [0.2, 0.3, 0.4, 0.5]], "axpo": [[0.2, None, 0.5]]}
    out = plot_compare(curves, tmp_path / "cmp.png", "pass@1", title="cmp")
    assert open(out, "rb").read().startswith(PNG_MAGIC)
    with pytest.raises(ValueError, match=r"curves\['x'\]"):
        plot_compare({"x": []}, tmp_path / "bad.png", "y")


# ---------------------------------------------------------------- progress

def test_format_metrics():
    m = {"pass1": 0.123456, "tool_call_rate": 0.5, "loss": 1234.5, "kl": None, "other": 1.0}
    assert format_metrics(m) == "reward=0.123 tool=0.5 loss=1.23e+03"
    assert format_metrics(m, ["loss", ("r", "pass1")]) == "loss=1.23e+03 r=0.123"
    assert format_metrics(m, {"t": "tool_call_rate"}) == "t=0.5"


def test_progress_disabled_prints_nothing(capsys):
    with Progress(3, "rl", enabled=False) as bar:
        for _ in range(3):
            bar.update({"pass1": 0.5, "loss": 0.1})
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_progress_shows_postfix(capsys):
    with Progress(2, "rl") as bar:
        bar.update({"pass1": 0.25, "triggered_frac": 0.3333333, "loss": 0.5})
        bar.update({"pass1": 0.5, "triggered_frac": 0.3333333, "loss": 0.25})
    err = capsys.readouterr().err
    assert "rl" in err and "2/2" in err
    assert "reward=0.5 trig=0.333 loss=0.25" in err


# ---------------------------------------------------------------- comparison

def test_compare_table_numbers():
    runs = []
    for seed, (p1, toks) in enumerate([(0.5, 1000), (0.6, 2000), (0.7, 3000)]):
        runs.append({"method": "grpo", "seed": seed, "metrics": {"pass@1": p1, "pass@4": 0.8},
                     "rollouts": 100, "rollout_tokens": toks})
    for seed, (p1, n) in enumerate([(0.6, 120), (0.6, 130), (0.9, 140)]):
        runs.append({"method": "axpo", "seed": seed, "metrics": {"pass@1": p1},
                     "rollouts": n, "rollout_tokens": 5000})
    table = compare_table(runs, ["pass@1", "pass@4"])
    summary, per_seed = table.strip().split("\n\n")
    rows = summary.splitlines()
    assert rows[0] == "| method | n | pass@1 | pass@4 | rollouts | rollout tokens |"
    # grpo: mean 0.6, sample std 0.1; tokens mean 2000, std 1000
    assert rows[2] == "| grpo | 3 | 0.600 ± 0.100 | 0.800 ± 0.000 | 100 ± 0 | 2,000 ± 1,000 |"
    # axpo: mean 0.7, std sqrt((0.01 + 0.01 + 0.04) / 2) = 0.173; rollouts 130 ± 10; pass@4 missing
    assert rows[3] == "| axpo | 3 | 0.700 ± 0.173 | — | 130 ± 10 | 5,000 ± 0 |"
    seed_rows = per_seed.splitlines()
    assert len(seed_rows) == 2 + 6
    assert seed_rows[2] == "| grpo | 0 | 0.500 | 0.800 | 100 | 1,000 |"
    assert seed_rows[-1] == "| axpo | 2 | 0.900 | — | 140 | 5,000 |"


def test_compare_table_single_seed_and_errors():
    table = compare_table([{"method": "sft", "seed": 0, "metrics": {"pass@1": 0.4}}], ["pass@1"])
    assert "| sft | 1 | 0.400 ± 0 | — | — |" in table
    run = {"method": "a", "seed": 0, "metrics": {}}
    with pytest.raises(ValueError, match="repeats method 'a' seed 0"):
        compare_table([run, dict(run)], ["x"])
    with pytest.raises(ValueError, match=r"runs\[0\] must have a 'metrics' field"):
        compare_table([{"method": "a", "seed": 0}], ["x"])


def test_paired_differences_and_the_t_interval():
    runs = [{"method": m, "seed": s, "metrics": {"pass@1": v}} for m, s, v in
            [("axpo", 0, 0.6), ("axpo", 1, 0.5), ("axpo", 2, 0.9), ("grpo", 0, 0.5), ("grpo", 1, 0.5),
             ("grpo", 2, 0.6), ("grpo", 3, 0.1)]]
    d = paired_differences(runs, "axpo", "grpo", "pass@1")
    assert d["n"] == 3 and d["diffs"] == pytest.approx([0.1, 0.0, 0.3])  # seed 3 has no pair
    assert d["mean"] == pytest.approx(0.4 / 3)
    sd = math.sqrt(((0.1 - 0.4 / 3) ** 2 + (0.4 / 3) ** 2 + (0.3 - 0.4 / 3) ** 2) / 2)
    assert d["std"] == pytest.approx(sd)
    assert (d["low"], d["high"]) == pytest.approx((0.4 / 3 - 4.303 * sd / math.sqrt(3), 0.4 / 3 + 4.303 * sd / math.sqrt(3)))
    one = paired_differences(runs[:1] + runs[3:4], "axpo", "grpo", "pass@1")
    assert one["n"] == 1 and "low" not in one
    assert paired_differences(runs, "axpo", "drgrpo", "pass@1") is None
    assert (t_quantile_975(1), t_quantile_975(4), t_quantile_975(30)) == (12.706, 2.776, 2.042)
    assert 1.96 < t_quantile_975(1000) < t_quantile_975(31) < 2.042
    with pytest.raises(ValueError, match="df must be an int >= 1"):
        t_quantile_975(0)


def test_compare_table_extra_columns():
    runs = [{"method": "grpo", "seed": 0, "metrics": {"pass@1": 0.5}, "wall_time_s": 120.0}]
    table = compare_table(runs, ["pass@1"], extra=("wall_time_s",))
    assert table.splitlines()[0] == "| method | n | pass@1 | wall time (s) |"
    assert "| grpo | 1 | 0.500 ± 0 | 120 ± 0 |" in table
