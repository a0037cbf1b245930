"""`blip-recipes serve` under concurrent requests: requests per second with each request generated alone
(`--max_batch_size 1`, what serve did before it batched) against requests captioned together (serve.CaptionBatcher).

    python benchmarks/serving.py --json benchmarks/results/DATE-cpu-serving.json

The model is a random BLIP-base (throughput.write_model: 768 wide, 384 px), saved to a temp folder; the requests are
PNG uploads through FastAPI's test client from `--concurrency` threads, so the numbers include decoding, the
processor and generation (beam 3, 20 tokens), not the network. Every configuration must give each image the caption
it gets alone, or the script fails.
"""

import argparse
import io
import os
import sys
import tempfile
import threading
import time

from PIL import Image
from report import write_report
from throughput import write_model


def uploads(count: int) -> list[bytes]:
    """Distinct 320x240 PNGs."""
    images = []
    for index in range(count):
        image = Image.new("RGB", (320, 240), ((37 * index) % 256, (91 * index) % 256, (53 * index) % 256))
        image.paste((255 - (37 * index) % 256, 40, 200), (index * 7 % 200, 30, index * 7 % 200 + 90, 150))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images


def serve_requests(captioner, data: list[bytes], concurrency: int, max_batch_size: int) -> tuple[float, list]:
    """Seconds to answer every upload from `concurrency` client threads, and the captions in upload order."""
    from fastapi.testclient import TestClient

    from blip_recipes import serve

    captions, next_upload, lock = [None] * len(data), [0], threading.Lock()

    def client_loop(client):
        while True:
            with lock:
                index = next_upload[0]
                next_upload[0] += 1
            if index >= len(data):
                return
            response = client.post("/caption", files={"file": (f"{index}.png", data[index], "image/png")})
            captions[index] = response.json()["caption"]

    with TestClient(serve.create_app(captioner, max_batch_size=max_batch_size)) as client:
        client.post("/caption", files={"file": ("warmup.png", data[0], "image/png")})
        start = time.perf_counter()
        threads = [threading.Thread(target=client_loop, args=(client,)) for _ in range(concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return time.perf_counter() - start, captions


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--batch-sizes", default="1,8", help="max_batch_size values to compare")
    parser.add_argument("--vision-layers", type=int, default=12)
    parser.add_argument("--text-layers", type=int, default=12)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    import torch

    from blip_recipes.evaluation import Captioner

    torch.manual_seed(0)
    data = uploads(args.requests)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        write_model(folder, args.vision_layers, args.text_layers)
        captioner = Captioner(folder, num_beams=3, max_length=20)
        alone = [captioner.caption([Image.open(io.BytesIO(upload)).convert("RGB")])[0] for upload in data]
        for max_batch_size in [int(size) for size in args.batch_sizes.split(",")]:
            seconds, captions = serve_requests(captioner, data, args.concurrency, max_batch_size)
            if captions != alone:
                print(f"max_batch_size {max_batch_size}: captions differ from each image's alone", file=sys.stderr)
                return 1
            row = {"max_batch_size": max_batch_size, "requests": len(data), "concurrency": args.concurrency,
                   "seconds": round(seconds, 2), "requests_per_s": round(len(data) / seconds, 3)}  # fmt: skip
            print(row, flush=True)
            results.append(row)
            write_report(args.json, results, model=f"random BLIP-base, {args.vision_layers}+{args.text_layers} layers",
                         decoding="beam 3, max length 20", threads=torch.get_num_threads())  # fmt: skip
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
