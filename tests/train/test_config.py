"""The YAML configs: documented defaults, overrides, and errors that name the key."""
import os
import re

import pytest

from axpo.train.config import Config, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_tiny_cpu_yaml_documents_exactly_the_defaults():
    assert load_config(os.path.join(ROOT, "configs", "tiny-cpu.yaml")) == Config()


def test_gpu_yaml_loads():
    cfg = load_config(os.path.join(ROOT, "configs", "qwen3-vl-gpu.yaml"))
    assert (cfg.trainer.zero_stage, cfg.rollout.engine, cfg.trainer.dtype) == (3, "vllm", "bfloat16")


def test_overrides_parse_as_yaml_and_win_over_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("rl:\n  steps: 7\n  algorithm: grpo\n")
    cfg = load_config(str(path), ["rl.steps=9", "model.name_or_path=/x", "log.tensorboard=false",
                                  "trainer.adam_betas=[0.8, 0.9]", "model.max_pixels=null"])
    assert (cfg.rl.steps, cfg.rl.algorithm, cfg.model.name_or_path, cfg.log.tensorboard) == (9, "grpo", "/x", False)
    assert cfg.trainer.adam_betas == [0.8, 0.9] and cfg.model.max_pixels is None
    assert load_config(None, ["rl.lr=1"]).rl.lr == 1.0  # an int where a float is expected
    assert load_config(None, ["rl.lr=1e-3"]).rl.lr == 1e-3  # YAML 1.1 reads this as a string


def test_the_loss_aggregation_is_the_methods_unless_set():
    assert load_config(None, ["rl.algorithm=drgrpo"]).loss_agg == "seq-mean-token-sum-norm"
    assert load_config(None).loss_agg == "token-mean"
    assert load_config(None, ["rl.algorithm=axpo-no-fix"]).loss_agg == "token-mean"
    assert load_config(None, ["rl.algorithm=drgrpo", "rl.loss_agg=seq-mean-token-mean"]).loss_agg == "seq-mean-token-mean"


@pytest.mark.parametrize("overrides,message", [
    (["rl.stepz=1"], "unknown key 'rl.stepz'"),
    (["rl.algorithm=ppo"], "config rl.algorithm must be one of ['grpo', 'drgrpo', 'axpo', 'grpo-matched', "
                           "'axpo-random', 'axpo-no-credit', 'axpo-no-fix', 'axpo-shared-group'], got 'ppo'"),
    (["rl.ratio=1.5"], "config rl.ratio must be a number in [0, 1], got 1.5"),
    (["rl.ratio=-0.1"], "config rl.ratio must be a number in [0, 1]"),
    (["rl.k=0"], "config rl.k must be an int >= 1, got 0"),
    (["rl.loss_agg=sum"], "config rl.loss_agg must be one of [None, 'token-mean'"),
    (["task.regime=easy"], "config task.regime must be one of ['gap', 'tool_safe']"),
    (["bogus=1"], "unknown key 'bogus'"),
    (["rl=3"], "config rl must be a mapping"),
    (["rl.steps=1.5"], "config rl.steps must be an int"),
    (["rl.steps=true"], "config rl.steps must be an int"),
    (["rl.resample=1"], "config rl.resample must be true or false"),
    (["rl.group_size=0"], "config rl.group_size must be an int >= 1"),
    (["rl.clip_low=1.5"], "config rl.clip_low"),
    (["rollout.top_p=0"], "config rollout.top_p"),
    (["rollout.engine=sglang"], "config rollout.engine must be one of"),
    (["rollout.engine=vllm", "rl.score=entropy"], "config rl.score must be 'confidence' with rollout.engine vllm"),
    (["rollout.vllm.engine_kwargs=[1]"], "config rollout.vllm.engine_kwargs must be a mapping"),
    (["rollout.vllm.block_size=0"], "config rollout.vllm.block_size must be null or an int >= 1"),
    (["task.name=local"], "config task.path"),
    (["rl.updates_per_step=9"], "config rl.updates_per_step"),
    (["trainer.adam_betas=[0.9]"], "config trainer.adam_betas"),
    (["rollout.max_new_tokens=600"], "config rollout.max_new_tokens"),
    (["rl.lr=nan"], "config rl.lr must be a finite number"),
    (["steps"], "key=value"),
    (["trainer.adam_betas=[a, b]"], "config trainer.adam_betas must be two numbers in [0, 1), got ['a', 'b']"),
    (["trainer.adam_betas=[0.9"], "config override trainer.adam_betas='[0.9': the value is not valid YAML"),
    (["rl.steps=\x01"], "config override rl.steps='\\x01': the value is not valid YAML"),
    (["log.output_dir="], "config log.output_dir must be a non-empty path"),
])
def test_bad_keys_and_values_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(None, overrides)


@pytest.mark.parametrize("content, message", [
    (b"rl:\n  steps: 3\n  steps: 4\n", "is not valid YAML: key 'steps' is given twice"),
    (b"rl: [\n", "is not valid YAML"),
    (b"rl:\n  algorithm: \xff\n", "is not UTF-8 text (byte 17 is 0xff)"),
])
def test_bad_config_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(f"config file {path} {message}")):
        load_config(str(path))
    with pytest.raises(ValueError, match=f"config file {tmp_path / 'none.yaml'}: No such file"):
        load_config(str(tmp_path / "none.yaml"))


def test_a_non_mapping_file_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping at the top level"):
        load_config(str(path))


def test_every_built_in_tool_has_its_options_section():
    """tools.<name> holds each tool's options (build_tools reads them by TOOLS' names)."""
    import dataclasses

    from axpo.tools import TOOLS
    from axpo.train.config import ToolsConfig

    assert set(TOOLS) <= {f.name for f in dataclasses.fields(ToolsConfig)}
    assert Config().tools.names == list(TOOLS)
