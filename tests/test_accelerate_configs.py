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


def test_a_process_count_the_launcher_drops_is_refused(tmp_path):
    """`accelerate launch --num_processes 2` without --multi_gpu, on a machine without GPUs (or with --cpu), runs one
    process: the run trained alone with half the global batch asked for, saying world_size=1 at most."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "-m",
                "blip_recipes.train"]  # fmt: skip
    result = run_cli(["recipes/shapes/full.yaml", "--output_dir", str(tmp_path), "--max_steps", "2", *QUICK],
                     launcher=launcher)  # fmt: skip
    assert result.returncode != 0
    assert "accelerate launch was asked for 2 processes but started one: without --multi_gpu" in result.stderr
    assert not os.path.exists(tmp_path / "trainer_state.json")


@pytest.mark.parametrize(
    "command, environ, dropped",
    [
        (["accelerate", "launch", "--num_processes", "4", "-m", "blip_recipes.train", "r.yaml"], {}, 4),
        (["python", "-m", "accelerate.commands.launch", "--num-processes=3", "train.py"], {}, 3),
        (["accelerate", "launch", "--num_processes", "1", "-m", "blip_recipes.train"], {}, None),
        # the training script's own arguments are not the launcher's
        (["accelerate", "launch", "-m", "some.script", "--num_processes", "4"], {}, None),
        (["accelerate", "launch", "--num_processes", "4", "-m", "x"], {"WORLD_SIZE": "4"}, None),  # it did start 4
        (["torchrun", "--nproc_per_node", "4", "x.py"], {}, None),
        (["accelerate", "launch", "--config_file", "CONFIG", "-m", "x"], {}, 2),  # distributed_type NO, 2 processes
    ],
)
def test_the_dropped_process_count_is_read_from_the_launchers_command(command, environ, dropped, tmp_path):
    from blip_recipes.machine import launcher_processes_dropped

    config = tmp_path / "config.yaml"
    config.write_text("distributed_type: 'NO'\nnum_processes: 2\n")
    command = [str(config) if token == "CONFIG" else token for token in command]
    assert launcher_processes_dropped({"ACCELERATE_USE_CPU": "True", **environ}, command) == dropped
    assert launcher_processes_dropped({}, command) is None  # not under accelerate's simple launcher
    config.write_text("distributed_type: MULTI_CPU\nnum_processes: 2\n")
    if "CONFIG" in command or str(config) in command:
        assert launcher_processes_dropped({"ACCELERATE_USE_CPU": "True"}, command) is None
