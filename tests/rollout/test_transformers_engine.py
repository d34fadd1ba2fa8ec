"""The transformers engine on tiny Qwen3-VL and Qwen3 models: positions and vision inputs against
the model's own forward, forked-prefix resampling against recomputed prefixes, seeds, tool calls
with images in later turns, weight loading."""
import numpy as np
import pytest
import torch
from PIL import Image

from axpo.algo import Stream
from axpo.models import build_tiny_policy, policy_from_model
from axpo.rollout import Prompt, SamplingSettings, TransformersEngine, TurnRequest
from axpo.tools import default_registry

from ._scripted import ForceScript

ZOOM = '<think>look</think><tool_call>{"name": "zoom", "arguments": {"bbox_2d": [0, 0, 16, 16]}}</tool_call>'


def _image(seed=0, size=32):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8"))


@pytest.fixture(scope="module", params=["vl", "text"])
def policy(request):
    model, tok = build_tiny_policy(vision=request.param == "vl", seed=0, initializer_range=0.2)
    return policy_from_model(model, tok)


def _prompts(policy, n=2):
    images = [[_image(i)] if policy.is_vision else [] for i in range(n)]
    # different lengths, so the batch is left padded
    return [Prompt("What is shown?" + "?" * (3 * i), images[i], answer="3") for i in range(n)]


def test_batched_left_padded_prefill_matches_the_models_own_forward(policy):
    """Positions (3-D mrope for Qwen3-VL), mm_token_type_ids and pixel values built by the engine
    give the same next-token logits as one unpadded forward where the model computes its own."""
    engine = TransformersEngine(policy, tools=default_registry())
    prompts = _prompts(policy, 3)
    reqs = [TurnRequest(i, engine.chat.prompt(p.question, p.images), p.images) for i, p in enumerate(prompts)]
    batched = engine.sampler.first_token_logits(reqs)
    for i, (req, p) in enumerate(zip(reqs, prompts)):
        ids = torch.tensor([req.token_ids])
        kw = {}
        if policy.is_vision:
            pv, grid = policy.image_processor(p.images[0])
            kw = dict(pixel_values=pv, image_grid_thw=grid[None],
                      mm_token_type_ids=(ids == engine.chat.image_pad).long())
        with torch.no_grad():
            policy.model.model.rope_deltas = None
            ref = policy.model(input_ids=ids, **kw).logits[0, -1]
        torch.testing.assert_close(batched[i], ref, rtol=1e-4, atol=1e-4)


def test_fixed_seed_reproduces_rollouts_and_another_seed_differs(policy):
    engine = TransformersEngine(policy, tools=default_registry())
    sampling = SamplingSettings(max_new_tokens=12, seed=5)
    a = engine.generate(_prompts(policy), sampling, n=2)
    b = engine.generate(_prompts(policy), sampling, n=2)
    c = engine.generate(_prompts(policy), SamplingSettings(max_new_tokens=12, seed=6), n=2)
    assert all(torch.equal(x.token_ids, y.token_ids) and torch.equal(x.logprobs, y.logprobs) for x, y in zip(a, b))
    assert any(not torch.equal(x.token_ids, y.token_ids) for x, y in zip(a, c))
    for r in a:
        model_tokens = r.trainable.sum().item()
        ended_by_eos = r.token_ids[-1].item() in engine.chat.eos_ids
        if r.finish_reason == "length":
            assert model_tokens == 12
        else:
            assert r.finish_reason == "stop" and ended_by_eos and model_tokens < 12
        assert (r.logprobs[r.trainable] < 0).all() and (r.entropies[r.trainable] > 0).all()


def test_recorded_logprobs_are_the_models(policy):
    """The sampled tokens' log-probs and entropies equal a teacher-forced forward of the whole rollout."""
    engine = TransformersEngine(policy, tools=default_registry())
    prompt = _prompts(policy, 1)[0]
    [r] = engine.generate([prompt], SamplingSettings(max_new_tokens=10, seed=1, temperature=0.7), n=1)
    ids = r.token_ids[None]
    kw = {}
    if policy.is_vision:
        pv, grid = policy.image_processor(prompt.images[0])
        kw = dict(pixel_values=pv, image_grid_thw=grid[None], mm_token_type_ids=(ids == engine.chat.image_pad).long())
    with torch.no_grad():
        policy.model.model.rope_deltas = None
        logits = policy.model(input_ids=ids, **kw).logits[0, :-1].double() / 0.7
    logp = torch.log_softmax(logits, -1)
    target = r.token_ids[1:]
    expected = logp.gather(-1, target[:, None])[:, 0]
    entropy = -(logp.exp() * logp).sum(-1)
    m = r.trainable[1:]
    torch.testing.assert_close(r.logprobs[1:][m].double(), expected[m], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(r.entropies[1:][m].double(), entropy[m], rtol=1e-4, atol=1e-4)


def test_forked_prefix_gives_the_same_next_token_logits_as_a_recomputed_prefix(policy):
    engine = TransformersEngine(policy, tools=default_registry())
    rollouts = engine.generate(_prompts(policy), SamplingSettings(max_new_tokens=16, seed=0), n=2)
    reqs_fork, reqs_fresh = [], []
    for i, r in enumerate(rollouts):
        n = r.turns[1].start + 3 + i  # prefixes of different lengths, from rows with different padding
        ids = r.token_ids[:n].tolist()
        reqs_fork.append(TurnRequest(100 + i, ids, r.images, fork_from=(r.uid, n)))
        reqs_fresh.append(TurnRequest(200 + i, ids, r.images))
    before = engine.stats["prefill_tokens_saved"]
    forked = engine.sampler.first_token_logits(reqs_fork)
    saved = engine.stats["prefill_tokens_saved"] - before
    assert saved == sum(len(q.token_ids) - 1 for q in reqs_fork)
    fresh = engine.sampler.first_token_logits(reqs_fresh)
    torch.testing.assert_close(forked, fresh, rtol=1e-4, atol=1e-4)
    # after a weight update the old KV is gone: a fork request falls back to a full prefill
    engine.load_weights(policy.model.state_dict())
    before = engine.stats["prefill_tokens_saved"]
    torch.testing.assert_close(engine.sampler.first_token_logits(reqs_fork), fresh, rtol=1e-4, atol=1e-4)
    assert engine.stats["prefill_tokens_saved"] == before


def test_tool_call_with_zoom_image_in_the_next_turn_then_resample_from_the_forked_cut(policy):
    engine = TransformersEngine(policy, tools=default_registry())
    engine.sampler.logits_processor = ForceScript(engine.chat, [ZOOM, "<answer>3</answer><|im_end|>"])
    sampling = SamplingSettings(max_new_tokens=120, seed=0)
    sources = engine.generate(_prompts(policy), sampling, n=2)
    for r in sources:
        assert [t.role for t in r.turns] == ["prompt", "model", "tool", "model"], engine.chat.decode(r.token_ids.tolist())
        [call] = r.tool_calls
        if policy.is_vision:
            assert call.error is None and call.num_images == 1 and len(r.images) == 2
            tool = r.turns[2]
            assert (r.token_ids[tool.start:tool.end] == engine.chat.image_pad).sum() == \
                policy.image_processor.num_image_tokens(r.images[1])
        else:  # no image to zoom into: an error returned to the model, and the rollout goes on
            assert call.num_images == 0 and len(r.images) == 0
        assert r.reward == 1.0
    # resample from right after the first <tool_call> tag, with the forced script now free
    engine.sampler.logits_processor = None
    saved_before = engine.stats["prefill_tokens_saved"]
    cuts = [(r, r.tool_calls[0].open_end) for r in sources[:2]]
    groups = engine.resample(cuts, k=3, sampling=SamplingSettings(max_new_tokens=8, seed=1))
    assert engine.stats["prefill_tokens_saved"] - saved_before == sum(3 * (cut - 1) for _, cut in cuts)
    assert engine.stats["fork_fallbacks"] == 0
    for (src, cut), conts in zip(cuts, groups):
        assert len(conts) == 3
        for c in conts:
            assert c.stream == Stream.CONTINUATION and c.prefix_len == cut and c.source_uid == src.uid
            assert torch.equal(c.token_ids[:cut], src.token_ids[:cut])
            assert c.trainable[cut:].any()


def test_load_weights_changes_samples_and_validates(policy):
    engine = TransformersEngine(policy, tools=default_registry())
    state = {k: v.clone() for k, v in policy.model.state_dict().items()}
    sampling = SamplingSettings(max_new_tokens=8, seed=0, temperature=0)
    a = engine.generate(_prompts(policy, 1), sampling, n=1)[0]
    try:
        head = [k for k in state if k.endswith("lm_head.weight")][0]
        engine.load_weights({head: torch.randn_like(state[head]) * 5})
        b = engine.generate(_prompts(policy, 1), sampling, n=1)[0]
        assert not torch.equal(a.token_ids, b.token_ids)
        with pytest.raises(ValueError, match="unknown parameter"):
            engine.load_weights({"nope.weight": torch.zeros(1)})
        with pytest.raises(ValueError, match="must have shape"):
            engine.load_weights({head: torch.zeros(1)})
    finally:
        engine.load_weights(state)
