"""Images through vLLM: the vLLM engine's multimodal path (Qwen3-VL, images in
`multi_modal_data`) against transformers, on a tiny Qwen3-VL saved to a local directory.

Runs only in the environment of scripts/vllm_images_env.sh (vLLM's Qwen3-VL imports torchvision,
which the main environment cannot have beside its CPU torch); elsewhere the module skips before
importing anything of vLLM. AXPO_REQUIRE_VLLM_IMAGES=1 (the script sets it) turns the skip into
an error.

The tiny model (text head_dim 32: vLLM's CPU attention needs >= 32; vision patch 4, merge 2) is
trained for 200 steps to write one conversation: look at the image, call `zoom`, answer. Checks,
all in float32 on CPU, through `VllmEngine(..., colocate=True)`:
(a) a prompt with an image: vLLM's per-token log-probs of what it sampled equal a teacher-forced
    transformers forward on the same tokens and image;
(b) the zoom tool's crop as a second image, in a tool-response turn: the same, for the
    continuation after that image (the trained answer, and an untrained continuation);
(c) greedy decoding through the whole agent loop (image, zoom call, crop, answer) gives the same
    tokens as the transformers engine, and the same log-probs up to the placeholder mass below;
(d) a resample cut right after the `<tool_call>` of an image rollout: the prefix comes from
    vLLM's prefix cache, the continuations' log-probs are the model's.
The images matter: the same log-probs against a forward with another image differ by > 100 x TOL.

Log-prob convention: vLLM's processed log-probs are of the softmax WITHOUT the vision
placeholders (`<|image_pad|>`, `<|video_pad|>`, `<|vision_start|>`, `<|vision_end|>`), which the
sampler bans with a logit bias; the transformers engine records the full softmax. The reference
here leaves them out as vLLM does; (c) corrects the transformers engine's by log(1 - their mass).
Measured (2026-12-02, Xeon with AVX-512): max |vLLM - transformers| <= 9e-6 per token over
(a)-(d) and image sizes 16..128 px (square and not); against the full softmax up to 0.13 on
untrained text, 0.56 in (c). TOL = 1e-4.

The sampler sends one `<|image_pad|>` per image to vLLM (`VllmSampler._vllm_prompt_ids`): vLLM
expands every pad of a token prompt into the image's run, so an expanded run would be expanded
again (16 pads -> 31) and (a) and (b) would fail by ~10 nats.
"""
import os

import pytest

REQUIRED = os.environ.get("AXPO_REQUIRE_VLLM_IMAGES") == "1"
try:
    import torchvision  # noqa: F401  (vLLM's Qwen3-VL imports it)
    import vllm  # noqa: F401
except Exception as e:  # ImportError, or a torchvision built for another torch (RuntimeError)
    if REQUIRED:
        raise
    pytest.skip(f"needs the environment of scripts/vllm_images_env.sh ({type(e).__name__}: {e})",
                allow_module_level=True)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from axpo.models import build_tiny_policy, policy_from_model, save_policy  # noqa: E402
from axpo.models.inputs import batch_inputs  # noqa: E402
from axpo.rollout import ChatFormat, Prompt, SamplingSettings, TransformersEngine, TurnRequest  # noqa: E402
from axpo.rollout import VllmEngine  # noqa: E402
from axpo.tools import ToolContext, default_registry  # noqa: E402

TOL = 1e-4  # absolute, per token; measured <= 9e-6 (module docstring); -s prints the measurements
BLOCK = 32  # vLLM's KV block on CPU must be a multiple of 32
QUESTION = "Which digit?"
ZOOM = '<think>look</think><tool_call>{"name": "zoom", "arguments": {"bbox_2d": [0, 0, 16, 16]}}</tool_call>'
ANSWER = "<answer>3</answer><|im_end|>"


def _image(seed=0, size=32):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8"))


def _zoom(image):
    """The zoom tool's result for ZOOM's call on `image`: (response text, crop)."""
    result = default_registry().execute(ZOOM[ZOOM.index("<tool_call>") + 11:-12], ToolContext(images=[image]))
    assert result.error is None and len(result.images) == 1, result.text
    return result.text, result.images[0]


def _conversation(chat, image):
    """(token ids, images) of the conversation the model is trained to write."""
    text, crop = _zoom(image)
    ids = (chat.prompt(QUESTION, [image]) + chat.encode(ZOOM) + chat.tool_response(text, [crop])
           + chat.encode(ANSWER))
    return ids, [image, crop]


def train_and_save(path):
    """(policy, path): the tiny Qwen3-VL, trained to write its conversation, saved at path."""
    model, tok = build_tiny_policy(vision=True, seed=0, head_dim=32, initializer_range=0.2)
    policy = policy_from_model(model, tok)
    chat = ChatFormat(tok, policy.image_processor)
    ids, images = _conversation(chat, _image(0))
    inputs = batch_inputs(policy, [ids], [images], left_pad=False)
    labels = inputs["input_ids"].clone()
    labels[:, :len(chat.prompt(QUESTION, images[:1]))] = -100
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for _ in range(200):
            model.model.rope_deltas = None
            loss = model(**inputs, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    model.model.rope_deltas = None
    assert loss.item() < 0.05, f"the tiny model did not learn its conversation (loss {loss.item():.3f})"
    save_policy(policy, path)
    return policy, path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_and_save(str(tmp_path_factory.mktemp("tiny_qwen3_vl")))


@pytest.fixture(scope="module")
def engine(trained):
    _, path = trained
    eng = VllmEngine(path, tools=default_registry(), dtype="float32", block_size=BLOCK, enforce_eager=True,
                     max_model_len=1024, seed=0, colocate=True)
    yield eng
    eng.shutdown()


REPORT = {}


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    for k, v in REPORT.items():
        print(f"\n[vllm_images] {k}: {v}")


def _banned(engine):
    """The token ids the vLLM sampler never samples (its logit bias): the vision placeholders
    (image pad, video pad, vision start / end). vLLM's processed log-probs are of the softmax
    without them."""
    return sorted(engine.sampler._logit_bias or [])


@torch.no_grad()
def _reference(policy, ids, images, start, temperature, exclude=(), mass_of=()):
    """log softmax(logits / T) of ids[start:] from one teacher-forced transformers forward over
    ids and images; `exclude`: token ids left out of the softmax (what vLLM's logit bias does).
    With `mass_of`: also the probability mass of those ids at each of these positions."""
    inputs = batch_inputs(policy, [ids], [images], left_pad=False)
    policy.model.model.rope_deltas = None
    logits = policy.model(**inputs).logits[0, start - 1:-1].float()
    policy.model.model.rope_deltas = None
    if temperature > 0:
        logits = logits / temperature
    lp_all = torch.log_softmax(logits, -1)
    if exclude:
        logits = logits.index_fill(-1, torch.tensor(list(exclude)), float("-inf"))
    lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[start:])[:, None])[:, 0]
    if mass_of:
        return lp, lp_all[:, list(mass_of)].exp().sum(-1)
    return lp


def _check_turn(engine, policy, ids, images, name, temperature=1.0, max_new_tokens=48):
    """Samples one turn of (ids, images) with vLLM; its log-probs against the reference."""
    sampling = SamplingSettings(temperature=temperature, max_new_tokens=max_new_tokens, max_total_tokens=1024, seed=3)
    [out] = engine.sampler.sample_turns([TurnRequest(0, list(ids), list(images))], sampling,
                                          torch.Generator().manual_seed(3))
    assert len(out.token_ids) > 0
    full = list(ids) + out.token_ids
    got = torch.tensor(out.logprobs)
    ref = _reference(policy, full, images, len(ids), temperature, exclude=_banned(engine))
    ref_all = _reference(policy, full, images, len(ids), temperature)
    diff = (got - ref).abs().max().item()
    REPORT[f"{name}: tokens, max |vLLM - transformers| (placeholders excluded / full softmax)"] = (
        f"{len(out.token_ids)}, {diff:.2e} / {(got - ref_all).abs().max().item():.2e}")
    torch.testing.assert_close(got, ref, atol=TOL, rtol=0)
    return out, full


def test_a_prompt_with_an_image_logprobs_match_transformers(engine, trained):
    policy, _ = trained
    chat = engine.chat
    for seed, question in [(0, QUESTION), (5, "What is in this picture, really?")]:
        image = _image(seed, size=40 if seed else 32)  # 40x40: resized to 40x40 (factor 8), 25 tokens
        ids = chat.prompt(question, [image])
        out, full = _check_turn(engine, policy, ids, [image], f"(a) image seed {seed}")
        # the image matters: the same tokens under another image are far off
        other = _reference(policy, full, [_image(99, size=image.width)], len(ids), 1.0, exclude=_banned(engine))
        REPORT[f"(a) image seed {seed}: max |vLLM - transformers with another image|"] = \
            f"{(torch.tensor(out.logprobs) - other).abs().max().item():.2e}"
        assert (torch.tensor(out.logprobs) - other).abs().max().item() > 100 * TOL


def test_b_zoom_crop_in_a_tool_response_logprobs_match_transformers(engine, trained):
    policy, _ = trained
    chat = engine.chat
    image = _image(0)
    text, crop = _zoom(image)
    assert crop.size == (64, 64)  # 16x16 crop, enlarged to the tool's min_side
    ids = chat.prompt(QUESTION, [image]) + chat.encode(ZOOM) + chat.tool_response(text, [crop])
    assert ids.count(chat.image_pad) == policy.image_processor.num_image_tokens(image) \
        + policy.image_processor.num_image_tokens(crop)
    out, full = _check_turn(engine, policy, ids, [image, crop], "(b) after the zoom crop")
    assert chat.decode(out.token_ids) == ANSWER  # what the model was trained to write there
    # an untrained continuation too (off the trained script, so its tokens are not near-certain),
    # after a different crop; and the crop matters
    other_crop = _zoom(_image(7))[1]
    ids2 = (chat.prompt(QUESTION, [image]) + chat.encode(ZOOM) + chat.tool_response(text, [other_crop])
            + chat.encode("Hmm, "))
    out2, full2 = _check_turn(engine, policy, ids2, [image, other_crop], "(b) after another crop, off script")
    wrong = _reference(policy, full2, [image, crop], len(ids2), 1.0, exclude=_banned(engine))
    REPORT["(b) max |vLLM - transformers with the other crop|"] = \
        f"{(torch.tensor(out2.logprobs) - wrong).abs().max().item():.2e}"
    assert (torch.tensor(out2.logprobs) - wrong).abs().max().item() > 100 * TOL


def test_resample_after_the_zoom_call_reuses_cached_kv_of_the_image_prompt(engine, trained):
    """A resample of a rollout with an image, cut right after its `<tool_call>`: vLLM's prefix
    cache (whose block hashes include the image) serves the prefix; the continuations'
    log-probs are the model's."""
    policy, _ = trained
    sampling = SamplingSettings(temperature=1.0, max_new_tokens=120, max_turns=2, max_total_tokens=1024, seed=11)
    greedy = SamplingSettings(temperature=0.0, max_new_tokens=120, max_turns=2, max_total_tokens=1024)
    [source] = engine.generate([Prompt(QUESTION, [_image(0)], answer="3")], greedy, n=1)
    assert source.tool_calls and source.tool_calls[0].name == "zoom", engine.chat.decode(source.token_ids.tolist())
    cut = source.tool_calls[0].open_end
    before = dict(engine.stats)
    [conts] = engine.resample([(source, cut)], 3, sampling)
    saved = engine.stats["resample_prefill_tokens_saved"] - before.get("resample_prefill_tokens_saved", 0)
    REPORT["(d) resample: prefix tokens, saved by the prefix cache (3 continuations)"] = f"{cut}, {saved}"
    assert saved == 3 * ((cut - 1) // BLOCK) * BLOCK and saved > 0
    worst = 0.0
    for c in conts:
        assert c.token_ids[:cut].tolist() == source.token_ids[:cut].tolist()
        sel = c.trainable.clone()
        sel[:cut] = False
        ref = _reference(policy, c.token_ids.tolist(), c.images, 1, 1.0, exclude=_banned(engine))
        got = c.logprobs[1:][sel[1:]]
        worst = max(worst, (got - ref[sel[1:]]).abs().max().item())
        torch.testing.assert_close(got, ref[sel[1:]], atol=TOL, rtol=0)
    REPORT["(d) resample: max |vLLM - transformers| after the cut"] = f"{worst:.2e}"


def test_c_greedy_agent_loop_with_zoom_agrees_with_the_transformers_engine(engine, trained):
    policy, _ = trained
    prompts = [Prompt(QUESTION, [_image(0)], answer="3"), Prompt("Describe it.", [_image(5, size=40)], answer="x")]
    sampling = SamplingSettings(temperature=0.0, max_new_tokens=120, max_turns=2, max_total_tokens=1024)
    got = engine.generate(prompts, sampling, n=1)
    ref = TransformersEngine(policy, tools=default_registry()).generate(prompts, sampling, n=1)
    trained_roll = got[0]
    assert [t.role for t in trained_roll.turns] == ["prompt", "model", "tool", "model"], \
        engine.chat.decode(trained_roll.token_ids.tolist())
    [call] = trained_roll.tool_calls
    assert (call.name, call.error, call.num_images) == ("zoom", None, 1) and len(trained_roll.images) == 2
    assert trained_roll.answer == "3" and trained_roll.reward == 1.0
    raw, corrected = [], []
    for a, b in zip(got, ref):
        assert a.token_ids.tolist() == b.token_ids.tolist(), (engine.chat.decode(a.token_ids.tolist()),
                                                              engine.chat.decode(b.token_ids.tolist()))
        sel = a.trainable.clone()
        sel[0] = False
        ids = a.token_ids.tolist()
        # the transformers engine records log softmax(logits) over the whole vocabulary, vLLM the
        # same without the placeholders it never samples (its logit bias): vLLM's = the engine's
        # - log(1 - their probability mass)
        _, mass = _reference(policy, ids, a.images, 1, 0.0, mass_of=_banned(engine))
        expected = b.logprobs[1:] - torch.log1p(-mass)
        raw.append((a.logprobs[sel] - b.logprobs[sel]).abs().max().item())
        corrected.append((a.logprobs[1:][sel[1:]] - expected[sel[1:]]).abs().max().item())
        torch.testing.assert_close(a.logprobs[1:][sel[1:]], expected[sel[1:]].float(), atol=TOL, rtol=0)
    REPORT["(c) greedy: max |vLLM - transformers engine| per rollout (as recorded / placeholder mass corrected)"] = \
        ", ".join(f"{r:.2e} / {c:.2e}" for r, c in zip(raw, corrected))


def test_rollouts_of_one_image_question_are_one_vllm_request(engine):
    """The G rollouts of a question with an image go to vLLM as ONE request with n = G, as text
    prompts do (each source image is resized once per call, so the rows showing it share one
    object and group)."""
    sampler = engine.sampler
    calls, generate = [], sampler.llm.generate

    def counting(prompts, params, **kw):
        calls.append([p.n for p in params])
        return generate(prompts, params, **kw)

    sampler.llm.generate = counting
    try:
        engine.generate([Prompt(QUESTION, [_image(0)]), Prompt("Say hi")],
                        SamplingSettings(temperature=1.0, max_new_tokens=8, max_turns=1, seed=1), n=3)
    finally:
        sampler.llm.generate = generate
    assert calls == [[3, 3]], calls
