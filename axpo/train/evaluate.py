"""Evaluation: Pass@k (the unbiased estimator) of rollouts grouped by question, with the tool-using
and no-tool samples broken out, and the `axpo eval` job (a saved policy on a task split)."""
from __future__ import annotations

import os
import statistics
from collections.abc import Iterable

from axpo.algo import _checks
from axpo.records import Stream

from .build import build_engine, build_policy, build_task, derive_seed, quiet, sampling_settings
from .checks import check_inputs
from .checkpoint import FINAL_POLICY
from .config import Config
from .distributed import DistInfo, all_gather_objects, setup

__all__ = ["pass_at_k", "eval_summary", "evaluate_engine", "evaluate"]




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

    Keys (floats): n_questions, n_samples, tool_call_rate; all_wrong_rate_tool /
    all_wrong_rate_no_tool: the fraction of questions whose tool-using / no-tool samples are all
    wrong, over the questions that have such samples (absent when none has); and for each k in ks:
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
    for name, j in (("tool", 2), ("no_tool", 4)):
        wrong = [s[j + 1] == 0 for s in stats.values() if s[j] > 0]
        if wrong:
            out[f"all_wrong_rate_{name}"] = statistics.fmean(wrong)
    for k in ks:
        out[f"pass@{k}"] = statistics.fmean(pass_at_k(s[0], s[1], k) for s in stats.values())
        for name, j in (("tool", 2), ("no_tool", 4)):
            vals = [pass_at_k(s[j], s[j + 1], k) for s in stats.values() if s[j] >= k]
            out[f"n_questions_{name}@{k}"] = float(len(vals))
            if vals:
                out[f"pass@{k}_{name}"] = statistics.fmean(vals)
    return out


def evaluate_engine(engine, task, cfg: Config, dist: DistInfo, *, split: str, questions: int, samples: int,
                    seed: int) -> tuple[dict, list]:
    """Pass@k on `questions` examples of `split` with `samples` rollouts each (sharded over ranks);
    returns (eval_summary, all rollouts)."""
    prompts = task.prompts(split, 0, questions, wrap=True)
    mine = [(i, p) for i, p in enumerate(prompts) if i % dist.world == dist.rank]
    for i, p in mine:
        p.group_id = i
    engine.reset_uids(dist.rank, dist.world)
    sampling = sampling_settings(cfg, derive_seed(seed, "eval", dist.rank), cfg.eval.temperature)
    rollouts = engine.generate([p for _, p in mine], sampling, n=samples, retain_prefixes=False) if mine else []
    everything = [r for part in all_gather_objects(rollouts) for r in part]
    return eval_summary(everything), everything  # Pass@1, 2, 4, ... up to `samples`


def evaluate(cfg: Config, policy_path: str | None, *, split: str | None = None, questions: int | None = None,
             samples: int | None = None) -> dict:
    """Pass@1 / Pass@k of a saved policy (default: output_dir/final) on a task split."""
    questions = cfg.eval.questions if questions is None else questions
    samples = cfg.eval.samples if samples is None else samples
    for name, value in (("questions", questions), ("samples", samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    split = cfg.task.eval_split if split is None else split
    dist = setup(cfg.trainer.device)
    quiet()
    task = build_task(cfg)
    path = policy_path or os.path.join(cfg.log.output_dir, FINAL_POLICY)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no saved policy at {path}: train first, or pass the policy directory")
    check_inputs(cfg, task, splits={"the evaluated split (--split, or config task.eval_split)": split})
    policy = build_policy(cfg, task, path)
    engine = build_engine(cfg, policy, dist.device, path)
    try:
        summary, _ = evaluate_engine(engine, task, cfg, dist, split=split, questions=questions, samples=samples,
                                     seed=derive_seed(cfg.seed, "eval"))
    finally:
        engine.shutdown()
    return summary
