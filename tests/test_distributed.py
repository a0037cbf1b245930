"""Two real processes on the CPU (gloo): one data-parallel job, not two independent ones."""

import os
import re
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import QUICK, REPO, lines_until, read_json, read_jsonl, run_cli, run_main


def two_process_launcher(port: int) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--main_process_port", str(port), "-m", "blip_recipes.cli"]  # fmt: skip


def test_two_process_training_and_evaluation(tmp_path, shapes_dir, capfd, caplog):
    output_dir = tmp_path / "ddp"
    launcher = two_process_launcher(port=29517)
    result = run_cli(
        ["train", "recipes/shapes/full.yaml", "--output_dir", str(output_dir), "--max_steps", "14",
         *QUICK, "--per_device_train_batch_size", "8", "--eval_on_start", "true",
         "--save_strategy", "steps", "--save_steps", "12", "--save_total_limit", "2",
         "--per_device_eval_batch_size", "7",  # 60 images over 2 x 7 per step: the sampler pads the last batch
         "--log_level", "info", "--log_level_replica", "info"],
        launcher=launcher,
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert len(re.findall(r"processes: world_size=2 \(distributed, device cpu:0, engine DDP\)", log)) == 2  # one job
    assert "weights identical on all 2 processes" in log
    assert "find_unused_parameters=True was specified" not in log  # no per-step graph search for unused parameters
    # Two evaluations (step 0 and final), each scored exactly once although both ranks generate and log at info.
    assert len(re.findall(r"scored 60 captions of validation on process 0", log)) == 2
    assert "on process 1" not in log
    rows = read_jsonl(output_dir / "eval_predictions.jsonl")
    assert len(rows) == 60 and len({row["image_id"] for row in rows}) == 60
    state = read_json(output_dir / "trainer_state.json")
    assert state["global_step"] == 14
    # 14 steps x 2 processes x 8 = 224 captions seen: the global batch is 16, not 8.
    assert state["train_batch_size"] == 8 and read_json(output_dir / "train_results.json")["epoch"] == 224 / 1440
    assert os.path.isfile(output_dir / "model.safetensors")

    # One process continues it only with the same global batch: with 8 x 1 x 1 the Trainer would resume with half
    # of it, saying nothing.
    checkpoint = output_dir / "checkpoint-12"
    assert read_json(checkpoint / "processes.json") == {
        "world_size": 2, "dataloader_num_workers": 0, "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 1, "engine": None,
    }  # fmt: skip
    shutil.copytree(checkpoint, tmp_path / "one" / "checkpoint-12")
    resume = ["train", "recipes/shapes/full.yaml", "--output_dir", tmp_path / "one", "--max_steps", "14", *QUICK,
              "--per_device_train_batch_size", "8", "--resume_from_checkpoint", "true"]  # fmt: skip
    refused = run_main(resume, capfd, caplog)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert ("checkpoint-12: written with 8 per device x 2 processes x 1 accumulation step (a global batch of 16), "
            "and this run has 8 per device x 1 process x 1 accumulation step: the global batch would go from 16 to "
            "8, and with it the data order and the schedule. Resume with --gradient_accumulation_steps 2, or start "
            "a new run") in refused.stderr  # fmt: skip
    assert not (tmp_path / "one" / "trainer_state.json").exists()
    # With 2 accumulation steps it trains steps 13 and 14 on the images the two processes did, with their losses.
    resumed = run_main([*resume, "--gradient_accumulation_steps", "2"], capfd, caplog)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "with 8 per device x 1 process x 2 accumulation steps: the same global batch of 16" in resumed.stderr

    def losses(folder):
        return [entry["loss"] for entry in read_json(folder / "trainer_state.json")["log_history"]
                if entry.get("step", 0) > 12 and "loss" in entry]  # fmt: skip

    assert len(losses(output_dir)) == 2 and losses(tmp_path / "one") == pytest.approx(losses(output_dir), rel=1e-4)
    weights, alone = load_file(output_dir / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    assert all(torch.allclose(weights[name], alone[name], atol=1e-6) for name in weights)

    # The same model scored by one process gives the same captions and the same metrics.
    single = run_main(["evaluate", "--model", output_dir, "--dataset", "builtin:shapes", "--split", "validation",
                       "--num_beams", "3", "--max_length", "20", "--min_length", "3", "--batch_size", "7",
                       "--output_dir", tmp_path / "single"], capfd, caplog)  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    distributed = read_json(output_dir / "eval_results.json")
    alone = read_json(tmp_path / "single" / "eval_results.json")
    for name in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider"):
        assert alone[f"validation_{name}"] == distributed[f"eval_{name}"], name
    assert [r["prediction"] for r in read_jsonl(tmp_path / "single" / "predictions.jsonl")] == [
        r["prediction"] for r in rows
    ]


def test_two_processes_share_one_feature_store(tmp_path, shapes_dir):
    """cache_vision_features under DDP: each process encodes half the images, both train on the whole store;
    group_captions_by_image: each process's batches keep an image's captions together."""
    output_dir = tmp_path / "ddp-features"
    launcher = two_process_launcher(port=29519)
    result = run_cli(
        ["train", "recipes/shapes/frozen_vision.yaml", "--output_dir", str(output_dir), "--max_steps", "6",
         *QUICK, "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "32",
         "--group_captions_by_image", "true", "--log_level", "info", "--log_level_replica", "info"],
        launcher=launcher,
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert len(re.findall(r"processes: world_size=2 \(distributed", log)) == 2
    assert len(re.findall(r"encoding 480 training images once \(240 on this process\)", log)) == 2
    assert "weights identical on all 2 processes" in log
    assert read_json(output_dir / "trainer_state.json")["global_step"] == 6
    # 6 steps x 8 captions per process, 3 captions per image: 16 images if every image's captions shared a batch,
    # up to one more per batch where an image's captions straddle two.
    for process in (0, 1):
        found = re.search(rf"48 caption rows trained on (\d+) image encodings \(.*\) on process {process}", log)
        assert found and 16 <= int(found.group(1)) <= 16 + 6, log[-3000:]


def start_machine(rank: int, port: int, arguments: list[str], cwd=REPO, env=None):
    """One "machine" of a two-machine job on localhost (one process each), as accelerate launch starts it there."""
    import subprocess

    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
               "--machine_rank", str(rank), "--num_processes", "2", "--main_process_ip", "127.0.0.1",
               "--main_process_port", str(port), "-m", "blip_recipes.cli", "train",
               os.path.join(REPO, "recipes", "shapes", "full.yaml"), *arguments]  # fmt: skip
    return subprocess.Popen(command, cwd=cwd, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def finish_machines(*machines) -> list[str]:
    try:
        return [machine.communicate(timeout=300)[0] for machine in machines]
    finally:  # a machine left waiting for a dead peer must not hang the suite
        for machine in machines:
            if machine.poll() is None:
                machine.kill()


def test_two_machines_started_in_the_unlucky_order_preempted_and_continued_on_one(tmp_path, capfd, caplog):
    """Two "machines" on localhost, one process each, each with its own empty cache (separate file systems), machine
    1 started first: each generates its builtin model and data itself and they train as one job of world size 2.
    Then the scheduler pre-empts the job: SIGTERM to each machine's launcher, which passes it on to its process;
    both finish the same step and write one checkpoint, which the job re-queued on one machine continues."""
    import signal
    import time

    from blip_recipes.checkpoints import latest_complete_checkpoint

    def machine(rank):
        arguments = ["--output_dir", str(tmp_path / "run"), "--max_steps", "200", *QUICK,
                     "--per_device_train_batch_size", "8", "--log_level_replica", "info"]  # fmt: skip
        return start_machine(rank, 29623, arguments, env={"BLIP_RECIPES_CACHE": str(tmp_path / f"cache-{rank}")})

    second = machine(1)
    time.sleep(5)
    first = machine(0)
    lines, losses = lines_until(first, "'loss':", 3)
    for launcher in (first, second):
        launcher.send_signal(signal.SIGTERM)
    logs = finish_machines(first, second)
    logs[0] = "".join(lines) + logs[0]
    assert losses == 3, logs[0][-3000:] + logs[1][-3000:]
    # The launchers end as torch's elastic agent does on a signal: exit 1 and a SignalException traceback.
    assert first.returncode == second.returncode == 1 and all("SignalException" in log for log in logs)
    for log in logs:
        assert "processes: world_size=2 (distributed" in log
        # The image check is shared: each process decodes half of the 480 training images.
        assert "checking 480 images of split 'train' (240 on this process)" in log
        assert "SIGTERM received: finishing this step, then saving a checkpoint and exiting (the launcher kills " \
               "this process 30 s after the signal)" in log  # fmt: skip
    assert all(os.path.isfile(tmp_path / f"cache-{rank}" / "tiny-blip-v1" / "model.safetensors") for rank in (0, 1))
    stopped = [re.findall(r"pre-empted: checkpoint saved at step (\d+)", log) for log in logs]
    assert stopped[0] and stopped[0] == stopped[1], logs[0][-3000:] + logs[1][-3000:]  # both at the same step
    assert "weights identical on all 2 processes" in logs[0]
    step = int(stopped[0][0])
    checkpoint = latest_complete_checkpoint(str(tmp_path / "run"))
    assert checkpoint == str(tmp_path / "run" / f"checkpoint-{step}") and step >= 3
    assert {"rng_state_0.pth", "rng_state_1.pth", "optimizer.pt"} <= set(os.listdir(checkpoint))

    resumed = run_main(["train", "recipes/shapes/full.yaml", "--output_dir", tmp_path / "run", *QUICK,
                        "--max_steps", str(step + 1), "--per_device_train_batch_size", "8",
                        "--gradient_accumulation_steps", "2", "--resume_from_checkpoint", "true"],
                       capfd, caplog)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_json(tmp_path / "run" / "trainer_state.json")["global_step"] == step + 1


def test_machines_that_see_different_folders_all_stop_with_the_reason(tmp_path):
    """Each machine runs in its own folder (cwd), as machines without a shared file system do: output_dir "run" is
    then a folder of each machine's own, where only machine 0 would keep checkpoints (a resume failed on machine 1
    while machine 0 went on until gloo broke: "Connection closed by peer"). Every process stops before loading,
    each with the reason (the checks before loading on every process: test_a_check_that_fails_on_one_process_...)."""
    folders = [tmp_path / f"machine-{rank}" for rank in (0, 1)]
    for folder in folders:
        folder.mkdir()
    machines = [start_machine(rank, 29625, ["--output_dir", "run", "--max_steps", "3", *QUICK], cwd=folders[rank])
                for rank in (1, 0)]  # fmt: skip
    logs = finish_machines(*machines)[::-1]
    assert all(machine.returncode != 0 for machine in machines), logs
    # no process's traceback (the launcher prints its own, of ChildFailedError), nothing loaded
    assert not any(re.search(r"\[rank\d\]: Traceback|Connection closed", log) for log in logs), logs
    assert not any("processes: world_size" in log for log in logs)
    for log in logs:
        assert "ERROR blip_recipes: output_dir run is not one folder all machines share (process 1 on " in log
        assert "Put output_dir on a file system every machine mounts" in log
        # The launcher's closing summary names the reason too (record_for_launcher), not only torch's docs
        root_cause = log[log.index("Root Cause (first observed failure)") :]
        assert "traceback : output_dir run is not one folder all machines share" in root_cause, root_cause
        assert "To enable traceback see" not in log


def test_a_check_that_fails_on_one_process_stops_every_process_with_its_message(monkeypatch):
    """A model path or Hub cache that machine 0 has and machine 1 lacks: machine 1's check before loading fails, and
    every process stops with its message, naming the process and host (machine 0 used to load on alone). Here the
    gathered outcomes are given as two processes would gather them (the gather itself: gloo, tested above)."""
    from blip_recipes import train
    from blip_recipes.config import RecipeError
    from blip_recipes.recipe_parser import parse_recipe

    recipe = parse_recipe([os.path.join(REPO, "recipes", "shapes", "full.yaml")])
    monkeypatch.setattr(train, "check_before_loading", lambda recipe: None)
    outcomes = [(None, None, "machine-a"), ("model_name_or_path tiny-blip: no local directory of that name", None,
                                            "machine-b")]  # fmt: skip
    monkeypatch.setattr(train, "gather_from_all", lambda value, world_size: outcomes)
    with pytest.raises(RecipeError, match="^process 1 on machine-b: model_name_or_path tiny-blip: no local directory"):
        train.check_on_every_process(recipe)
    outcomes[1] = (None, "run/checkpoint-2", "machine-b")  # resolved another checkpoint than process 0's None
    with pytest.raises(RecipeError, match="the processes would resume from different checkpoints"):
        train.check_on_every_process(recipe)
    outcomes[1] = (None, None, "machine-b")
    assert train.check_on_every_process(recipe) is None


def one_cpu_process_launcher(*flags: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines",
            "1", *flags, "-m", "blip_recipes.cli"]  # fmt: skip


def test_the_launchers_mixed_precision_becomes_the_recipes(tmp_path):
    """`accelerate launch --mixed_precision bf16` (or a config file saying so) makes the Trainer train in bf16 even
    when the recipe says nothing: the recipe takes it (saved as bf16: true). A recipe that says otherwise, and
    torch_compile: false under --dynamo_backend, are refused: tests/test_config.py, with the environment the
    launcher sets (the refusal through a launcher: test_machines_that_see_different_folders_all_stop_...)."""
    launcher = one_cpu_process_launcher("--dynamo_backend", "no", "--mixed_precision", "bf16")
    train = ["train", "recipes/shapes/full.yaml", "--max_steps", "2", *QUICK, "--max_train_samples", "16"]
    result = run_cli([*train, "--output_dir", str(tmp_path / "bf16")], launcher=launcher)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "\nbf16: true\n" in (tmp_path / "bf16" / "recipe.yaml").read_text()


def test_torchrun_starts_one_data_parallel_job(tmp_path):
    """torchrun (what SLURM scripts and many clusters use instead of accelerate launch) sets only torch's RANK /
    WORLD_SIZE / MASTER_ADDR variables: the Trainer makes one gloo job of them on the CPU, not two runs alone."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                "-m", "blip_recipes.train"]  # fmt: skip
    train = ["recipes/shapes/full.yaml", "--output_dir", str(tmp_path / "run"), "--max_steps", "3", *QUICK,
             "--per_device_train_batch_size", "8", "--log_level_replica", "info"]  # fmt: skip
    result = run_cli(train, launcher=launcher)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert len(re.findall(r"processes: world_size=2 \(distributed, device cpu:0, engine DDP\)", log)) == 2, log[-3000:]
    assert "weights identical on all 2 processes" in log
    state = read_json(tmp_path / "run" / "trainer_state.json")
    assert state["global_step"] == 3 and read_json(tmp_path / "run" / "train_results.json")["epoch"] == 3 * 16 / 1440
