"""Broken and unusual images/captions: each is decoded correctly or rejected with its row, path and reason."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from blip_recipes.transforms import BadImageError, ImageTransform, open_image
from tests.conftest import QUICK, read_jsonl, run_main


def save(image, path, **kwargs):
    image.save(path, **kwargs)
    return str(path)


def bad_and_odd_images(directory):
    """{name: path} for every case the issue lists."""
    d = directory
    rgb = Image.new("RGB", (40, 30), (200, 30, 30))
    jpeg = io.BytesIO()
    rgb.save(jpeg, format="JPEG")
    (d / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (d / "empty.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("this is not an image\n")
    rgba = Image.new("RGBA", (20, 20), (0, 0, 255, 0))  # fully transparent blue
    la = Image.new("LA", (20, 20), (0, 0))
    palette = Image.new("P", (20, 20), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    i16 = Image.fromarray(np.full((10, 10), 65535, dtype=np.uint16))
    exif_rotated = Image.new("RGB", (40, 20), (0, 255, 0))
    exif = exif_rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    bomb = Image.new("1", (13_000, 12_000))
    return {
        "truncated": str(d / "truncated.jpg"),
        "zero_bytes": str(d / "empty.jpg"),
        "text_as_jpg": str(d / "text.jpg"),
        "missing": str(d / "missing.jpg"),
        "url": "https://example.com/photo.jpg",  # what many Hub datasets list; never downloaded
        "L": save(Image.new("L", (20, 20), 77), d / "l.png"),
        "LA": save(la, d / "la.png"),
        "P": save(palette, d / "p.png"),
        "RGBA": save(rgba, d / "rgba.png"),
        "CMYK": save(Image.new("CMYK", (20, 20), (0, 255, 255, 0)), d / "cmyk.jpg"),
        "I;16": save(i16, d / "i16.png"),
        "exif_rotated": save(exif_rotated, d / "exif.jpg", exif=exif),
        "one_pixel": save(Image.new("RGB", (1, 1), (10, 20, 30)), d / "one.png"),
        "bomb": save(bomb, d / "bomb.png"),
    }


BAD = {
    "truncated": "truncated or corrupt",
    "zero_bytes": "empty file",
    "text_as_jpg": "not an image file",
    "missing": "file not found",
    "url": "https://example.com/photo.jpg is a URL: images are read from files, never downloaded",
    "bomb": "decompression bomb refused",
}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return bad_and_odd_images(tmp_path_factory.mktemp("odd"))


@pytest.mark.parametrize("name", sorted(BAD))
def test_unusable_images_are_rejected_with_a_reason(images, name):
    with pytest.raises(BadImageError, match=BAD[name]):
        open_image(images[name])


def test_transparency_is_composited_on_white(images):
    for name in ("RGBA", "LA", "P"):
        image = open_image(images[name])
        assert image.mode == "RGB" and image.getpixel((5, 5)) == (255, 255, 255), name


def test_other_modes_become_faithful_rgb(images):
    assert open_image(images["L"]).getpixel((0, 0)) == (77, 77, 77)
    red = open_image(images["CMYK"]).getpixel((3, 3))
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    assert open_image(images["I;16"]).getpixel((0, 0)) == (255, 255, 255)  # 16-bit white stays white
    assert open_image(images["exif_rotated"]).size == (20, 40)  # displayed orientation, not stored
    tiny = ImageTransform(64, 64)(open_image(images["one_pixel"]))
    assert tiny.shape == (3, 64, 64) and tiny[:, 30, 30].tolist() == [10, 20, 30]


def write_dataset(tmp_path, images, shapes_dir):
    """8 good rows from the shapes data, then every bad image and bad caption."""
    metadata = read_jsonl(os.path.join(shapes_dir, "train", "metadata.jsonl"))[:8]
    rows = [{"image": os.path.join(shapes_dir, "train", m["file_name"]), "text": m["text"][0]} for m in metadata]
    rows += [{"image": images[name], "text": f"an image called {name}"} for name in images]
    good = rows[0]["image"]
    rows += [
        {"image": good, "text": ""},
        {"image": good, "text": "   \n "},
        {"image": good, "text": None},
        {"image": good, "text": "a caption that goes on " * 40},  # truncated to max_caption_length
        {"image": good, "text": "un café près de la gare, 一只猫"},
    ]
    path = tmp_path / "odd.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path), rows


def test_bad_rows_are_listed_before_training(tmp_path, images, shapes_dir, capfd, caplog):
    path, rows = write_dataset(tmp_path, images, shapes_dir)
    result = run_main(["train", "recipes/shapes/full.yaml", "--dataset_name", path, "--output_dir", tmp_path / "out",
                       "--max_steps", "2", *QUICK], capfd, caplog)  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 2, log[-3000:]
    assert "9 bad row(s) found before training" in log
    for reason in ("caption is empty", "caption is None"):
        assert reason in log
    for name, reason in BAD.items():
        row = next(i for i, r in enumerate(rows) if r["image"] == images[name])
        assert f"row {row} ({images[name]}): {reason}" in log, name
    assert not os.path.exists(tmp_path / "out")


def test_skip_bad_samples_trains_and_evaluates_on_the_rest(tmp_path, images, shapes_dir, capfd, caplog):
    path, rows = write_dataset(tmp_path, images, shapes_dir)
    output_dir = tmp_path / "out"
    result = run_main(["train", "recipes/shapes/full.yaml", "--dataset_name", path, "--skip_bad_samples", "true",
                       "--validation_split_percentage", "20", "--output_dir", output_dir, "--max_steps", "2", *QUICK,
                       "--do_eval", "true", "--eval_metrics", "bleu,cider"], capfd, caplog)  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert log.count("skipping bad sample:") == 9 and "skipped 9 bad sample(s)" in log
    predictions = read_jsonl(output_dir / "eval_predictions.jsonl")
    # 20% of the listed images are held out (the rows with bad captions share an image with row 0); the bad images
    # among them are then left out of evaluation as they are of training.
    listed = 8 + len(images)
    assert f"held out {-(-listed * 20 // 100)} of {listed} training images" in log
    assert -(-listed * 20 // 100) - len(BAD) <= len(predictions) <= -(-listed * 20 // 100)
    assert not any(
        p["image_id"].endswith(("truncated.jpg", "missing.jpg", "empty.jpg", "text.jpg", "photo.jpg"))
        for p in predictions
    )
