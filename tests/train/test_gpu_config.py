"""configs/qwen3-vl-gpu.yaml, dry: everything of a multi-GPU Qwen3-VL-Thinking run that needs no
GPU is built from it (the task from a local data set, the tool registry, the chat template with
the tools announced, the prompt, the trainer's DeepSpeed config for ZeRO-3 bf16, sampling, the
method), and the values a multi-GPU run needs are checked to be consistent, so a GPU user's
first run does not die on a config error after the model has loaded.

The model directory stands in for Qwen/Qwen3-VL-8B-Thinking without its weights: a Qwen3-VL
config.json (tiny sizes, the real patch size 16 and context length 262144) and a tokenizer with a
Qwen3-VL-Thinking-style chat template (tests/rollout/_template.py)."""
import json
import os

import pytest
from PIL import Image

from axpo.models import Policy, load_chat_parts
from axpo.models.tiny import tiny_qwen3_vl_config
from axpo.rollout.chat import TemplateChat
from axpo.train.build import axpo_config, build_chat, build_task, build_tools, sampling_settings
from axpo.train.checks import check_inputs, check_launch, check_prompt
from axpo.train.config import load_config
from axpo.train.trainer import ds_config

from ..rollout._template import build_qwen_like_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GPU_CONFIG = os.path.join(ROOT, "configs", "qwen3-vl-gpu.yaml")


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """(model directory, data set directory)."""
    root = tmp_path_factory.mktemp("gpu-dry")
    model = root / "Qwen3-VL-8B-Thinking"
    tok = build_qwen_like_tokenizer(thinking=True)
    config = tiny_qwen3_vl_config(tok, patch_size=16)
    config.text_config.max_position_embeddings = 262144
    config.save_pretrained(model)
    tok.save_pretrained(model / "tokenizer")
    data = root / "vstar"
    data.mkdir()
    for split, n in (("train", 4), ("test", 2)):
        rows = []
        for i in range(n):
            name = f"{split}{i}.png"
            Image.new("RGB", (2246, 1582), (30 * i, 90, 160)).save(data / name)
            rows.append({"question": "What is the color of the cup?\n(A) red\n(B) blue\nAnswer with the option's letter.",
                         "image": name, "answer": "B"})
        (data / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return str(model), str(data)


def _config(stand_in, *overrides):
    model, data = stand_in
    return load_config(GPU_CONFIG, [f"model.name_or_path={model}", f"task.path={data}", *overrides])


def test_the_gpu_config_builds_everything_but_the_model(stand_in):
    cfg = _config(stand_in)
    assert (cfg.rollout.engine, cfg.trainer.zero_stage, cfg.trainer.dtype) == ("vllm", 3, "bfloat16")
    for world in (8, 16):  # one node, two nodes
        check_launch(cfg, world)
    task = build_task(cfg)
    check_inputs(cfg, task)
    tools = build_tools(cfg)
    assert tools.names() == ["zoom"] and tools.get("zoom").fn.coordinates == "relative"
    tokenizer, processor = load_chat_parts(cfg.model.name_or_path)
    processor.max_pixels = cfg.model.max_pixels  # as build_policy sets it
    chat = build_chat(cfg, Policy(None, tokenizer, processor), tools)
    assert isinstance(chat, TemplateChat) and chat.thinks_in_prompt
    prompt = task.prompts(cfg.task.train_split, 0, 1)[0]
    ids = check_prompt(cfg, chat, prompt)
    text = chat.decode(ids)
    # the tools are announced in the system turn, in the model's own template; the image is one
    # run of placeholders within the pixel budget; the prompt opens the thinking block
    assert text.startswith("<|im_start|>system\n# Tools") and '"name": "zoom"' in text and "0..1000" in text
    assert text.endswith("<|im_start|>assistant\n<think>\n")
    n_image = ids.count(chat.image_pad)
    assert n_image == processor.num_image_tokens(prompt.images[0]) <= cfg.model.max_pixels // 32 ** 2
    assert len(ids) + cfg.rollout.max_new_tokens <= cfg.rollout.max_total_tokens <= cfg.rollout.vllm.max_model_len
    ds = ds_config(cfg.trainer, cfg.rl.lr, cfg.sft.warmup_steps)
    assert ds["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 0}
    assert ds["bf16"] == {"enabled": True} and ds["gradient_clipping"] == 1.0
    assert sampling_settings(cfg, seed=0).max_total_tokens == 16384
    assert axpo_config(cfg).method.name == "axpo"
    # the configured reward: an option letter, read from prose after the reasoning
    from axpo.rollout import extract_answer
    from axpo.rollout.reward import make_reward

    answer = extract_answer("The cup looks blue.\n</think>\n\nThe answer is (B).", free_text=cfg.task.free_text_answers)
    assert make_reward(cfg.task.reward, cfg.task.reward_tolerance)(answer, "B") == 1.0


@pytest.mark.parametrize("overrides, world, message", [
    ([], 12, r"rl.questions_per_step \(64\) must be divisible by the world size \(12\)"),
    ([], 12, r"eval.questions \(256\) must be divisible by the world size \(12\)"),
    (["rl.updates_per_step=16"], 8, r"at least the world size \(8\) times rl.updates_per_step \(16\)"),
    (["rollout.vllm.max_model_len=8192"], 8,
     r"rollout.vllm.max_model_len \(8192\) must be at least rollout.max_total_tokens \(16384\)"),
    (["rollout.vllm.tensor_parallel_size=3"], 8, r"tensor_parallel_size \(3\) must divide the world size \(8\)"),
    (["rollout.max_total_tokens=300000", "rollout.vllm.max_model_len=300000"], 8,
     r"rollout.max_total_tokens \(300000\) must be at most the model's context length \(262144\)"),
    (["rl.group_size=1"], 8, r"rl.group_size \(1\) must be >= 2"),
])
def test_inconsistent_multi_gpu_values_are_refused_before_loading(stand_in, overrides, world, message):
    with pytest.raises(ValueError, match=message):
        check_launch(_config(stand_in, *overrides), world)


@pytest.mark.parametrize("overrides, message", [
    (["tools.zoom={scale: -1}"], r"config tools: tool 'zoom': scale must be a positive"),
    (["tools.zoom={zoom_factor: 2}"], r"config tools: tool 'zoom': .*zoom_factor"),
    (["tools.names=[zoom, browser]"], r"config tools.names must be a list of tool names from \['python', 'zoom'\]"),
])
def test_bad_tool_settings_are_refused_before_loading(stand_in, overrides, message):
    with pytest.raises(ValueError, match=message):
        cfg = _config(stand_in, *overrides)
        check_inputs(cfg, build_task(cfg))


def test_a_prompt_that_leaves_no_room_for_a_turn_is_refused(stand_in):
    cfg = _config(stand_in, "rollout.max_new_tokens=16000")
    tokenizer, processor = load_chat_parts(cfg.model.name_or_path)
    processor.max_pixels = cfg.model.max_pixels
    tools = build_tools(cfg)
    chat = build_chat(cfg, Policy(None, tokenizer, processor), tools)
    with pytest.raises(ValueError, match=r"rollout.max_total_tokens \(16384\) leaves \d+ tokens after the first"):
        check_prompt(cfg, chat, build_task(cfg).prompts("train", 0, 1)[0])

