"""COCO annotation loaders: Karpathy's dataset_coco.json, LAVIS' coco_karpathy_{train,val,test}.json, and the
official COCO captions format (captions_train2014.json, nocaps, Flickr30k in COCO format).

All become splits with columns image (path relative to image_root), text (list of captions) and image_id.
Karpathy's "restval" images join "train", giving the standard 113,287 / 5,000 / 5,000 split.
"""

import json
import os

LAVIS_FILES = {"train": "coco_karpathy_train.json", "val": "coco_karpathy_val.json", "test": "coco_karpathy_test.json"}


def is_coco_karpathy_file(path: str) -> bool:
    if not path.lower().endswith(".json"):
        return False
    with open(path, encoding="utf-8", errors="replace") as handle:
        head = handle.read(65536)
    return head.lstrip().startswith("{") and '"sentences"' in head and '"filename"' in head


def load_coco_karpathy_file(path: str) -> dict:
    import datasets

    with open(path, encoding="utf-8") as handle:
        content = json.load(handle)
    columns: dict[str, dict[str, list]] = {}
    for position, entry in enumerate(content.get("images", [])):
        try:
            split = "train" if entry["split"] == "restval" else entry["split"]
            image = os.path.join(entry.get("filepath", ""), entry["filename"])
            captions = [sentence["raw"] for sentence in entry["sentences"]]
        except (KeyError, TypeError) as error:
            raise ValueError(f"{path}: images[{position}] is not a Karpathy split entry (missing {error})") from None
        image_id = str(entry.get("cocoid", entry.get("imgid", image)))
        target = columns.setdefault(split, {"image": [], "text": [], "image_id": []})
        target["image"].append(image)
        target["text"].append(captions)
        target["image_id"].append(image_id)
    if not columns:
        raise ValueError(f"{path}: no images")
    return {split: datasets.Dataset.from_dict(values) for split, values in columns.items()}


def is_lavis_karpathy_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, LAVIS_FILES["train"]))


def load_lavis_karpathy_dir(path: str) -> dict:
    """LAVIS annotations: train has one row per caption, val/test one row per image with a list of captions."""
    import datasets

    splits = {}
    for split, name in LAVIS_FILES.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            continue
        with open(file, encoding="utf-8") as handle:
            rows = json.load(handle)
        values = {"image": [], "text": [], "image_id": []}
        for position, row in enumerate(rows):
            if not isinstance(row, dict) or "image" not in row or "caption" not in row:
                raise ValueError(f"{file}: entry {position} needs 'image' and 'caption'")
            captions = row["caption"] if isinstance(row["caption"], list) else [row["caption"]]
            values["image"].append(row["image"])
            values["text"].append(captions)
            values["image_id"].append(str(row.get("image_id", row["image"])))
        splits[split] = datasets.Dataset.from_dict(values)
    return splits


def is_coco_captions_file(path: str) -> bool:
    """The official COCO captions format (captions_train2014.json, nocaps, most Flickr30k copies):
    {"images": [{"id", "file_name", ...}], "annotations": [{"image_id", "caption"}, ...]}."""
    if not path.lower().endswith(".json"):
        return False
    with open(path, encoding="utf-8", errors="replace") as handle:
        head = handle.read(65536)
    return (
        head.lstrip().startswith("{")
        and '"sentences"' not in head
        and ('"annotations"' in head or ('"images"' in head and '"file_name"' in head))
    )


def load_coco_captions_file(path: str, split: str = "train") -> dict:
    """One split with columns image (file_name, relative to image_root), text (every caption of the image) and
    image_id, one row per image with at least one caption, in the file's image order."""
    import datasets

    with open(path, encoding="utf-8") as handle:
        content = json.load(handle)
    if not isinstance(content, dict) or not isinstance(content.get("annotations"), list):
        raise ValueError(f"{path}: a COCO captions file needs an 'annotations' list of {{image_id, caption}}")
    files: dict[str, str] = {}
    for position, image in enumerate(content.get("images") or []):
        try:
            files[str(image["id"])] = image["file_name"]
        except (KeyError, TypeError) as error:
            raise ValueError(f"{path}: images[{position}] needs 'id' and 'file_name' (missing {error})") from None
    captions: dict[str, list] = {image_id: [] for image_id in files}
    for position, annotation in enumerate(content["annotations"]):
        try:
            image_id, caption = str(annotation["image_id"]), annotation["caption"]
        except (KeyError, TypeError) as error:
            raise ValueError(
                f"{path}: annotations[{position}] needs 'image_id' and 'caption' (missing {error})"
            ) from None
        if image_id not in files:
            raise ValueError(
                f"{path}: annotations[{position}] names image_id {image_id}, which 'images' does not list"
            )
        captions[image_id].append(caption)
    with_captions = [image_id for image_id in files if captions[image_id]]
    if not with_captions:
        raise ValueError(f"{path}: no image has a caption")
    values = {
        "image": [files[image_id] for image_id in with_captions],
        "text": [captions[image_id] for image_id in with_captions],
        "image_id": with_captions,
    }
    return {split: datasets.Dataset.from_dict(values)}
