"""Every accelerate config loads with accelerate's own parser and names things that exist."""

import glob
import os
import sys

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from tests.conftest import QUICK, REPO, read_json, run_cli

CONFIGS = {os.path.basename(p): p for p in glob.glob(os.path.join(REPO, "accelerate_configs", "*.yaml"))}


def test_all_launch_modes_have_a_config():
    assert set(CONFIGS) == {"single_gpu.yaml", "multi_gpu.yaml", "fsdp.yaml", "deepspeed_zero2.yaml",
                            "deepspeed_zero3.yaml", "multi_node.yaml"}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_parses(name):
    config = load_config_from_file(CONFIGS[name])
    expected = {
        "single_gpu.yaml": "NO",
        "multi_gpu.yaml": "MULTI_GPU",
        "fsdp.yaml": "FSDP",
        "deepspeed_zero2.yaml": "DEEPSPEED",
        "deepspeed_zero3.yaml": "DEEPSPEED",
        "multi_node.yaml": "MULTI_GPU",
    }
    assert config.distributed_type.value == expected[name]
    if name == "fsdp.yaml":
        from transformers.models.blip import modeling_blip, modeling_blip_text

        for layer in config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(","):
            assert hasattr(modeling_blip, layer) or hasattr(modeling_blip_text, layer), layer
    if name.startswith("deepspeed"):
        assert config.deepspeed_config["zero_stage"] == int(name[-6])
    if name == "multi_node.yaml":
        assert config.num_machines == 2 and config.main_process_ip and config.machine_rank == 0


def test_single_gpu_config_launches_here(tmp_path):
    """The single-GPU config on a machine without one: the run moves itself to the CPU."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", CONFIGS["single_gpu.yaml"],
                "-m", "blip_recipes.train"]  # fmt: skip
    result = run_cli(["recipes/shapes/full.yaml", "--output_dir", str(tmp_path), "--max_steps", "2", *QUICK],
                     launcher=launcher)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_json(tmp_path / "trainer_state.json")["global_step"] == 2
