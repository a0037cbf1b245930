"""Using a fine-tuned model: the caption CLI (full model and LoRA adapter), merge-lora, push, and the HTTP service."""

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from blip_recipes.evaluation import Captioner
from tests.conftest import QUICK, REPO, assert_readable_by_everyone, hub_cache_with, read_jsonl, run_cli, run_main
from tests.fake_hub import FakeHub


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, shapes_dir):
    from blip_recipes.cli import main

    output_dir = tmp_path_factory.mktemp("lora-run")
    assert main(["train", recipe("lora"), "--output_dir", str(output_dir), "--max_steps", "4", *QUICK,
                 "--save_strategy", "no"]) == 0  # fmt: skip
    return output_dir


def recipe(mode: str) -> str:
    return os.path.join(REPO, "recipes", "shapes", f"{mode}.yaml")


def validation_images(shapes_dir, count=5):
    return [os.path.join(shapes_dir, "validation", f"{i:05d}.png") for i in range(count)]


def test_caption_cli_with_a_lora_adapter_matches_the_merged_model(tmp_path, lora_run, shapes_dir, capfd, caplog):
    images = validation_images(shapes_dir)
    adapter = run_main(
        ["caption", *images, "--model", lora_run, "--output", tmp_path / "adapter.jsonl"], capfd, caplog
    )
    assert adapter.returncode == 0, adapter.stderr[-2000:]
    merged_dir = tmp_path / "merged"
    merge = run_main(["merge-lora", lora_run, merged_dir], capfd, caplog)
    assert merge.returncode == 0, merge.stderr[-2000:]
    assert_readable_by_everyone(merged_dir)
    rows = read_jsonl(tmp_path / "adapter.jsonl")
    assert [row["image"] for row in rows] == images
    direct = run_main(["caption", *images, "--model", merged_dir], capfd, caplog)
    assert [line.split("\t")[1] for line in direct.stdout.strip().splitlines()] == [row["caption"] for row in rows]


def test_merge_lora_writes_a_new_folder_and_never_over_a_model(tmp_path, lora_run, capfd, caplog):
    result = run_main(["merge-lora", lora_run, lora_run], capfd, caplog)
    assert result.returncode == 2 and f"{lora_run} already holds a model (adapter_config.json)" in result.stderr
    assert not os.path.exists(lora_run / "model.safetensors")
    merged = tmp_path / "new" / "merged"
    assert run_main(["merge-lora", lora_run, merged], capfd, caplog).returncode == 0
    written = os.path.getmtime(merged / "model.safetensors")
    result = run_main(["merge-lora", lora_run, merged], capfd, caplog)
    assert result.returncode == 2 and "already holds a model (config.json, model.safetensors)" in result.stderr
    assert os.path.getmtime(merged / "model.safetensors") == written


def test_an_adapter_whose_base_model_is_gone_is_named_by_every_command(tmp_path, lora_run, capfd, caplog):
    moved = tmp_path / "moved-adapter"
    shutil.copytree(lora_run, moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")  # the base was deleted, or the adapter moved machines
    (moved / "adapter_config.json").write_text(json.dumps(config))
    message = f"{moved} is a LoRA adapter whose base model cannot be loaded: model_name_or_path {tmp_path / 'gone'}"
    picture = tmp_path / "picture.png"
    Image.new("RGB", (32, 32), "red").save(picture)
    for command in (
        ["caption", picture, "--model", moved],
        ["evaluate", "--model", moved, "--dataset", "builtin:shapes", "--split", "validation",
         "--output_dir", tmp_path / "evaluation"],
        ["merge-lora", moved, tmp_path / "merged"],
        ["serve", "--model", moved, "--port", "0"],
    ):  # fmt: skip
        result = run_main(command, capfd, caplog)
        assert result.returncode == 2 and message in result.stderr, (command, result.stderr)
    assert not os.path.exists(tmp_path / "merged")
    train = run_main(["train", recipe("lora"), "--model_name_or_path", moved, "--output_dir", tmp_path / "run"], capfd,
                     caplog)  # fmt: skip
    assert train.returncode == 2 and message in train.stderr


def test_a_pushed_adapter_is_used_from_the_hub_as_a_local_one_is(tmp_path, lora_run, shapes_dir, capfd, caplog):
    """A Hub repo holding an adapter (what `push` uploads for a LoRA run) has no config.json: loaded by id it gave
    "could not load its processor". Every command now takes it as it takes the run's folder."""
    env = hub_cache_with(tmp_path / "hub", "someone/shapes-lora", lora_run)
    images = validation_images(shapes_dir, 3)
    local = run_main(["caption", *images, "--model", lora_run], capfd, caplog)
    hub = run_cli(["caption", *images, "--model", "someone/shapes-lora"], env=env)
    assert local.returncode == 0 and hub.returncode == 0, hub.stderr[-2000:]
    assert "Warning" not in hub.stderr, hub.stderr  # peft's "is_gradient_checkpointing is deprecated" on each load
    assert hub.stdout == local.stdout and len(hub.stdout.splitlines()) == 3
    merged = run_cli(["merge-lora", "someone/shapes-lora", str(tmp_path / "merged")], env=env)
    assert merged.returncode == 0 and os.path.isfile(tmp_path / "merged" / "model.safetensors"), merged.stderr[-2000:]
    refused = run_cli(["train", "recipes/shapes/lora.yaml", "--model_name_or_path", "someone/shapes-lora",
                       "--lora_r", "4", "--output_dir", str(tmp_path / "run")], env=env)  # fmt: skip
    assert refused.returncode == 2 and "(lora_r: recipe 4, adapter 16)" in refused.stdout + refused.stderr
    assert not os.path.exists(tmp_path / "run" / "recipe.yaml")


def test_caption_reads_the_hub_branch_it_is_given(tmp_path, lora_run, tiny_model_dir, shapes_dir, capfd, caplog):
    """A model pushed to a branch (hub_revision, `push --revision`) is captioned from that branch with --revision."""
    env = hub_cache_with(tmp_path / "hub", "someone/shapes-lora", lora_run)  # main: the LoRA run
    branch = tmp_path / "hub" / "models--someone--shapes-lora" / "snapshots" / ("1" * 40)  # exp-1: the base model
    shutil.copytree(tiny_model_dir, branch)
    (tmp_path / "hub" / "models--someone--shapes-lora" / "refs" / "exp-1").write_text("1" * 40)
    images = validation_images(shapes_dir, 3)
    base = run_main(["caption", *images, "--model", tiny_model_dir, "--num_beams", "1"], capfd, caplog)
    adapter = run_main(["caption", *images, "--model", lora_run, "--num_beams", "1"], capfd, caplog)
    hub = run_cli(["caption", *images, "--model", "someone/shapes-lora", "--revision", "exp-1", "--num_beams", "1"],
                  env=env)  # fmt: skip
    assert hub.returncode == 0, hub.stderr[-2000:]
    assert hub.stdout == base.stdout != adapter.stdout and len(hub.stdout.splitlines()) == 3


def test_serve_loads_the_hub_branch_it_is_given(monkeypatch, capfd, caplog):
    """serve shares caption's loader and options: --revision reaches it."""
    from blip_recipes import evaluation
    from blip_recipes.model import ModelError

    asked = []

    def loader(model, *args):
        asked.append((model, args[-1]))
        raise ModelError("stopped where the model would load")

    monkeypatch.setattr(evaluation, "Captioner", loader)
    result = run_main(["serve", "--model", "someone/shapes-lora", "--revision", "exp-1", "--port", "0"], capfd, caplog)
    assert result.returncode == 2 and "stopped where the model would load" in result.stderr
    assert asked == [("someone/shapes-lora", "exp-1")]


def test_a_saved_adapter_loads_with_stock_peft_alone(lora_run):
    """peft records the base model's class for AutoPeftModel; ours is adapt.py's subclass, which stock peft refuses
    to import. A pushed adapter must load for people without blip-recipes."""
    config = json.loads((lora_run / "adapter_config.json").read_text())
    assert config["auto_mapping"]["parent_library"] == "transformers.models.blip.modeling_blip"
    code = ("import sys; from peft import AutoPeftModel; base = AutoPeftModel.from_pretrained(sys.argv[1])"
            ".get_base_model(); print(type(base).__name__, 'blip_recipes' in sys.modules)")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code, str(lora_run)], capture_output=True, text=True, check=False)
    assert result.stdout.split() == ["BlipForConditionalGeneration", "False"], result.stderr[-2000:]


def test_evaluate_with_a_runs_own_recipe_writes_beside_not_into_the_run(
    tmp_path, lora_run, monkeypatch, capfd, caplog
):
    """The recipe's output_dir is where its training writes (here: the run being evaluated, so evaluate refused);
    evaluate writes into evaluations/MODEL unless --output_dir says otherwise."""
    monkeypatch.chdir(tmp_path)
    result = run_main(["evaluate", lora_run / "recipe.yaml", "--model", lora_run, "--max_eval_samples", "6",
                       "--metrics", "bleu,cider"], capfd, caplog)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    written = tmp_path / "evaluations" / os.path.basename(lora_run)
    assert {"eval_results.json", "predictions.jsonl"} <= set(os.listdir(written))
    assert len(read_jsonl(written / "predictions.jsonl")) == 6


def test_evaluate_command_scores_a_lora_adapter(tmp_path, lora_run, capfd, caplog):
    result = run_main(["evaluate", "--model", lora_run, "--dataset", "builtin:shapes", "--split", "validation",
                       "--max_eval_samples", "12", "--metrics", "bleu,cider", "--output_dir", tmp_path / "ev"], capfd,
                      caplog)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((tmp_path / "ev" / "eval_results.json").read_text())
    assert {"validation_bleu_4", "validation_cider"} <= set(results)
    rows = read_jsonl(tmp_path / "ev" / "predictions.jsonl")
    assert len(rows) == 12 and os.path.isfile(tmp_path / "ev" / "caption_grid.png")


def test_caption_cli_walks_directories_and_reports_bad_files(tmp_path, tiny_model_dir, shapes_dir, capfd, caplog):
    folder = tmp_path / "pictures"
    folder.mkdir()
    for path in validation_images(shapes_dir, 3):
        Image.open(path).save(folder / os.path.basename(path))
    (folder / "broken.jpg").write_text("not an image")
    (folder / "notes.txt").write_text("ignored: not an image extension")
    (folder / "._00000.png").write_bytes(b"\x00\x05\x16\x07")  # macOS metadata beside a copied photo: hidden
    (folder / ".thumbnails").mkdir()
    Image.open(validation_images(shapes_dir, 1)[0]).save(folder / ".thumbnails" / "00000.png")
    result = run_main(["caption", folder, "--model", tiny_model_dir, "--batch_size", "2"], capfd, caplog)
    assert result.returncode == 1  # one file could not be read
    assert "broken.jpg: skipped, not an image file" in result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(folder / f"{i:05d}.png") for i in range(3)]
    captioner = Captioner(tiny_model_dir)
    assert [line.split("\t")[1] for line in lines] == captioner.caption(
        [Image.open(folder / f"{i:05d}.png").convert("RGB") for i in range(3)]
    )


def test_caption_output_keeps_every_finished_batch_when_interrupted(tmp_path, tiny_model_dir, shapes_dir, monkeypatch,
                                                                     capsys):  # fmt: skip
    from blip_recipes.cli import main

    images = validation_images(shapes_dir, 5)
    output = tmp_path / "captions.jsonl"
    assert main(["caption", *images, "--model", tiny_model_dir, "--batch_size", "2", "--output", str(output)]) == 0
    everything = read_jsonl(output)
    assert [row["image"] for row in everything] == images
    calls = []

    def caption_twice_then_ctrl_c(self, batch):
        calls.append(len(batch))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, batch)

    original = Captioner.caption
    monkeypatch.setattr(Captioner, "caption", caption_twice_then_ctrl_c)
    assert main(["caption", *images, "--model", tiny_model_dir, "--batch_size", "2", "--output", str(output)]) == 130
    assert read_jsonl(f"{output}.partial") == everything[:4]  # the two finished batches, whole lines only
    assert f"interrupted (Ctrl-C): the 4 captions made so far are in {output}.partial" in capsys.readouterr().err
    assert read_jsonl(output) == everything  # the earlier run's file, untouched


def test_caption_output_on_a_full_disk_keeps_whole_batches_and_says_so(tmp_path, tiny_model_dir, shapes_dir, capfd,
                                                                         caplog):  # fmt: skip
    import resource
    import signal

    images = validation_images(shapes_dir, 5)
    everything = tmp_path / "everything.jsonl"
    assert (
        run_main(["caption", *images, "--model", tiny_model_dir, "--output", everything], capfd, caplog).returncode
        == 0
    )
    lines = everything.read_text(encoding="utf-8").splitlines(keepends=True)
    first_batch = "".join(lines[:2])
    limit = len(first_batch.encode()) + 20  # the second batch fits only partly, as on a disk that fills up

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    output = tmp_path / "captions.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "blip_recipes.cli", "caption", *images, "--model", tiny_model_dir, "--batch_size", "2",
         "--output", str(output)],
        cwd=REPO, capture_output=True, text=True, preexec_fn=small_files, timeout=300,
    )  # fmt: skip
    assert result.returncode == 4 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"error: could not write to {output}.partial (File too large): the 2 captions made before are in it" in (
        result.stderr
    )
    assert open(f"{output}.partial", encoding="utf-8").read() == first_batch  # no half line of the second batch
    assert not output.exists()


def test_push_command_uploads_a_finished_run(lora_run):
    with FakeHub() as hub:
        result = run_cli(["push", str(lora_run), "--hub_model_id", "me/pushed", "--token", "hf_x", "--revision",
                          "exp-1"], env={"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    # To a branch, created first: the Hub uploads only to a branch that exists.
    assert hub.branches == {"me/pushed": {"exp-1"}} and [c["revision"] for c in hub.commits] == ["exp-1"]
    files = hub.commits[0]["files"]
    assert "adapter_model.safetensors" in files and "README.md" in files and "model_card.json" not in files
    # The card was written for the run's own name (no hub_model_id at training): pushed elsewhere, its usage
    # snippet and model-index name the repo it is pushed to, and the branch (loaders read main unless told).
    card = files["README.md"].decode()
    assert 'PeftModel.from_pretrained(base, "me/pushed", revision="exp-1")' in card and "name: pushed" in card
    assert 'BlipProcessor.from_pretrained("me/pushed", revision="exp-1")' in card
    assert "blip-recipes caption photo.jpg --model me/pushed --revision exp-1" in card
    assert os.path.basename(lora_run) not in card.replace(str(lora_run), "")


def test_push_command_rewrites_a_card_whose_metadata_the_hub_would_refuse(tmp_path, lora_run):
    """Cards written before the metadata kept to Hub ids named builtin:tiny-blip and builtin:shapes there."""
    older = tmp_path / "older-run"
    shutil.copytree(lora_run, older)
    inputs = json.loads((older / "model_card.json").read_text())
    for key in ("base_model_id", "dataset_id"):
        inputs.pop(key)
    (older / "model_card.json").write_text(json.dumps(inputs))
    card = (older / "README.md").read_text()
    (older / "README.md").write_text(card.replace("---\n", "---\nbase_model: builtin:tiny-blip\n", 1))
    with FakeHub() as hub:
        result = run_cli(["push", str(older), "--hub_model_id", inputs["repo_id"], "--token", "hf_x"],
                         env={"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "base_model:" not in hub.commits[0]["files"]["README.md"].decode()
    assert hub.commits[0]["revision"] == "main" and "revision=" not in hub.commits[0]["files"]["README.md"].decode()


def test_push_command_pushes_an_older_runs_card_as_it_is_and_says_so(tmp_path, lora_run):
    older = tmp_path / "older-run"
    shutil.copytree(lora_run, older)
    os.remove(older / "model_card.json")
    card = (older / "README.md").read_text()
    with FakeHub() as hub:
        result = run_cli(["push", str(older), "--hub_model_id", "me/older", "--token", "hf_x"],
                         env={"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"})  # fmt: skip
    assert result.returncode == 0 and "its README.md is pushed as written" in result.stderr, result.stderr[-2000:]
    assert hub.commits[0]["files"]["README.md"].decode() == card


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "blip_recipes.cli", "serve", "--model", tiny_model_dir, "--port", str(port),
         "--max_upload_mb", "0.05"],
        cwd=REPO, env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail(process.stdout.read()[-2000:])
    yield url
    process.terminate()
    process.wait(timeout=30)


def png_bytes(color=(200, 40, 40)):
    buffer = io.BytesIO()
    Image.new("RGB", (96, 96), color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_http_caption_and_health(server, tiny_model_dir):
    health = httpx.get(f"{server}/health").json()
    assert health == {"status": "ok", "model": tiny_model_dir, "waiting": 0, "generating": 0, "captioned": 0,
                      "failed": 0}  # fmt: skip
    response = httpx.post(f"{server}/caption", files={"file": ("red.png", png_bytes(), "image/png")}, timeout=60)
    assert response.status_code == 200, response.text
    caption = response.json()["caption"]
    expected = Captioner(tiny_model_dir).caption([Image.open(io.BytesIO(png_bytes())).convert("RGB")])[0]
    assert caption == expected


def test_concurrent_requests_get_the_captions_each_image_gets_alone(server, tiny_model_dir, shapes_dir):
    """Requests that arrive while a generation runs are captioned together (serve.CaptionBatcher): a batch's captions
    are the ones each image gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    paths = validation_images(shapes_dir, count=6)
    uploads = [Path(path).read_bytes() for path in paths]

    def post(data):
        return httpx.post(f"{server}/caption", files={"file": ("a.png", data, "image/png")}, timeout=60)

    with ThreadPoolExecutor(len(uploads)) as pool:
        responses = list(pool.map(post, uploads))
    captioner = Captioner(tiny_model_dir)
    alone = [captioner.caption([Image.open(path).convert("RGB")])[0] for path in paths]
    assert [response.json()["caption"] for response in responses] == alone
    assert captioner.caption([Image.open(path).convert("RGB") for path in paths]) == alone


@pytest.mark.parametrize(
    "files, status, message",
    [
        ({"file": ("notes.txt", b"hello, not an image", "text/plain")}, 415, "not a usable image"),
        ({"file": ("big.png", os.urandom(80_000), "image/png")}, 413, "larger than"),
        ({"file": ("empty.png", b"", "image/png")}, 400, "empty upload"),
        ({"other": ("x.png", b"123", "image/png")}, 422, "file"),
    ],
)
def test_bad_uploads_get_4xx_with_a_message(server, files, status, message):
    response = httpx.post(f"{server}/caption", files=files, timeout=60)
    assert response.status_code == status, response.text
    assert message in json.dumps(response.json())


def test_training_can_start_from_a_fine_tuned_checkpoint(tmp_path, capfd, caplog):
    first = tmp_path / "first"
    result = run_main(["train", recipe("full"), "--output_dir", first, "--max_steps", "2", *QUICK], capfd, caplog)
    assert result.returncode == 0
    second = run_main(["train", recipe("frozen_vision"), "--model_name_or_path", first, "--output_dir",
                       tmp_path / "second", "--max_steps", "2", *QUICK], capfd, caplog)  # fmt: skip
    assert second.returncode == 0, second.stderr[-2000:]
    from safetensors.torch import load_file

    before, after = load_file(first / "model.safetensors"), load_file(tmp_path / "second" / "model.safetensors")
    vision = [name for name in before if name.startswith("vision_model.")]
    assert vision and all(torch.equal(before[n], after[n]) for n in vision)  # continued, vision frozen
    assert any(not torch.equal(before[n], after[n]) for n in before if n.startswith("text_decoder."))
