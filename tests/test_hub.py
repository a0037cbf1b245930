"""Publishing through the real huggingface_hub client against a local Hub endpoint."""

import glob
import json
import os
import re
import shutil
import sys
import time

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load

from tests.conftest import QUICK, read_json, run_cli, run_main
from tests.fake_hub import FakeHub

TOKEN = "hf_SENTINELpushTOKEN0123456789abcd"
TRAIN = ["train", "recipes/shapes/lora.yaml", *QUICK, "--max_steps", "3", "--do_eval", "true", "--max_eval_samples",
         "8", "--eval_metrics", "bleu,rouge_l,cider", "--merge_lora", "true"]  # fmt: skip


@pytest.fixture()
def hub():
    with FakeHub() as fake:
        yield fake


def online(hub):
    return {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_TOKEN": ""}


def test_push_uploads_the_model_and_a_card_with_the_metrics(tmp_path, hub):
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    (output_dir / ".env").write_text("AWS_SECRET=do-not-upload\n")
    result = run_cli([*TRAIN, "--output_dir", str(output_dir), "--push_to_hub", "true", "--hub_model_id",
                      "me/blip-shapes-lora", "--hub_token", TOKEN, "--hub_strategy", "end", "--push_merged", "true",
                      "--save_strategy", "steps", "--save_steps", "2"], env=online(hub))  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert [c["repo"] for c in hub.created] == ["me/blip-shapes-lora", "me/blip-shapes-lora-merged"]
    assert [c["revision"] for c in hub.commits] == ["main", "main"] and not hub.branches
    adapter, merged = hub.commits
    assert set(adapter["files"]) == {
        "adapter_model.safetensors",
        "generation_config.json",  # the recipe's decoding settings travel with the adapter
        "adapter_config.json",
        "README.md",
        "eval_results.json",
        "recipe.yaml",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }  # no checkpoint-*, no .env, no evaluations/, no merged/, no optimizer state
    assert {"model.safetensors", "config.json", "README.md"} <= set(merged["files"])
    assert not any(name.startswith(("checkpoint", "evaluations", ".")) for name in merged["files"])

    card = ModelCard(adapter["files"]["README.md"].decode())
    # builtin:tiny-blip and builtin:shapes are no Hub ids: the Hub refuses a commit whose card metadata names one
    # (the fake Hub's validate-yaml too); the README passed it before anything was uploaded.
    assert card.data.base_model is None and card.data.datasets is None and card.data.library_name == "peft"
    assert len(hub.validated) == 2 and 'base = BlipForConditionalGeneration.from_pretrained("builtin:tiny-blip")' in (
        card.text
    )
    results = read_json(output_dir / "eval_results.json")
    reported = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert reported == {name: round(results[f"eval_{name}"], 4) for name in ("bleu_1", "bleu_2", "bleu_3", "bleu_4",
                                                                            "rouge_l", "cider")}  # fmt: skip
    assert "training_mode: lora" in card.text and "--hub_token" not in card.text

    # The token went out in the Authorization header and nowhere else.
    assert all(auth == f"Bearer {TOKEN}" for _, _, auth in hub.requests)
    assert TOKEN not in log
    for commit in hub.commits:
        assert not any(TOKEN.encode() in content for content in commit["files"].values())
    for path in glob.glob(f"{output_dir}/**/*", recursive=True):
        if os.path.isfile(path):
            assert TOKEN.encode() not in open(path, "rb").read(), path


def test_every_save_pushes_model_files_of_each_checkpoint(tmp_path, hub):
    """...to the branch hub_revision names (created when missing), with the merged model and the final push; with
    hub_always_push, every checkpoint, in order, even one saved while the one before still uploads."""
    result = run_cli([*TRAIN, "--output_dir", str(tmp_path / "run"), "--push_to_hub", "true", "--hub_model_id",
                      "me/every", "--hub_token", TOKEN, "--save_strategy", "steps", "--save_steps", "2",
                      "--hub_revision", "exp-1", "--push_merged", "true", "--hub_always_push", "true"],
                     env=online(hub))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [c["summary"] for c in hub.commits]  # checkpoints at steps 2 and 3 (the last step), then the end
    assert summaries == [
        "Training in progress, step 2",
        "Training in progress, step 3",
        "Upload fine-tuned BLIP (blip-recipes)",
        "Upload fine-tuned BLIP (blip-recipes)",
    ]
    assert [c["repo"] for c in hub.commits] == ["me/every"] * 3 + ["me/every-merged"]
    assert all(c["revision"] == "exp-1" for c in hub.commits)
    assert hub.branches == {"me/every": {"exp-1"}, "me/every-merged": {"exp-1"}}
    # Loaders read main unless told: the cards' snippets name the branch.
    adapter_card, merged_card = (hub.commits[i]["files"]["README.md"].decode() for i in (2, 3))
    assert 'PeftModel.from_pretrained(base, "me/every", revision="exp-1")' in adapter_card
    assert 'BlipForConditionalGeneration.from_pretrained("me/every-merged", revision="exp-1")' in merged_card
    assert not any(name.endswith((".pt", ".pth")) or "optimizer" in name for name in hub.commits[0]["files"])
    # peft writes a template card into each adapter checkpoint whose metadata names the local base by path, which
    # the Hub refuses (so did the fake Hub): checkpoints go without it, the run's own card comes at the end.
    assert [("README.md" in commit["files"]) for commit in hub.commits] == [False, False, True, True]


@pytest.mark.parametrize("always_push", [False, True])
def test_checkpoint_pushes_upload_while_training_goes_on(tmp_path, hub, monkeypatch, caplog, always_push):
    """Each commit takes 1 s: a save returns at once (a synchronous push held training for the whole upload), the
    checkpoints saved during an upload are not pushed (the Trainer's rule) unless hub_always_push, which pushes
    each in order; wait() lets them finish before the final push, and a checkpoint that save_total_limit removes
    meanwhile is still pushed whole. The callback in a real run: test_every_save_pushes_model_files_of_each_..."""
    import logging
    from types import SimpleNamespace

    from huggingface_hub import constants
    from safetensors.torch import save_file

    from blip_recipes.hub import STAGING_DIR, HubPushCallback

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)  # HfApi reads it when made
    hub.commit_seconds = 1.0
    pushes = HubPushCallback("me/bg", TOKEN, None, always_push=always_push)
    args = SimpleNamespace(output_dir=str(tmp_path))
    state = SimpleNamespace(is_world_process_zero=True, global_step=0)
    caplog.set_level(logging.INFO, logger="blip_recipes.hub")
    pushes.on_train_begin(args, state, None)
    for step in (1, 2, 3):
        checkpoint = tmp_path / f"checkpoint-{step}"
        checkpoint.mkdir()
        save_file({"weight": torch.full((2,), float(step))}, checkpoint / "model.safetensors")
        (checkpoint / "optimizer.pt").write_bytes(b"never pushed")
        state.global_step = step
        started = time.monotonic()
        pushes.on_save(args, state, None)
        assert time.monotonic() - started < 0.5  # the upload takes 1 s
        if step > 1:
            shutil.rmtree(tmp_path / f"checkpoint-{step - 1}")  # save_total_limit: 1
    pushes.wait()
    steps = [1, 2, 3] if always_push else [1]
    assert [commit["summary"] for commit in hub.commits] == [f"Training in progress, step {step}" for step in steps]
    for step, commit in zip(steps, hub.commits):
        assert set(commit["files"]) == {"model.safetensors"}
        assert load(commit["files"]["model.safetensors"])["weight"].tolist() == [float(step)] * 2
    skipped = [record.getMessage() for record in caplog.records if "is not pushed" in record.getMessage()]
    assert skipped == ([] if always_push else ["checkpoint-2 is not pushed: checkpoint-1 is still uploading "
                                               "(hub_always_push: true pushes every checkpoint)",
                                               "checkpoint-3 is not pushed: checkpoint-1 is still uploading "
                                               "(hub_always_push: true pushes every checkpoint)"])  # fmt: skip
    assert not os.path.exists(tmp_path / STAGING_DIR)


UNREACHABLE = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}


@pytest.mark.parametrize(
    "env, token, reason",
    [
        ({"HF_HUB_OFFLINE": "1"}, ["--hub_token", TOKEN], "HF_HUB_OFFLINE is set"),
        ({**UNREACHABLE, "HF_TOKEN": ""}, [], "there is no Hub token (set HF_TOKEN, run `hf auth login`"),
    ],
    ids=["offline", "no-token"],
)
def test_a_push_that_could_never_work_is_refused_before_training(tmp_path, env, token, reason, capfd, caplog):
    output_dir = tmp_path / "run"
    arguments = [
        *TRAIN,
        "--output_dir",
        str(output_dir),
        "--push_to_hub",
        "true",
        "--hub_model_id",
        "me/never",
        *token,
    ]
    if env == {"HF_HUB_OFFLINE": "1"}:  # as this test process runs (conftest): no interpreter of its own needed
        result = run_main(arguments, capfd, caplog)
    else:  # huggingface_hub reads the endpoint and the token file's path at import
        result = run_cli(arguments, env={**env, "HF_TOKEN_PATH": str(tmp_path / "no-saved-login")})
    log = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in log, log[-3000:]
    assert f"push_to_hub: true, but {reason}" in log and "push the finished run later (blip-recipes push" in log
    assert TOKEN not in log and not os.path.exists(output_dir / "adapter_model.safetensors")


def test_a_push_that_fails_at_the_end_is_fast_clear_and_loses_nothing(tmp_path):
    output_dir = tmp_path / "run"
    start = time.monotonic()
    result = run_cli([*TRAIN, "--output_dir", str(output_dir), "--push_to_hub", "true", "--hub_model_id",
                      "me/never", "--hub_token", TOKEN, "--hub_strategy", "end"], env=UNREACHABLE)  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 3, log[-3000:]
    assert "push to me/never failed" in log
    assert f"The run is saved in {output_dir}" in log and TOKEN not in log
    assert time.monotonic() - start < 120
    for name in ("adapter_model.safetensors", "README.md", "eval_results.json", "merged/model.safetensors"):
        assert os.path.isfile(output_dir / name), name
    assert json.loads((output_dir / "eval_results.json").read_text())["eval_cider"] >= 0


def test_the_card_names_base_model_and_dataset_by_hub_id_only(tmp_path):
    """A card naming local data or a local model in its metadata is refused by the Hub at the push, after training
    ("datasets[0] with value /var/hf/images/ is not valid"); they are named in the text instead."""
    from blip_recipes.hub import build_model_card, hub_dataset_id, hub_model_id
    from tests.fake_hub import metadata_problem

    data = tmp_path / "captions.jsonl"
    data.write_text("{}\n")
    parent = tmp_path / "stage-1"  # a local run this project wrote: its card inputs name its own Hub base
    parent.mkdir()
    (parent / "model_card.json").write_text(json.dumps({"base_model_id": "Salesforce/blip-image-captioning-base"}))
    assert hub_dataset_id(str(data)) is None and hub_dataset_id("data/elsewhere.jsonl") is None
    assert hub_dataset_id("/data/cc3m/*.tar") is None and hub_dataset_id("builtin:shapes") is None
    assert hub_dataset_id("ybelkada/football-dataset") == "ybelkada/football-dataset"
    assert hub_model_id("builtin:tiny-blip") is None and hub_model_id(str(tmp_path)) is None
    assert hub_model_id(str(parent)) == "Salesforce/blip-image-captioning-base"
    assert hub_model_id("Salesforce/blip-image-captioning-large") == "Salesforce/blip-image-captioning-large"
    common = dict(training_mode="full", recipe_yaml="seed: 1\n", generation={"num_beams": 3},
                  metrics={"validation": {"cider": 1.5}})  # fmt: skip
    ids = dict(base_model_id=hub_model_id(str(parent)), dataset_id=hub_dataset_id(str(data)))
    local = build_model_card("me/blip", base_model=str(parent), dataset=str(data), **common, **ids)
    assert metadata_problem(str(local)) is None
    assert local.data.base_model == "Salesforce/blip-image-captioning-base" and local.data.datasets is None
    assert local.data.eval_results[0].dataset_name == "captions.jsonl" and "on `captions.jsonl`" in local.text
    shards = build_model_card("me/blip", base_model=str(parent), dataset="/data/cc3m/*.tar", **common, **ids)
    assert "on `cc3m/*.tar`" in shards.text  # not "*.tar"
    # A run that scored another dataset (eval_dataset_name: a stream's, or any run's) reports its results under that
    # one: they were filed under the training stream's name. The metadata lists both Hub datasets.
    coco = "yerevann/coco-karpathy"
    scored = build_model_card("me/blip", base_model=str(parent), dataset="/data/cc3m/*.tar", **common, **ids,
                              eval_dataset=coco, eval_dataset_id=coco)  # fmt: skip
    assert {result.dataset_name for result in scored.data.eval_results} == {"yerevann/coco-karpathy"}
    assert scored.data.datasets == ["yerevann/coco-karpathy"] and metadata_problem(str(scored)) is None
    assert "fine-tuned for image captioning on `cc3m/*.tar`" in scored.text
    assert "PTB tokenization) on `yerevann/coco-karpathy`" in scored.text
    hub = build_model_card("me/blip", base_model="Salesforce/blip-image-captioning-base",
                           dataset="ybelkada/football-dataset", **common,
                           base_model_id="Salesforce/blip-image-captioning-base",
                           dataset_id="ybelkada/football-dataset")  # fmt: skip
    assert hub.data.datasets == ["ybelkada/football-dataset"]
    assert hub.data.eval_results[0].dataset_type == "ybelkada/football-dataset"
    # extra_train_datasets: the card names every dataset trained on, the metadata each Hub one (a local path never)
    mixed = build_model_card("me/blip", base_model=str(parent), dataset=coco, dataset_id=coco, **common,
                             extra_datasets=(str(data), "someone/more-captions"))  # fmt: skip
    assert "on `yerevann/coco-karpathy + captions.jsonl + someone/more-captions`" in mixed.text
    assert mixed.data.datasets == [coco, "someone/more-captions"] and metadata_problem(str(mixed)) is None
    assert {result.dataset_name for result in mixed.data.eval_results} == {coco}
    # extra_eval_datasets: each split's results filed under its own dataset (the label ends in " of SOURCE")
    metrics = {"test": {"cider": 1.0}, "validation of nocaps (first 10 of 4,500 images)": {"cider": 0.5}}
    nocaps = build_model_card("me/blip", base_model=str(parent), dataset=coco, dataset_id=coco,
                              **{**common, "metrics": metrics},
                              extra_scored={"nocaps": "lmms-lab/NoCaps"})  # fmt: skip
    filed = {(result.dataset_name, result.dataset_split, result.metric_value) for result in nocaps.data.eval_results}
    assert filed == {(coco, "test", 1.0), ("lmms-lab/NoCaps", "validation (first 10 of 4,500 images)", 0.5)}
    assert nocaps.data.datasets == [coco, "lmms-lab/NoCaps"] and metadata_problem(str(nocaps)) is None
    assert "on `yerevann/coco-karpathy`, `lmms-lab/NoCaps`" in nocaps.text
    unvalidated = build_model_card("me/blip", base_model="x", dataset="y", **common, base_model_id="/home/me/blip")
    assert 'base_model" with value "/home/me/blip" is not valid' in metadata_problem(str(unvalidated))


def test_a_hub_model_is_downloaded_trained_on_named_by_its_id_and_used_from_the_cache_offline(
    tmp_path, tiny_model_dir, shapes_dir
):
    """`model_name_or_path: someone/tiny-blip` through a local Hub: transformers downloads the model, a LoRA run on
    it names the Hub id as its base (adapter config and card metadata: a local cache path would be refused by the
    Hub), and its adapter captions the same later on a machine that cannot reach the Hub, from the Hub cache."""
    image = os.path.join(shapes_dir, "validation", "00000.png")
    cache = {"HF_HUB_CACHE": str(tmp_path / "hub-cache"), "HF_DATASETS_OFFLINE": "0"}
    with FakeHub(models={"someone/tiny-blip": tiny_model_dir}) as fake:
        env = {**online(fake), **cache}
        train = run_cli([*TRAIN, "--model_name_or_path", "someone/tiny-blip", "--output_dir", str(tmp_path / "run"),
                         "--max_steps", "2", "--do_eval", "false", "--merge_lora", "false"], env=env)  # fmt: skip
        assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
        fetched = {path.rsplit("/", 1)[-1] for method, path, _ in fake.requests if method == "GET"}
        assert "model.safetensors" in fetched and "tokenizer.json" in fetched
        captioned = run_cli(["caption", image, "--model", str(tmp_path / "run")], env=env)
    assert captioned.returncode == 0, captioned.stderr[-3000:]
    assert read_json(tmp_path / "run" / "adapter_config.json")["base_model_name_or_path"] == "someone/tiny-blip"
    assert ModelCard.load(tmp_path / "run" / "README.md").data.base_model == "someone/tiny-blip"
    offline = run_cli(["caption", image, "--model", str(tmp_path / "run")], env={**UNREACHABLE, **cache})
    assert offline.returncode == 0, offline.stderr[-3000:]
    assert offline.stdout == captioned.stdout and captioned.stdout.startswith(image + "\t")


def folder_files(folder) -> dict:
    """{relative path: bytes} of every file under `folder`."""
    found = {}
    for root, _dirs, names in os.walk(folder):
        for name in names:
            with open(os.path.join(root, name), "rb") as handle:
                found[os.path.relpath(os.path.join(root, name), folder)] = handle.read()
    return found


def test_hub_strategy_checkpoint_keeps_the_newest_checkpoint_whole_and_a_resume_fetches_it(tmp_path, hub,
                                                                                             monkeypatch):  # fmt: skip
    """On the branch hub_revision names, each push replaces last-checkpoint/ in one commit (files the newer
    checkpoint lacks deleted: a process count that shrank leaves no stale rng_state_1.pth), the top of the repo gets
    the model files only; the fetch puts it into output_dir/checkpoint-N byte for byte, keeps a complete local copy
    of that step, replaces one cut off while being written, and says why when there is nothing to fetch. The run
    that pushes and resumes from it: test_a_run_whose_disk_is_gone_continues_from_the_hubs_last_checkpoint."""
    from types import SimpleNamespace

    from huggingface_hub import constants
    from safetensors.torch import save_file

    from blip_recipes.hub import HubCheckpointError, HubPushCallback, fetch_last_checkpoint

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)  # HfApi reads it when made
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    run = tmp_path / "run"
    pushes = HubPushCallback("me/spot", TOKEN, None, revision="exp-1", whole=True)
    args, state = SimpleNamespace(output_dir=str(run)), SimpleNamespace(is_world_process_zero=True, global_step=0)
    pushes.on_train_begin(args, state, None)
    for step, processes in ((2, 2), (4, 1)):
        checkpoint = run / f"checkpoint-{step}"
        (checkpoint / "global_step").mkdir(parents=True)  # a subfolder, as DeepSpeed's and FSDP's checkpoints have
        save_file({"weight": torch.full((2,), float(step))}, checkpoint / "model.safetensors")
        (checkpoint / "optimizer.pt").write_bytes(b"moments %d" % step)
        (checkpoint / "global_step" / "shard.pt").write_bytes(b"shard %d" % step)
        for rank in range(processes):
            (checkpoint / f"rng_state_{rank}.pth").write_bytes(b"rng %d" % rank)
        (checkpoint / "README.md").write_text("---\nbase_model: /a/local/path\n---\n")  # peft's template
        (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        state.global_step = step
        pushes.on_save(args, state, None)
        pushes.wait()
    assert [commit["summary"] for commit in hub.commits] == ["Training in progress, step 2", "Training in progress, "
                                                             "step 4"]  # fmt: skip
    assert hub.commits[1]["deleted"] == ["last-checkpoint/rng_state_1.pth"]
    expected = {name: data for name, data in folder_files(run / "checkpoint-4").items() if name != "README.md"}
    on_hub = hub.files("me/spot", "exp-1")
    assert on_hub == {"model.safetensors": expected["model.safetensors"],
                      **{f"last-checkpoint/{name}": data for name, data in expected.items()}}  # fmt: skip
    assert pushes.pushed_step == 4

    elsewhere = tmp_path / "elsewhere"  # another machine: the run's folder is gone
    fetched = fetch_last_checkpoint("me/spot", "exp-1", TOKEN, str(elsewhere))
    assert fetched == str(elsewhere / "checkpoint-4") and os.listdir(elsewhere) == ["checkpoint-4"]
    assert folder_files(fetched) == expected
    (elsewhere / "checkpoint-4" / "optimizer.pt").write_bytes(b"kept")  # complete here: not downloaded again
    downloads = len([path for method, path, _ in hub.requests if method == "GET" and "/resolve/" in path])
    assert fetch_last_checkpoint("me/spot", "exp-1", TOKEN, str(elsewhere)) == fetched
    assert (elsewhere / "checkpoint-4" / "optimizer.pt").read_bytes() == b"kept"
    assert [path for method, path, _ in hub.requests if method == "GET" and "/resolve/" in path][downloads:] == [
        "/me/spot/resolve/exp-1/last-checkpoint/trainer_state.json"
    ]
    (elsewhere / "checkpoint-4" / "trainer_state.json").unlink()  # cut off while being written: replaced
    assert folder_files(fetch_last_checkpoint("me/spot", "exp-1", TOKEN, str(elsewhere))) == expected
    assert os.listdir(elsewhere) == ["checkpoint-4"]  # no download folder left behind

    with pytest.raises(HubCheckpointError, match=r"listing me/none failed \(RepositoryNotFoundError"):
        fetch_last_checkpoint("me/none", None, TOKEN, str(tmp_path / "none"))
    with pytest.raises(HubCheckpointError, match="me/spot .revision main. has no last-checkpoint/"):
        fetch_last_checkpoint("me/spot", "main", TOKEN, str(tmp_path / "main"))  # pushed to the branch only
    everysave = HubPushCallback("me/every", TOKEN, None)
    state.global_step = 4
    everysave.on_save(args, state, None)
    everysave.wait()
    assert set(hub.files("me/every")) == {"model.safetensors"}
    with pytest.raises(HubCheckpointError, match="me/every has no last-checkpoint/ .a run with push_to_hub and "
                       "hub_strategy: checkpoint uploads one at each save"):  # fmt: skip
        fetch_last_checkpoint("me/every", None, TOKEN, str(tmp_path / "every"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubCheckpointError, match="HF_HUB_OFFLINE is set"):
        fetch_last_checkpoint("me/spot", "exp-1", TOKEN, str(tmp_path / "offline"))
    assert all(auth == f"Bearer {TOKEN}" for _, path, auth in hub.requests if "/me/" in path)


def test_a_run_whose_disk_is_gone_continues_from_the_hubs_last_checkpoint(tmp_path, hub, capfd, caplog):
    """A spot instance: pre-empted with hub_strategy: checkpoint, its disk lost; the job re-queued elsewhere with
    --resume_from_checkpoint hub downloads the repo's last-checkpoint/ and continues: the weights an uninterrupted
    run reaches. Nothing pushed holds the token."""
    import signal

    from tests.conftest import signal_at

    recipe = ["train", "recipes/shapes/full.yaml", *QUICK, "--save_strategy", "steps", "--save_steps", "2",
              "--push_to_hub", "true", "--hub_model_id", "me/spot", "--hub_token", TOKEN, "--hub_strategy",
              "checkpoint"]  # fmt: skip
    first = tmp_path / "first"
    code, log = signal_at([*recipe, "--output_dir", str(first), "--max_steps", "60"], "pushed checkpoint-2 to me/spot",
                          signal.SIGTERM, env=online(hub))  # fmt: skip
    assert code == 143, log[-3000:]
    pushed = json.loads(hub.files("me/spot")["last-checkpoint/trainer_state.json"])["global_step"]
    assert f"me/spot's last-checkpoint/ holds step {pushed} (--resume_from_checkpoint hub" in log
    assert {f"last-checkpoint/{name}": data for name, data in folder_files(first / f"checkpoint-{pushed}").items()
            if name != "README.md"}.items() <= hub.files("me/spot").items()  # fmt: skip
    shutil.rmtree(first)

    # Re-queued on a machine with two processes (8 images each: the same global batch); the main one fetches.
    second = tmp_path / "second"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--main_process_port", "29533", "-m", "blip_recipes.cli"]  # fmt: skip
    result = run_cli([*recipe, "--output_dir", str(second), "--max_steps", str(pushed + 2), "--resume_from_checkpoint",
                      "hub", "--per_device_train_batch_size", "8", "--log_level_replica", "info"], env=online(hub),
                     launcher=launcher)  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert len(re.findall(r"processes: world_size=2 \(distributed, device cpu:0, engine DDP\)", log)) == 2
    assert log.count(f"fetched me/spot's last-checkpoint/ (step {pushed}) into {second}/checkpoint-{pushed}") == 1
    steps = [entry["step"] for entry in read_json(second / "trainer_state.json")["log_history"] if "loss" in entry]
    assert steps == list(range(1, pushed + 3))  # the fetched checkpoint's history, then the two steps trained here
    straight = run_main(["train", "recipes/shapes/full.yaml", *QUICK, "--output_dir", tmp_path / "straight",
                         "--max_steps", pushed + 2], capfd, caplog)  # fmt: skip
    assert straight.returncode == 0, straight.stderr[-3000:]
    resumed, reference = (
        load((folder / "model.safetensors").read_bytes()) for folder in (second, tmp_path / "straight")
    )
    for name, tensor in reference.items():  # two processes sum the batch's gradients in another order
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-5, msg=name)
    # The finished run's final push; last-checkpoint/ stays, its newest save (as the Trainer leaves it).
    assert json.loads(hub.files("me/spot")["last-checkpoint/trainer_state.json"])["global_step"] == pushed + 2
    assert hub.commits[-1]["summary"] == "Upload fine-tuned BLIP (blip-recipes)"
    for commit in hub.commits:
        assert not any(TOKEN.encode() in content for content in commit["files"].values()), commit["summary"]
