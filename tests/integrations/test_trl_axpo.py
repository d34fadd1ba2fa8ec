"""The AXPO step inside TRL: AxpoGRPOTrainer with a resampling method, on a tiny Qwen3 that calls a
tool (trained here for a few seconds to write Qwen3-style `<tool_call>` turns), TRL's own
generation, tool loop and reward functions.

Skipped without trl, unless AXPO_REQUIRE_TRL=1 (then a missing trl fails).
Run: AXPO_REQUIRE_TRL=1 .venv/bin/python -m pytest tests/integrations/test_trl_axpo.py -q
"""
from __future__ import annotations

import math
import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", message="TRL currently supports vLLM")
if os.environ.get("AXPO_REQUIRE_TRL") == "1":
    import trl  # noqa: F401
else:
    pytest.importorskip("trl")

from datasets import Dataset
from trl import GRPOTrainer
from trl.trainer.utils import split_tensor_dict

import axpo.integrations.trl as axpo_trl
from axpo.algo import span_confidence
from axpo.integrations.trl import AxpoGRPOConfig, AxpoGRPOTrainer

from ..rollout._template import build_qwen_like_tokenizer

QUESTIONS = [("What is 2+3?", 2, 3), ("What is 4+4?", 4, 4)]
G, K, GA = 4, 2, 2
EPS = 1e-4  # TRL's std guard


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first integer.
        b: The second integer.
    """
    return a + b


def _tool_tokenizer():
    from trl.chat_template_utils import add_response_schema, qwen3_chat_template

    tok = build_qwen_like_tokenizer(thinking=False)
    tok.chat_template = qwen3_chat_template  # TRL's Qwen3 template: it parses tool calls with its schema
    return add_response_schema(tok)


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory):
    """A tiny Qwen3 fitted to answer each question by calling add, then stating the sum."""
    from axpo.models.tiny import build_tiny_policy

    d = tmp_path_factory.mktemp("tool_qwen3")
    tok = _tool_tokenizer()
    model, _ = build_tiny_policy(tok, vision=False, seed=0)
    texts = []
    for q, a, b in QUESTIONS:
        call = {"type": "function", "function": {"name": "add", "arguments": {"a": a, "b": b}}}
        texts.append(tok.apply_chat_template(
            [{"role": "user", "content": q}, {"role": "assistant", "content": "", "tool_calls": [call]},
             {"role": "tool", "name": "add", "content": str(a + b)},
             {"role": "assistant", "content": f"The answer is {a + b}."}], tools=[add], tokenize=False))
    enc = tok(texts, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    model.save_pretrained(str(d / "model"))
    tok.save_pretrained(str(d / "tokenizer"))
    return d


class _FailFirstBatch:
    """A TRL reward function that fails every rollout of the first generation batch (so every
    group triggers) and, on the continuations that follow, passes every other one (so every
    selected prefix recovers); later calls score by the answer."""

    def __init__(self):
        self.calls = []

    def __call__(self, completions, **kwargs):
        self.calls.append(len(completions))
        if len(self.calls) == 1:
            return [0.0] * len(completions)
        if len(self.calls) == 2:
            return [float(j % 2 == 0) for j in range(len(completions))]
        return [float("The answer is" in c[-1]["content"]) for c in completions]


def _axpo_trainer(tool_model, tmp_path, reward, **kw):
    from transformers import AutoTokenizer

    cfg = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=G, num_generations=G,
               max_completion_length=96, gradient_accumulation_steps=GA, report_to="none", use_cpu=True,
               bf16=False, logging_steps=1, save_strategy="no", max_steps=2, beta=0.0,
               use_bias_correction_kl=False, disable_dropout=True, seed=0,
               axpo_method="axpo", axpo_ratio=0.5, axpo_k=K)  # P = floor(0.5 * 2 * 4 / 2) = 2 prefixes
    cfg.update(kw)
    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q, _, _ in QUESTIONS]})
    return AxpoGRPOTrainer(model=str(tool_model / "model"), reward_funcs=reward, args=AxpoGRPOConfig(**cfg),
                           train_dataset=ds, processing_class=AutoTokenizer.from_pretrained(
                               str(tool_model / "tokenizer")), tools=[add])


def _spy(trainer, monkeypatch):
    """Records every generation batch the trainer returns, and each step's records and plan
    (with the policy's own log-probs of each candidate at planning time)."""
    seen = {"batches": [], "plans": [], "generation_prompts": []}
    generate = trainer._generate_and_score_completions
    single_turn = trainer._generate_single_turn

    def turns(prompt_ids, *args, **kwargs):
        seen["generation_prompts"].append([list(p) for p in prompt_ids])
        return single_turn(prompt_ids, *args, **kwargs)

    def batches(inputs):
        out = generate(inputs)
        seen["batches"].append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in out.items()})
        return out

    plan_resample = axpo_trl.plan_resample

    def plans(records, *args, **kwargs):
        plan = plan_resample(records, *args, **kwargs)
        seen["plans"].append((records, plan))
        return plan

    trainer._generate_and_score_completions = batches
    trainer._generate_single_turn = turns
    monkeypatch.setattr(axpo_trl, "plan_resample", plans)
    return seen


def _std(xs):
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def test_axpo_step_in_a_trl_run(tool_model, tmp_path, monkeypatch):
    reward = _FailFirstBatch()
    trainer = _axpo_trainer(tool_model, tmp_path, reward)
    seen = _spy(trainer, monkeypatch)
    trainer.train()
    tok = trainer.processing_class
    open_id = tok.convert_tokens_to_ids("<tool_call>")
    response_id = tok.convert_tokens_to_ids("<tool_response>")

    batch = seen["batches"][0]
    records, plan = seen["plans"][0]
    N = len(QUESTIONS) * G
    # every rollout of the first batch calls the tool and fails: both groups trigger
    assert plan.triggered == [0, 1] and all(r.uses_tools for r in records)
    # uncertainty ranking, breadth first: each group's least confident candidate
    assert len(plan.selected) == 2 and {c.group_id for c in plan.selected} == {0, 1}
    for c in plan.selected:
        group = [span_confidence(r) for r in records if r.group_id == c.group_id]
        assert c.confidence == min(group) and c.confidence < 1.0
    # the candidates' log-probs are the sampling policy's (on-policy: the model before the update)
    assert all(r.logprobs[r.tool_calls[0].start:r.tool_calls[0].end].lt(0).all() for r in records)

    E = len(plan.selected) * K
    assert batch["completion_ids"].shape[0] == N + E and batch["advantages"].shape == batch["completion_ids"].shape
    cm, tm, adv = batch["completion_mask"], batch["tool_mask"], batch["advantages"]
    sources = [c for c in plan.selected for _ in range(K)]
    # TRL's generation was asked to continue exactly prompt + prefix, once per continuation
    prefixes = [records[c.uid].token_ids[:c.prefix_len].tolist() for c in sources]
    assert prefixes in seen["generation_prompts"]
    cont_rewards = [float(j % 2 == 0) for j in range(E)]  # what _FailFirstBatch returned for them
    for j, c in enumerate(sources):
        row, src = N + j, c.uid
        cut = c.prefix_len - records[src].prompt_len
        assert cut >= 1 and batch["completion_ids"][src, cut - 1] == open_id  # cut right after <tool_call>
        # generated from the fixed prefix: same prompt, same completion tokens up to the cut
        assert torch.equal(batch["prompt_ids"][row], batch["prompt_ids"][src])
        assert torch.equal(batch["completion_ids"][row, :cut], batch["completion_ids"][src, :cut])
        # Eq. 2 on the continuation's own model tokens; the prefix copy and tool results untrained
        mine = cont_rewards[j - j % K:j - j % K + K]
        a = (cont_rewards[j] - sum(mine) / K) / (_std(mine) + EPS)
        n = int(cm[row].sum())
        trained = (cm[row] * tm[row]).bool()
        assert not trained[:cut].any() and trained[cut:n].any() and not trained[n:].any()
        assert not trained[batch["completion_ids"][row] == response_id].any()
        torch.testing.assert_close(adv[row][trained], torch.full((int(trained.sum()),), a), atol=1e-5, rtol=0)
    for c in plan.selected:  # Eq. 3-4: the source trains its prefix only, with its reward replaced by 1
        src, cut = c.uid, c.prefix_len - records[c.uid].prompt_len
        trained = (cm[src] * tm[src]).bool()
        assert trained[:cut].all() and not trained[cut:].any()
        group = [1.0] + [0.0] * (G - 1)
        a = (1.0 - 1.0 / G) / (_std(group) + EPS)
        torch.testing.assert_close(adv[src, :cut], torch.full((cut,), a), atol=1e-5, rtol=0)
    chosen = {c.uid for c in plan.selected}
    for i in range(N):  # the other originals keep TRL's advantage: 0 in an all-wrong group
        if i not in chosen:
            assert adv[i][(cm[i] * tm[i]).bool()].abs().max() == 0
    assert batch["num_items_in_batch"] == (cm * tm).sum()

    # the fused loss on the extended batch equals TRL's own loss on it (per-token advantages)
    trainer.current_gradient_accumulation_steps = GA
    for mb in split_tensor_dict(batch, GA):
        grads = []
        for fn in (AxpoGRPOTrainer._compute_loss, GRPOTrainer._compute_loss):
            trainer.model.zero_grad(set_to_none=True)
            loss = fn(trainer, trainer.model, mb)
            loss.backward()
            grads.append((loss.detach(), [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]))
        (la, ga), (lb, gb) = grads
        torch.testing.assert_close(la, lb, atol=1e-6, rtol=1e-5)
        assert max(g.abs().max() for g in gb) > 0
        for x, y in zip(ga, gb):
            torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)

    logs = [h for h in trainer.state.log_history if "axpo/n_triggered" in h]
    assert len(logs) == 2
    first = logs[0]
    assert first["axpo/n_triggered"] == 2 and first["axpo/prefixes_selected"] == 2
    assert first["axpo/n_continuations"] == E and first["axpo/rows_added"] == E
    assert first["axpo/recovery_rate"] == 1.0 and first["axpo/tool_call_rate"] == 1.0
    assert first["axpo/prefix_budget"] == 2 and "axpo/confidence_mean" in first and "loss" in first


def test_nothing_triggers_keeps_trls_batch(tool_model, tmp_path, monkeypatch):
    """AXPO without a triggered group is GRPO: the batch is TRL's, row for row."""
    trainer = _axpo_trainer(tool_model, tmp_path, lambda completions, **kw: [1.0] * len(completions), max_steps=1)
    seen = _spy(trainer, monkeypatch)
    trainer.train()
    batch = seen["batches"][0]
    assert batch["completion_ids"].shape[0] == len(QUESTIONS) * G and batch["advantages"].dim() == 1
    logs = [h for h in trainer.state.log_history if "axpo/n_triggered" in h]
    assert logs[0]["axpo/n_triggered"] == 0 and logs[0]["axpo/rows_added"] == 0


@pytest.mark.parametrize("method", ["axpo", "axpo-no-fix"])
def test_rows_split_evenly_into_micro_batches(tool_model, tmp_path, monkeypatch, method):
    """K = 3 from one prefix is 3 rows; the prefix gets a 4th so 2 micro-batches split them evenly.
    axpo-no-fix resamples from the prompt (cut 0) and gives the source no prefix credit."""
    reward = _FailFirstBatch()
    trainer = _axpo_trainer(tool_model, tmp_path, reward, axpo_method=method, axpo_k=3, axpo_ratio=0.375,
                            max_steps=1)  # P = floor(0.375 * 8 / 3) = 1
    seen = _spy(trainer, monkeypatch)
    trainer.train()
    batch = seen["batches"][0]
    records, plan = seen["plans"][0]
    N = len(QUESTIONS) * G
    assert len(plan.selected) == 1 and batch["completion_ids"].shape[0] == N + 4
    src = plan.selected[0].uid
    cut = plan.selected[0].prefix_len - records[src].prompt_len
    assert cut == (0 if method == "axpo-no-fix" else 1)
    cm, tm, adv = batch["completion_mask"], batch["tool_mask"], batch["advantages"]
    rewards = [1.0, 0.0, 1.0, 0.0]
    for j in range(4):
        trained = (cm[N + j] * tm[N + j]).bool()
        a = (rewards[j] - 0.5) / (_std(rewards) + EPS)
        torch.testing.assert_close(adv[N + j][trained], torch.full((int(trained.sum()),), a), atol=1e-5, rtol=0)
    src_trained = (cm[src] * tm[src]).bool()
    if method == "axpo-no-fix":  # no credit: the source is an ordinary rollout (advantage 0 here)
        assert src_trained.sum() == records[src].trainable.sum() and adv[src][src_trained].abs().max() == 0
    else:
        assert src_trained[:cut].all() and not src_trained[cut:].any()


def test_resampling_setups_refused_or_warned(tool_model, tmp_path):
    with pytest.raises(ValueError, match="scale_rewards"):
        AxpoGRPOConfig(output_dir=str(tmp_path), axpo_method="axpo", scale_rewards="batch", use_cpu=True,
                       report_to="none")
    with pytest.raises(ValueError, match="num_generations"):
        AxpoGRPOConfig(output_dir=str(tmp_path), axpo_method="grpo-matched", use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match="rollout_func"):
        from transformers import AutoTokenizer
        AxpoGRPOTrainer(model=str(tool_model / "model"), reward_funcs=lambda completions, **kw: [0.0],
                        args=AxpoGRPOConfig(output_dir=str(tmp_path), axpo_method="axpo", use_cpu=True,
                                            report_to="none", per_device_train_batch_size=4, num_generations=4),
                        train_dataset=Dataset.from_dict({"prompt": ["a"]}),
                        processing_class=AutoTokenizer.from_pretrained(str(tool_model / "tokenizer")),
                        rollout_func=lambda prompts, trainer: {})
    with pytest.warns(UserWarning, match="never triggers"):
        from transformers import AutoTokenizer
        AxpoGRPOTrainer(model=str(tool_model / "model"), reward_funcs=lambda completions, **kw: [0.0],
                        args=AxpoGRPOConfig(output_dir=str(tmp_path), axpo_method="axpo", use_cpu=True,
                                            report_to="none", per_device_train_batch_size=4, num_generations=4),
                        train_dataset=Dataset.from_dict({"prompt": ["a"]}),
                        processing_class=AutoTokenizer.from_pretrained(str(tool_model / "tokenizer")))


def test_readme_snippet(tool_model, tmp_path, monkeypatch):
    """README's "AXPO inside TRL" snippet, verbatim but for the paths."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tool_model").symlink_to(tool_model)
    from datasets import Dataset
    from transformers import AutoTokenizer

    from axpo.integrations.trl import AxpoGRPOConfig, AxpoGRPOTrainer

    def add(a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: The first integer.
            b: The second integer.
        """
        return a + b

    def correct(completions, answer, **kwargs):  # 1 when the final message states the answer
        return [float(str(a) in c[-1]["content"]) for c, a in zip(completions, answer)]

    args = AxpoGRPOConfig(
        output_dir="out", num_generations=4, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        max_completion_length=96, max_steps=2, beta=0.0, logging_steps=1, report_to="none",
        save_strategy="no", use_cpu=True, bf16=False,
        axpo_method="axpo", axpo_ratio=0.5, axpo_k=2,   # P = floor(0.5 * 2 * 4 / 2) = 2 prefixes per batch
    )
    trainer = AxpoGRPOTrainer(
        model="tool_model/model", reward_funcs=correct, args=args, tools=[add],
        train_dataset=Dataset.from_dict({"prompt": [[{"role": "user", "content": "What is 2+3?"}],
                                                    [{"role": "user", "content": "What is 4+4?"}]],
                                         "answer": [5, 8]}),
        processing_class=AutoTokenizer.from_pretrained("tool_model/tokenizer"),
    )
    trainer.train()   # logs axpo/n_triggered, axpo/prefixes_selected, axpo/recovery_rate, ...

    logs = [h for h in trainer.state.log_history if "axpo/n_triggered" in h]
    assert len(logs) == 2 and all(h["axpo/prefix_budget"] == 2 for h in logs)
