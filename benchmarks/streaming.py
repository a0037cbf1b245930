"""Streaming WebDataset shards vs the map-style path, over the same generated JPEGs.

    python benchmarks/streaming.py                    # 20,000 images (~10 min on a 2-core CPU)
    python benchmarks/streaming.py --images 2000      # quick
    python benchmarks/streaming.py --json results/FILE.json

The same images are written twice: as an imagefolder (metadata.jsonl + JPEG files, what the map-style path reads)
and as WebDataset shards of 1,000 samples (what `streaming: true` reads). Each path then runs in its own process
(for a clean peak RSS) what a training run does with its data on one process:

- map-style: load the split, check every image (the up-front decode pass), then one pass of the training
  DataLoader (shuffled, decode + resize to 384 px per item);
- streaming: one pass of the stream (shard order, shuffle buffer, decode + resize per item); nothing up front.

Reported per path: seconds before the first batch, items/s over the pass (first batch included), total seconds,
peak RSS, and the RSS after 25% and at 100% of the pass (flat memory: they should not grow with items streamed).
No model runs: this measures the data path alone.
"""

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
from report import write_report

SIZE = 384  # BLIP-base's image size
BATCH = 32


def rss_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def write_data(directory: str, images: int, seed: int = 0) -> None:
    from PIL import Image

    from blip_recipes.data.streaming import write_shards

    rng = np.random.default_rng(seed)
    folder = os.path.join(directory, "imagefolder", "train")
    os.makedirs(folder, exist_ok=True)
    rows = []

    def samples():
        for number in range(images):
            # Smooth random colour fields (JPEGs of a realistic size, ~25 KB at 320x240), not noise.
            small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
            image = Image.fromarray(small).resize((320, 240), Image.BICUBIC)
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=90)
            name = f"{number:06d}.jpg"
            with open(os.path.join(folder, name), "wb") as handle:
                handle.write(buffer.getvalue())
            captions = [f"a picture number {number}", f"colours of picture {number}"]
            rows.append({"file_name": name, "text": captions})
            yield f"{number:06d}", buffer.getvalue(), "jpg", captions

    write_shards(samples(), os.path.join(directory, "shards"), samples_per_shard=1000)
    with open(os.path.join(folder, "metadata.jsonl"), "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)


def run_path(path: str, directory: str, workers: int, images: int) -> dict:
    """One pass of `path`'s training data, in this process."""
    import torch
    from PIL import Image

    from blip_recipes.config import DataArguments
    from blip_recipes.data import CaptionTrainDataset
    from blip_recipes.data.streaming import CaptionStream, stream_shards
    from blip_recipes.transforms import ImageTransform

    transform = ImageTransform(SIZE, SIZE, Image.BICUBIC)
    start = time.perf_counter()
    items = 2 * images
    if path == "map-style":
        from blip_recipes.data.records import check_images, collect_splits, drop_bad_rows

        data_args = DataArguments(dataset_name=os.path.join(directory, "imagefolder"))
        data, bad = collect_splits(data_args, seed=0, need_eval=False)
        bad += check_images(data, None, 0, 1, False)
        data = drop_bad_rows(data, bad, data_args)
        dataset = CaptionTrainDataset(data.train, transform)
        loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers,
                                             collate_fn=lambda batch: len(batch))  # fmt: skip
    else:
        data_args = DataArguments(dataset_name=os.path.join(directory, "shards"), streaming=True)
        stream = CaptionStream(stream_shards(data_args), transform, seed=0, buffer_size=1000)
        loader = torch.utils.data.DataLoader(stream, batch_size=BATCH, num_workers=workers,
                                             collate_fn=lambda batch: len(batch))  # fmt: skip
    first_batch = None
    seen = 0
    rss_quarter = None
    for size in loader:
        if first_batch is None:
            first_batch = time.perf_counter() - start
        seen += size
        if rss_quarter is None and seen >= items // 4:
            rss_quarter = rss_mib()
        if seen >= items:
            break
    total = time.perf_counter() - start
    return {
        "path": path,
        "images": images,
        "items": seen,
        "workers": workers,
        "seconds_to_first_batch": round(first_batch, 2),
        "items_per_second": round(seen / total, 1),
        "total_seconds": round(total, 1),
        "rss_mib_at_25_percent": round(rss_quarter, 1),
        "rss_mib_at_end": round(rss_mib(), 1),
        # ru_maxrss of this process (DataLoader workers are children: RUSAGE_CHILDREN, max over them).
        "peak_rss_mib_main": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_mib_worker": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for both paths")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--run", choices=["map-style", "streaming"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:  # a child process: one path
        print(json.dumps(run_path(args.run, args.data, args.workers, args.images)))
        return 0

    with tempfile.TemporaryDirectory() as directory:
        started = time.perf_counter()
        write_data(directory, args.images)
        print(f"wrote {args.images} JPEGs twice (imagefolder + shards) in {time.perf_counter() - started:.0f} s")
        results = []
        for path in ("map-style", "streaming"):
            output = subprocess.run(
                [sys.executable, __file__, "--run", path, "--data", directory, "--images", str(args.images),
                 "--workers", str(args.workers)],
                check=True, capture_output=True, text=True, env={**os.environ, "BLIP_RECIPES_CACHE": directory},
            )  # fmt: skip
            result = json.loads(output.stdout.strip().splitlines()[-1])
            results.append(result)
            print(json.dumps(result))
    write_report(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
