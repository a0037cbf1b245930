"""streaming: true: WebDataset shards and a streamed JSONL file, split over processes and DataLoader workers, every
sample exactly once per pass, exact resume mid-stream, bad samples counted as they are met."""

import glob
import io
import json
import logging
import os
import re
import shutil
import sys
from collections import Counter

import pytest
import torch
from PIL import Image

from blip_recipes.data.sources import DataError
from blip_recipes.data.streaming import CaptionStream, TarShard, write_shards
from blip_recipes.transforms import ImageTransform
from tests.conftest import QUICK, REPO, read_json, run_cli, run_main

TRANSFORM = ImageTransform(16, 16, Image.BICUBIC)


def png(color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), color).save(buffer, format="PNG")
    return buffer.getvalue()


def numbered_samples(count: int, captions_each: int = 2):
    """Samples whose captions name them ("sample 7 caption 1"), so the items that come out identify the samples."""
    for number in range(count):
        captions = [f"sample {number} caption {k}" for k in range(captions_each)]
        yield f"s{number:04d}", png((number * 5 % 256, 80, 160)), "png", captions


def sample_of(caption: str) -> int:
    return int(caption.split()[1])


def first_pass(stream_for_process, processes: int, workers: int, items_per_process: int) -> Counter:
    """Captions the processes' DataLoaders yield over `items_per_process` items each."""
    seen = Counter()
    for process in range(processes):
        loader = torch.utils.data.DataLoader(stream_for_process(process), batch_size=5, num_workers=workers,
                                             collate_fn=lambda items: [item["caption"] for item in items])  # fmt: skip
        for batch_number, captions in enumerate(loader):
            seen.update(captions)
            if (batch_number + 1) * 5 >= items_per_process:
                break
    return seen


@pytest.mark.parametrize("shard_count, processes, workers", [(8, 1, 0), (8, 2, 2), (2, 2, 2)],
                         ids=["one-reader", "shards-split-over-4-readers", "fewer-shards-than-readers"])  # fmt: skip
def test_every_sample_exactly_once_per_pass(tmp_path, shard_count, processes, workers):
    paths = write_shards(numbered_samples(40), str(tmp_path), samples_per_shard=40 // shard_count)
    assert len(paths) == shard_count
    shards = [TarShard(path) for path in paths]

    def stream(process):
        return CaptionStream(shards, TRANSFORM, seed=3, process_index=process, num_processes=processes, buffer_size=7)

    # 40 samples x 2 captions over the readers; each reader's pass is 80 / readers items (shards of equal size).
    seen = first_pass(stream, processes, workers, items_per_process=80 // processes)
    assert sorted(seen) == sorted(f"sample {n} caption {k}" for n in range(40) for k in range(2))
    assert set(seen.values()) == {1}

    # Passes are reshuffled: shard order and buffer differ from pass 0 to pass 1, and the seed fixes both.
    order = [sample.key for sample in stream(0).references(0, 0, 1)]
    assert sorted(order) == sorted(f"s{n:04d}" for n in range(40))
    assert order != [sample.key for sample in stream(0).references(1, 0, 1)]
    assert order == [sample.key for sample in stream(0).references(0, 0, 1)]


def test_shards_are_named_by_directory_glob_or_brace_list(tmp_path):
    from blip_recipes.data.streaming import expand_braces, find_shards

    paths = write_shards(numbered_samples(6), str(tmp_path), samples_per_shard=2)
    assert find_shards(str(tmp_path)) == paths
    assert find_shards(str(tmp_path / "shard-*.tar")) == paths
    assert find_shards(str(tmp_path / "shard-{00000..00002}.tar")) == paths
    assert find_shards(str(tmp_path / "shard-{00000,00002}.tar")) == [paths[0], paths[2]]
    assert expand_braces("a-{08..10}-{x,y}.tar") == ["a-08-x.tar", "a-08-y.tar", "a-09-x.tar", "a-09-y.tar",
                                                     "a-10-x.tar", "a-10-y.tar"]  # fmt: skip
    with pytest.raises(DataError, match=r"1 of 4 shards do not exist, e.g. .*shard-00003.tar"):
        find_shards(str(tmp_path / "shard-{00000..00003}.tar"))
    with pytest.raises(DataError, match="the pattern matches no file"):
        find_shards(str(tmp_path / "nothing-*.tar"))


def test_a_resumed_stream_yields_what_an_uninterrupted_one_does(tmp_path):
    """The StatefulDataLoader state after k batches, loaded into a new loader, continues with batch k + 1, with
    two workers, mid-sample (a batch boundary between two captions of one image) and across a pass boundary."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    shards = [TarShard(path) for path in write_shards(numbered_samples(12, 3), str(tmp_path), samples_per_shard=3)]

    def loader():
        stream = CaptionStream(shards, TRANSFORM, seed=5, buffer_size=4)
        return StatefulDataLoader(stream, batch_size=4, num_workers=2,
                                  collate_fn=lambda items: [item["caption"] for item in items])  # fmt: skip

    straight = loader()
    batches, state = [], None
    for number, batch in enumerate(straight):
        batches.append(batch)
        if number == 6:
            state = straight.state_dict()
        if number == 15:  # 16 x 4 = 64 items > 36 per pass: the second pass is under way
            break
    resumed = loader()
    resumed.load_state_dict(json.loads(json.dumps(state)))  # as saved in a checkpoint
    after = []
    for batch in resumed:
        after.append(batch)
        if len(after) == 9:
            break
    assert after == batches[7:]


def test_bad_samples_are_skipped_counted_and_limited(tmp_path, caplog, monkeypatch):
    good = list(numbered_samples(6, 1))
    bad = [("broken", b"not an image", "jpg", "a broken image"), ("empty", png((0, 0, 0)), "png", "  ")]
    paths = write_shards(good[:3] + bad + good[3:], str(tmp_path), samples_per_shard=100)
    with tarfile_without(paths[0], "s0004.json") as shard_path:  # s0004 loses its caption file
        stream = CaptionStream([TarShard(shard_path)], TRANSFORM, seed=0, buffer_size=1)
        with caplog.at_level(logging.WARNING, logger="blip_recipes.data.streaming"):
            captions = [item["caption"] for _, item in zip(range(5), stream)]
        assert sorted(sample_of(caption) for caption in captions) == [0, 1, 2, 3, 5]
        assert stream.position["bad"] == 3 and stream.position["read"] == 8
        log = caplog.text
        assert re.search(r"skipped sample broken of .*: not an image file PIL can read", log)
        assert "skipped sample empty" in log and "an empty caption" in log
        assert "skipped sample s0004" in log and "no caption file" in log

        monkeypatch.setattr("blip_recipes.data.streaming.MIN_SAMPLES_BEFORE_LIMIT", 4)
        strict = CaptionStream([TarShard(shard_path)], TRANSFORM, seed=0, buffer_size=1, max_bad_fraction=0.2)
        with pytest.raises(
            DataError, match=r"1 of 4 samples read were bad, more than max_bad_samples_fraction=0\.2; the last: broken"
        ):
            list(zip(range(10), strict))


class tarfile_without:
    """A copy of a shard without one member (a sample whose caption file is missing)."""

    def __init__(self, path, member):
        self.path, self.member = path, member

    def __enter__(self):
        import tarfile

        target = self.path + ".pruned.tar"
        with tarfile.open(self.path) as source, tarfile.open(target, "w") as output:
            for info in source.getmembers():
                if info.name != self.member:
                    output.addfile(info, source.extractfile(info))
        return target

    def __exit__(self, *exc):
        os.remove(self.path + ".pruned.tar")


def test_a_jsonl_file_streams_through_datasets(tmp_path):
    """Image paths relative to the JSONL file, a list of captions per row; build_stream as a recipe gets it."""
    from blip_recipes.builders import build_stream
    from blip_recipes.config import DataArguments
    from blip_recipes.model import load_processor

    (tmp_path / "images").mkdir()
    rows = []
    for key, image, extension, captions in numbered_samples(10):
        (tmp_path / "images" / f"{key}.{extension}").write_bytes(image)
        rows.append({"image": f"images/{key}.{extension}", "text": captions})
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    processor = load_processor("builtin:tiny-blip")
    data_args = DataArguments(dataset_name=str(tmp_path / "captions.jsonl"), streaming=True, shuffle_buffer_size=3)
    stream = build_stream(data_args, processor.image_processor, seed=1)
    captions = [item["caption"] for _, item in zip(range(20), stream)]
    assert Counter(sample_of(caption) for caption in captions) == {n: 2 for n in range(10)}


@pytest.fixture(scope="module")
def shapes_shards(tmp_path_factory, shapes_dir):
    """builtin:shapes' 480 training images (3 captions each) as 8 WebDataset shards."""
    train = os.path.join(shapes_dir, "train")
    with open(os.path.join(train, "metadata.jsonl"), encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]

    def samples():
        for row in rows:
            with open(os.path.join(train, row["file_name"]), "rb") as image:
                yield row["file_name"].split(".")[0], image.read(), "png", row["text"]

    directory = tmp_path_factory.mktemp("shapes-shards")
    assert len(write_shards(samples(), str(directory), samples_per_shard=60)) == 8
    return str(directory)


def reader_states(position: dict) -> list[dict]:
    """The CaptionStream states inside a saved StatefulDataLoader state (one per worker, or the main process's)."""
    if "_snapshot" in position:
        workers = position["_snapshot"]["_worker_snapshots"]
        return [workers[name]["dataset_state"] for name in sorted(workers)]
    return [position["dataset_state"]]


def streaming_arguments(shards: str, output_dir, *extra) -> list[str]:
    return ["recipes/shapes/full.yaml", "--output_dir", str(output_dir), "--dataset_name", shards,
            "--streaming", "true", "--eval_dataset_name", "builtin:shapes", *QUICK, "--warmup_steps", "0",
            "--per_device_train_batch_size", "10", *extra]  # fmt: skip


def test_streaming_training_resumes_exactly_mid_stream(tmp_path, shapes_shards, capfd, caplog):
    """One process, two DataLoader workers: stopped at step 3 and resumed equals never stopping; resuming with
    another number of workers is refused before anything loads (torchdata failed at the first step)."""
    from blip_recipes.builders import build_trainer
    from blip_recipes.checkpoints import RecipeSnapshotCallback, StreamPositionCallback, load_stream_position
    from blip_recipes.model import unwrap_blip
    from blip_recipes.recipe_parser import parse_recipe

    def run(output_dir, resume=None):
        recipe = parse_recipe([os.path.join(REPO, *streaming_arguments(shapes_shards, output_dir)[0].split("/")),
                               *streaming_arguments(shapes_shards, output_dir)[1:], "--max_steps", "6",
                               "--dataloader_num_workers", "2", "--save_strategy", "steps", "--save_steps", "3",
                               "--save_total_limit", "3", "--do_eval", "false"])  # fmt: skip
        from transformers import set_seed

        set_seed(recipe.training.seed)
        trainer = build_trainer(recipe, callbacks=[StreamPositionCallback(), RecipeSnapshotCallback()])
        if resume is not None:
            trainer.stream_position = load_stream_position(resume, 0)
        trainer.train(resume_from_checkpoint=resume)
        losses = [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
        return {n: p.detach().clone() for n, p in unwrap_blip(trainer.model).named_parameters()}, losses

    straight, straight_losses = run(tmp_path / "straight")
    position = read_json(tmp_path / "straight" / "checkpoint-3" / "stream_position" / "process-0.json")
    # Batches 1 and 3 came from worker 0, batch 2 from worker 1: 20 and 10 items of 3 captions per image.
    assert [(state["reader"], state["sample"], state["caption"]) for state in reader_states(position)] == [
        ([0, 2], 6, 2),
        ([1, 2], 3, 1),
    ]
    shutil.copytree(tmp_path / "straight" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    resumed, resumed_losses = run(tmp_path / "resumed", resume=str(tmp_path / "resumed" / "checkpoint-3"))
    assert [loss for loss in resumed_losses if loss[0] > 3] == [loss for loss in straight_losses if loss[0] > 3]
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)

    checkpoint = tmp_path / "straight" / "checkpoint-3"
    assert read_json(checkpoint / "processes.json")["dataloader_num_workers"] == 2
    refused = run_main(["train", *streaming_arguments(shapes_shards, tmp_path / "straight"), "--max_steps", "9",
                        "--resume_from_checkpoint", checkpoint, "--do_eval", "false"], capfd, caplog)  # fmt: skip
    assert refused.returncode == 2
    assert "its stream position is that of 2 DataLoader workers per process, and this run has 0" in refused.stderr
    assert "Resume with --dataloader_num_workers 2" in refused.stderr


def test_two_processes_stream_disjoint_shards(tmp_path, shapes_shards, capfd, caplog):
    """accelerate launch, 2 gloo processes, one reader each: 720 items per process make one pass each (8 shards of
    60 images x 3 captions, 4 shards per process), so after 72 steps of 10 every reader has used exactly the 240
    samples of its pass 0: each read its own 4 shards once, none twice. Evaluation: builtin:shapes' validation."""
    output_dir = tmp_path / "run"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--main_process_port", "29671", "-m", "blip_recipes.cli"]  # fmt: skip
    result = run_cli(["train", *streaming_arguments(shapes_shards, output_dir), "--max_steps", "72",
                      "--save_strategy", "steps", "--save_steps", "72", "--do_eval", "true", "--eval_metrics", "cider",
                      "--log_level_replica", "info"], launcher=launcher)  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert len(re.findall(r"processes: world_size=2 \(distributed, device cpu:0, engine DDP\)", log)) == 2
    assert "streaming 8 shards" in log and "of split 'train'" not in log  # no training image decoded before step 1
    for process in (0, 1):
        position = read_json(output_dir / "checkpoint-72" / "stream_position" / f"process-{process}.json")
        (dataset_state,) = reader_states(position)
        assert dataset_state["reader"] == [process, 2]
        # All 240 samples of pass 0 used (the next item would start pass 1), each image decoded once.
        assert (dataset_state["pass"], dataset_state["sample"], dataset_state["caption"]) == (0, 240, 0)
        assert dataset_state["read"] == 240 and dataset_state["bad"] == 0
    # Which samples those were, by key: the readers' pass-0 samples, disjoint and together all 480.
    shards = [TarShard(path) for path in sorted(glob.glob(os.path.join(shapes_shards, "*.tar")))]
    keys = [
        [sample.key for sample in CaptionStream(shards, TRANSFORM, seed=42, num_processes=2).references(0, reader, 2)]
        for reader in (0, 1)
    ]
    assert len(keys[0]) == len(keys[1]) == 240 and not set(keys[0]) & set(keys[1])
    assert sorted(keys[0] + keys[1]) == sorted(f"{n:05d}" for n in range(480))
    assert read_json(output_dir / "eval_results.json")["eval_cider"] > 0
    # evaluate with the run's recipe scores its eval_dataset_name (it read the shard folder as a dataset and failed)
    evaluate = ["evaluate", output_dir / "recipe.yaml", "--model", output_dir, "--max_eval_samples", "6",
                "--eval_metrics", "bleu"]  # fmt: skip
    scored = run_main([*evaluate, "--output_dir", tmp_path / "ev"], capfd, caplog)
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert "validation_bleu_4" in read_json(tmp_path / "ev" / "eval_results.json")
    ambiguous = run_main([*evaluate, "--output_dir", tmp_path / "ev2", "--dataset", "builtin:shapes"], capfd, caplog)
    assert ambiguous.returncode == 2 and "name the dataset to score with --eval_dataset_name" in ambiguous.stderr


def test_streaming_needs_max_steps_and_an_eval_source(tmp_path, shapes_shards, capfd, caplog):
    no_steps = run_main(["train", *streaming_arguments(shapes_shards, tmp_path / "a")], capfd, caplog)
    assert no_steps.returncode == 2 and "streaming: true needs max_steps" in no_steps.stderr
    arguments = streaming_arguments(shapes_shards, tmp_path / "b", "--max_steps", "2", "--do_eval", "true")
    no_eval = run_main(["train", *[a for a in arguments if a not in ("--eval_dataset_name", "builtin:shapes")]], capfd,
                       caplog)  # fmt: skip
    assert no_eval.returncode == 2 and "needs eval_dataset_name" in no_eval.stderr
    # A test split alone is scored too (after training): it was let through, to a dataset_name of None.
    arguments = streaming_arguments(shapes_shards, tmp_path / "c", "--max_steps", "2", "--test_split", "validation")
    no_test = run_main(["train", *[a for a in arguments if a not in ("--eval_dataset_name", "builtin:shapes")]], capfd,
                       caplog)  # fmt: skip
    assert no_test.returncode == 2 and "with evaluation or a test_split needs eval_dataset_name" in no_test.stderr


@pytest.mark.parametrize("keys, message", [
    (["--image_cache", "true"], "image_cache does not apply to a stream"),
    (["--max_train_samples", "5"], "max_train_samples does not apply to a stream"),
    (["--training_mode", "frozen_vision", "--cache_vision_features", "true"], "cache_vision_features encodes"),
    (["--training_objective", "scst"], "training_objective scst needs each image's references"),
])  # fmt: skip
def test_what_does_not_apply_to_a_stream_is_refused(tmp_path, keys, message):
    from blip_recipes.config import RecipeError
    from blip_recipes.recipe_parser import parse_recipe

    arguments = streaming_arguments("shards/*.tar", tmp_path, "--max_steps", "2", *keys)
    with pytest.raises(RecipeError, match=message):
        parse_recipe([os.path.join(REPO, arguments[0]), *arguments[1:]])


def test_an_imagefolder_streams_through_datasets(shapes_dir):
    """builtin:shapes is an imagefolder (metadata.jsonl beside the PNGs): streamed, its images are read undecoded
    from the rows and decoded by the stream."""
    from blip_recipes.builders import build_stream
    from blip_recipes.config import DataArguments
    from blip_recipes.model import load_processor

    processor = load_processor("builtin:tiny-blip")
    stream = build_stream(DataArguments(dataset_name=shapes_dir, streaming=True), processor.image_processor, seed=0)
    items = [item for _, item in zip(range(30), stream)]
    assert all(item["pixel_values"].dtype == torch.uint8 and item["pixel_values"].shape[0] == 3 for item in items)
    with open(os.path.join(shapes_dir, "train", "metadata.jsonl"), encoding="utf-8") as handle:
        references = {caption for line in handle for caption in json.loads(line)["text"]}
    assert {item["caption"] for item in items} <= references


def test_a_stream_past_its_bad_sample_limit_stops_the_run_with_a_message(tmp_path, monkeypatch):
    samples = list(numbered_samples(30, 1))
    samples[5:8] = [(f"broken{k}", b"\x00" * 10, "jpg", "broken") for k in range(3)]
    shards = write_shards(samples, str(tmp_path / "shards"), samples_per_shard=30)
    result = run_cli(
        [
            "train",
            *streaming_arguments(
                shards[0],
                tmp_path / "run",
                "--max_steps",
                "20",
                "--max_bad_samples_fraction",
                "0.05",
                "--do_eval",
                "false",
            ),
        ]
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stdout + result.stderr
    assert re.search(r"streaming: \d+ of \d+ samples read were bad, more than max_bad_samples_fraction=0\.05",
                     result.stdout + result.stderr)  # fmt: skip


def test_the_readme_large_dataset_command_is_a_valid_recipe():
    import shlex

    from blip_recipes.recipe_parser import parse_recipe

    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as handle:
        section = handle.read().split("## Large datasets", 1)[1]
    command = shlex.split(section.split("```\n", 2)[1].replace("\\\n", " "))
    assert command[:3] == ["accelerate", "launch", "--config_file"]
    assert os.path.isfile(os.path.join(REPO, command[3]))
    recipe_at = command.index("blip_recipes.train") + 1
    recipe = parse_recipe([os.path.join(REPO, command[recipe_at]), *command[recipe_at + 1 :]])
    assert recipe.data.streaming and recipe.data.dataset_name == "/data/cc3m/cc3m-*.tar"
    assert recipe.training.max_steps == 60000 and recipe.data.eval_dataset_name.endswith("dataset_coco.json")
