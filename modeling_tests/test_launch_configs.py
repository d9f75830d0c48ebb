"""The multi-GPU launch configs in examples/multi_gpu/, read the way `accelerate launch` reads them.

No GPU here: each accelerate config is validated by accelerate's own launcher code and turned into the environment it
hands the training processes; the FSDP environment then builds accelerate's FSDP plugin, whose wrap policy is applied
to our model (the units `fsdp.yaml` produces); the DeepSpeed JSON files load as DeepSpeed configs and
`TrainingArguments` fills their "auto" values (the engines themselves run in `test_deepspeed.py`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiny

from hf_instructblip import InstructBlipConfig, InstructBlipForConditionalGeneration

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "multi_gpu"


def launcher_env(name: str) -> dict[str, str]:
    """What `accelerate launch --config_file examples/multi_gpu/NAME.yaml train.py` puts in the environment."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / f"{name}.yaml"), "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    if not args.use_deepspeed:
        return {**prepare_multi_gpu_env(args), "NUM_PROCESSES": str(args.num_processes)}
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as `launch_command` does
    _, env = prepare_deepspeed_cmd_env(args)
    return {**env, "NUM_PROCESSES": str(args.num_processes)}


def test_ddp_config_launches_one_bf16_process_per_gpu():
    env = launcher_env("ddp")
    assert (env["NUM_PROCESSES"], env["ACCELERATE_MIXED_PRECISION"]) == ("8", "bf16")
    assert "ACCELERATE_USE_FSDP" not in env and "ACCELERATE_USE_DEEPSPEED" not in env


def test_fsdp_config_asks_for_fsdp2_wrapping_our_blocks(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    env = launcher_env("fsdp")
    assert {k: env[k] for k in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_AUTO_WRAP_POLICY",
                                "FSDP_STATE_DICT_TYPE", "FSDP_RESHARD_AFTER_FORWARD")} == {
        "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
        "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT", "FSDP_RESHARD_AFTER_FORWARD": "true"}
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()  # from the environment, as the training processes build it
    assert plugin.fsdp_version == 2
    for kind, llm_block in (("llama", "LlamaDecoderLayer"), ("t5", "T5Block")):
        model = InstructBlipForConditionalGeneration(InstructBlipConfig(**tiny.config_kwargs(kind)))
        policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
        units = {type(module).__name__ for module in model.modules() if policy(module)}
        assert units == {"EvaEncoderLayer", "QFormerLayer", "QFormerEmbeddings", llm_block}, kind


def test_deepspeed_config_points_at_a_zero3_json():
    from accelerate.utils.deepspeed import HfDeepSpeedConfig

    env = launcher_env("deepspeed_zero3")
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["NUM_PROCESSES"] == "8"
    config_file = env["ACCELERATE_DEEPSPEED_CONFIG_FILE"]  # relative to the repository root, where README launches
    assert config_file == "examples/multi_gpu/ds_zero3.json"
    assert HfDeepSpeedConfig(str(CONFIGS.parents[1] / config_file)).is_zero3()


@pytest.mark.parametrize("name, stage", [("ds_zero2", 2), ("ds_zero3", 3)])
def test_deepspeed_json_files_are_zero_configs(name, stage):
    from accelerate.utils.deepspeed import HfDeepSpeedConfig

    config = HfDeepSpeedConfig(str(CONFIGS / f"{name}.json"))
    assert config.get_value("zero_optimization.stage") == stage
    assert config.is_zero3() == (stage == 3)
    # Batch sizes, accumulation, clipping and precision come from TrainingArguments ("auto"), so they cannot disagree.
    raw = json.loads((CONFIGS / f"{name}.json").read_text())
    assert raw["train_micro_batch_size_per_gpu"] == raw["gradient_accumulation_steps"] == "auto"
    assert raw["bf16"]["enabled"] == raw["fp16"]["enabled"] == "auto"


@pytest.mark.parametrize("name", ["ds_zero2", "ds_zero3"])
def test_training_arguments_fill_the_deepspeed_json(name, tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(str(tmp_path), deepspeed=str(CONFIGS / f"{name}.json"), per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, bf16=True, use_cpu=True, report_to=[])
    config = args.hf_deepspeed_config.config
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (4, 2)
    assert config["bf16"]["enabled"] is True and config["fp16"]["enabled"] is False
