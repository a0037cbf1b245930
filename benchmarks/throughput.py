"""Training throughput: the seeds' notebook loop vs the stock HF Trainer vs this project's recipe path.

    python benchmarks/throughput.py --quick      # anyone, ~2 min on a 2-core CPU (BLIP-base widths, 1+1 layers)
    python benchmarks/throughput.py              # one GPU: BLIP-base (12+12 layers), 384 px, real JPEG files

Everything runs in one process on the same random BLIP, the same JPEG files (640x480, written here) and the same
captions (~24 tokens). Each loop runs `--warmup` steps untimed, then `--steps` timed steps; images/s counts
training images per second of wall time, data loading included. Prints a table, then the two speedup lines.
"""

import argparse
import logging
import math
import os
import random
import re
import sys
import tempfile
import time

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from report import write_report  # noqa: E402

from blip_recipes.builtin import build_tiny_tokenizer  # noqa: E402
from blip_recipes.data import CaptionData, CaptionSplit, ImageRecord, ImageTable  # noqa: E402

WORDS = (
    "a red blue green man woman dog cat on the left right top of image with and in at there is that picture".split()
)


def write_jpegs(directory: str, count: int, seed: int = 0, captions_per_image: int = 1) -> list[dict]:
    """Photo-like 640x480 JPEGs (smooth gradients, shapes, mild noise), each with `captions_per_image` ~24-token
    captions (rows: {"image": path, "captions": [...]})."""
    from concurrent.futures import ProcessPoolExecutor

    chunks = [(directory, start, min(count, start + 256), seed + start, captions_per_image)
              for start in range(0, count, 256)]  # fmt: skip
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        return [row for rows in pool.map(_write_jpeg_chunk, chunks) for row in rows]


def _write_jpeg_chunk(arguments) -> list[dict]:
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    directory, first, last, seed, captions_per_image = arguments
    rng = random.Random(seed)
    noise = np.random.default_rng(seed)
    rows = []
    for index in range(first, last):
        x = np.linspace(0, 1, 640)[None, :, None]
        y = np.linspace(0, 1, 480)[:, None, None]
        base = np.array([rng.random(), rng.random(), rng.random()])[None, None, :]
        pixels = 255 * (0.5 * base + 0.3 * x * base[..., ::-1] + 0.2 * y)
        pixels = np.clip(pixels + noise.normal(0, 6, (480, 640, 3)), 0, 255).astype("uint8")
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x0, y0 = rng.randrange(0, 560), rng.randrange(0, 400)
            color = tuple(rng.randrange(256) for _ in range(3))
            draw.ellipse((x0, y0, x0 + rng.randrange(30, 200), y0 + rng.randrange(30, 200)), fill=color)
        path = os.path.join(directory, f"{index:06d}.jpg")
        image.filter(ImageFilter.SMOOTH).save(path, quality=90)
        captions = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(19, 25))) for _ in range(captions_per_image)]
        rows.append({"image": path, "captions": captions})
    return rows


def blip_sized_tokenizer():
    """A WordPiece tokenizer with BLIP-base's vocabulary size (bert-base's 30,522 + [DEC], here padded with [unused]
    tokens around the caption words) and [DEC] as bos, so the recipe path's tokenizer check accepts the model."""
    from transformers import BertTokenizer

    tiny = build_tiny_tokenizer().get_vocab()
    words = sorted(tiny, key=tiny.get) + WORDS  # [PAD] stays id 0, as the model config says
    words = [word for word in dict.fromkeys(words) if word != "[DEC]"]
    words += [f"[unused{index}]" for index in range(30522 - len(words))]
    vocab = {token: index for index, token in enumerate(words + ["[DEC]"])}
    # BLIP's tokenizer pads to 512 under padding="max_length", as in the notebook.
    return BertTokenizer(vocab=vocab, do_lower_case=True, bos_token="[DEC]", model_max_length=512)


def write_model(directory: str, vision_layers: int, text_layers: int) -> None:
    """A random BLIP-base (768 wide, 12 heads, 384 px, vocab 30524) with `*_layers` layers, saved offline."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    tokenizer = blip_sized_tokenizer()
    text = {
        "vocab_size": 30524,
        "hidden_size": 768,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "num_hidden_layers": text_layers,
        "max_position_embeddings": 512,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.sep_token_id,
        "sep_token_id": tokenizer.sep_token_id,
        "pad_token_id": 0,
    }
    vision = {"hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072, "image_size": 384,
              "patch_size": 16, "num_hidden_layers": vision_layers, "initializer_range": 0.02}  # fmt: skip
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision))
    model.save_pretrained(directory)
    processor = BlipProcessor(BlipImageProcessorPil(size={"height": 384, "width": 384}), tokenizer)
    processor.save_pretrained(directory)


def training_flops_per_image(
    vision_layers, text_layers, tokens, mode, image_tokens=577, width=768, vocab=30524, captions_per_image=1
):
    """Matmul FLOPs of one training caption row (forward x3 where gradients flow, x1 for a frozen encoder). A
    `+grouped` mode shares the encoder and the cross-attention key/value projections among `captions_per_image`."""
    options = mode.split("+")[1:]
    share = captions_per_image if "grouped" in options else 1
    mlp = 2 * width * 4 * width
    vision_layer = image_tokens * (4 * width * width + mlp) + 2 * image_tokens * image_tokens * width
    text_layer = tokens * (4 * width * width + mlp)  # self-attention projections + MLP
    text_layer += 2 * tokens * tokens * width  # self-attention scores and values
    text_layer += tokens * 2 * width * width + image_tokens * 2 * width * width / share  # cross q/o, k/v (image)
    text_layer += 2 * tokens * image_tokens * width  # cross-attention scores and values
    head = tokens * (width * width + width * vocab)
    vision = 2 * vision_layers * vision_layer / share
    text = 2 * (text_layers * text_layer + head)
    if "features" in options:  # the encoder ran before training
        return 3 * text
    vision_factor = 1 if mode.startswith("frozen_vision") else 3
    return vision_factor * vision + 3 * text


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Stopwatch:
    """Times steps warmup+1 .. warmup+steps of any loop (a Trainer callback or called by hand)."""

    def __init__(self, warmup: int, device: torch.device):
        self.warmup, self.device, self.steps, self.start, self.elapsed = warmup, device, 0, None, None

    def step_done(self):
        self.steps += 1
        if self.steps == self.warmup:
            _sync(self.device)
            self.start = time.perf_counter()

    def finish(self):
        _sync(self.device)
        self.elapsed = time.perf_counter() - self.start
        return self.elapsed


def trainer_stopwatch(warmup, device, steps=None):
    """Stops the watch after `steps` timed steps (steps profiled after them are not timed), or at the end."""
    from transformers import TrainerCallback

    class StopwatchCallback(TrainerCallback):
        def __init__(self):
            self.watch = Stopwatch(warmup, device)

        def on_step_end(self, args, state, control, **kwargs):
            self.watch.step_done()
            if steps is not None and self.watch.steps == warmup + steps:
                self.watch.finish()

        def on_train_end(self, args, state, control, **kwargs):
            if self.watch.elapsed is None:
                self.watch.finish()

    return StopwatchCallback()


def profiler_callback(first_step: int, steps: int, device, label: str, directory: str | None):
    """torch.profiler over training steps first_step+1 .. first_step+steps: top kernels and GPU busy share."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    class ProfileCallback(TrainerCallback):
        def __init__(self):
            self.profiler = None
            self.start = None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == first_step:
                _sync(device)
                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
                self.profiler = profile(activities=activities)
                self.profiler.__enter__()
                self.start = time.perf_counter()
            elif self.profiler is not None and state.global_step == first_step + steps:
                _sync(device)
                wall = time.perf_counter() - self.start
                self.profiler.__exit__(None, None, None)
                events = self.profiler.key_averages()
                by_device = events.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70)
                by_cpu = events.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70)
                # Kernel time only (the table's footer); summing every row would count an op and its kernels.
                found = re.search(r"Self CUDA time total: ([0-9.]+)(ms|s|us)", by_device)
                busy = float(found.group(1)) * {"s": 1, "ms": 1e-3, "us": 1e-6}[found.group(2)] if found else 0.0
                report = f"== profile {label}: {steps} steps, wall {wall:.3f} s, GPU busy {busy:.3f} s " \
                         f"({100 * busy / wall:.0f}%)\n{by_device}\n{by_cpu}\n"  # fmt: skip
                print(report, flush=True)
                if directory:
                    with open(os.path.join(directory, f"profile-{label}.txt"), "w") as handle:
                        handle.write(report)
                self.profiler = None

    return ProfileCallback()


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device):
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def run_notebook(model_dir, rows, device, steps, warmup):
    """The seeds' notebook, as written: processor padding="max_length", labels=input_ids, batch 2, fp32."""
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from transformers import AutoProcessor, BlipForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model_dir)
    model = BlipForConditionalGeneration.from_pretrained(model_dir).to(device)

    class ImageCaptioningDataset(Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, idx):
            item = rows[idx]
            encoding = processor(
                images=Image.open(item["image"]), text=item["text"], padding="max_length", return_tensors="pt"
            )
            return {k: v.squeeze() for k, v in encoding.items()}

    loader = DataLoader(ImageCaptioningDataset(), shuffle=True, batch_size=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
    model.train()
    watch = Stopwatch(warmup, device)
    reset_peak(device)
    while watch.steps < warmup + steps:
        for batch in loader:
            input_ids = batch.pop("input_ids").to(device)
            pixel_values = batch.pop("pixel_values").to(device)
            loss = model(input_ids=input_ids, pixel_values=pixel_values, labels=input_ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            watch.step_done()
            if watch.steps >= warmup + steps:
                break
    return steps * 2 / watch.finish(), 2, peak_gib(device)


def run_stock_trainer(model_dir, rows, device, steps, warmup, batch_size, workers, output_dir):
    """What a user writes with the stock Trainer: eager BLIP, bf16 on GPU, processor with dynamic padding."""
    from PIL import Image
    from torch.utils.data import Dataset
    from transformers import AutoProcessor, BlipForConditionalGeneration, Trainer, TrainingArguments

    processor = AutoProcessor.from_pretrained(model_dir)
    model = BlipForConditionalGeneration.from_pretrained(model_dir)

    class Pairs(Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, idx):
            return {"image": Image.open(rows[idx]["image"]).convert("RGB"), "text": rows[idx]["text"]}

    def collate(items):
        batch = processor(images=[i["image"] for i in items], text=[i["text"] for i in items], padding=True,
                          return_tensors="pt")  # fmt: skip
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return dict(batch)

    callback = trainer_stopwatch(warmup, device)
    args = TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=batch_size, max_steps=warmup + steps, learning_rate=5e-5,
        bf16=device.type == "cuda", use_cpu=device.type == "cpu", dataloader_num_workers=workers,
        remove_unused_columns=False, save_strategy="no", report_to="none", logging_steps=10_000, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=Pairs(), data_collator=collate, callbacks=[callback])
    reset_peak(device)
    trainer.train()
    return steps * batch_size / callback.watch.elapsed, batch_size, peak_gib(device)


def run_recipe(
    model_dir,
    rows,
    device,
    steps,
    warmup,
    batch_size,
    workers,
    mode,
    output_dir,
    compile_model,
    image_cache,
    vision_features=False,
    grouped=False,
    profile_steps=0,
    profile_dir=None,
    extra=(),
):
    """This project's path: the shared recipe trainer with its defaults for the device (what recipes set).

    With `vision_features` the frozen encoder runs once per image before training (timed apart: it logs its time).
    With `grouped` (group_captions_by_image) each batch holds all captions of its images, each image encoded once.
    """
    from blip_recipes.builders import build_trainer
    from blip_recipes.recipe_parser import parse_recipe

    cuda = device.type == "cuda"
    torch._dynamo.reset()  # one process times several models: no compiled code or dynamic-shape state carries over
    argv = ["--model_name_or_path", model_dir, "--training_mode", mode, "--output_dir", output_dir,
            "--per_device_train_batch_size", str(batch_size), "--max_steps", str(warmup + steps),
            "--learning_rate", "5e-5", "--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none",
            "--logging_steps", "10000", "--disable_tqdm", "true", "--dataloader_num_workers", str(workers),
            "--bf16", str(cuda).lower(), "--torch_compile", str(compile_model).lower(),
            "--dataloader_persistent_workers", str(workers > 0).lower(), "--pad_to_multiple_of", "8",
            "--image_cache", str(image_cache).lower()]  # fmt: skip
    if mode == "lora":
        argv += ["--lora_target_modules", "query,key,value,qkv"]
    if compile_model and cuda and mode != "full":  # as the one-GPU frozen_vision / LoRA recipes set it
        argv += ["--torch_compile_mode", "reduce-overhead"]
    if vision_features:
        argv += ["--cache_vision_features", "true", "--per_device_eval_batch_size", "256"]
    if grouped:
        argv += ["--group_captions_by_image", "true"]
    argv += list(extra)
    if workers > 0:
        argv += ["--dataloader_prefetch_factor", "4"]
    table = ImageTable(rows, "image", None)
    records = [ImageRecord(row=i, image_id=str(i), captions=row["captions"]) for i, row in enumerate(rows)]
    data = CaptionData(train=CaptionSplit("train", table, records), evaluation=None, test=None)
    callback = trainer_stopwatch(warmup, device, steps)
    callbacks = [callback]
    if profile_steps:
        label = f"{mode}{'-features' if vision_features else ''}{'-grouped' if grouped else ''}" \
                f"{'-compiled' if compile_model else ''}"  # fmt: skip
        callbacks.append(profiler_callback(warmup + steps, profile_steps, device, label, profile_dir))
        argv[argv.index("--max_steps") + 1] = str(warmup + steps + profile_steps)
    trainer = build_trainer(parse_recipe(argv), callbacks=callbacks, data=data)  # logs the encode pass's time
    reset_peak(device)
    trainer.train()
    captions, images = trainer.shared_images
    if images:
        print(f"  grouped: {captions} caption rows on {images} image encodings ({captions / images:.2f} per image)")
    return steps * batch_size / callback.watch.elapsed, batch_size, peak_gib(device)


def run_data_pipeline(model_dir, rows, batch_size, workers, batches):
    """The recipe path's input pipeline alone (decode, resize, collate, pin): its images/s ceiling."""
    from torch.utils.data import DataLoader

    from blip_recipes.collator import CaptionCollator
    from blip_recipes.data import CaptionTrainDataset
    from blip_recipes.model import load_processor
    from blip_recipes.transforms import ImageTransform

    processor = load_processor(model_dir)
    records = [ImageRecord(row=i, image_id=str(i), captions=row["captions"]) for i, row in enumerate(rows)]
    dataset = CaptionTrainDataset(CaptionSplit("train", ImageTable(rows, "image", None), records),
                                  ImageTransform(384, 384, processor.image_processor.resample))  # fmt: skip
    collator = CaptionCollator(processor.tokenizer, processor.tokenizer.bos_token_id)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, collate_fn=collator,
                        pin_memory=torch.cuda.is_available(), prefetch_factor=4 if workers else None,
                        persistent_workers=workers > 0, drop_last=True)  # fmt: skip
    iterator = iter(loader)
    next(iterator)
    start = time.perf_counter()
    done = 0
    for _ in range(batches):
        try:
            next(iterator)
        except StopIteration:
            iterator = iter(loader)
            next(iterator)
        done += batch_size
    return done / (time.perf_counter() - start)


def run_generation(model_dir, device, images, batch_size, beams, new_tokens, attention, steps_warmup=2):
    """Caption `images` synthetic pixel batches with beam search, forced to `new_tokens` tokens (none end early)."""
    from blip_recipes.evaluation import generate_caption_ids
    from blip_recipes.model import load_model

    model = load_model(model_dir, attn_implementation=attention).to(device).eval()
    reset_peak(device)
    prefix = torch.full((batch_size, 1), model.config.text_config.bos_token_id, dtype=torch.long, device=device)
    pixels = torch.randn(batch_size, 3, 384, 384, device=device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    length = 1 + new_tokens
    batches = math.ceil(images / batch_size)
    with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
        for _ in range(steps_warmup):
            generate_caption_ids(model, pixels, prefix, num_beams=beams, max_length=length, min_length=length)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(batches):
            generate_caption_ids(model, pixels, prefix, num_beams=beams, max_length=length, min_length=length)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return time.perf_counter() - start, batches * batch_size, peak_gib(device)


def measure_peak_tflops(device):
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU-sized: 1+1 layers, few steps (~2 min, 2 cores)")
    parser.add_argument("--images", type=int, default=None, help="JPEG files to write and train on")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per loop")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per loop (compilation, caches)")
    parser.add_argument("--batch-size", type=int, default=None, help="project recipe path batch size")
    parser.add_argument("--stock-batch-size", type=int, default=None, help="stock Trainer batch size")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader worker processes")
    parser.add_argument("--layers", type=int, default=None, help="vision and text layers each (BLIP-base: 12)")
    parser.add_argument(
        "--modes",
        default="full,frozen_vision,lora,frozen_vision+features",
        help="recipe modes to time: MODE[+features][+grouped][@BATCH]; +features caches the frozen encoder's output "
        "(cache_vision_features), +grouped sets group_captions_by_image, @BATCH overrides --batch-size",
    )
    parser.add_argument("--captions-per-image", type=int, default=1, help="captions written per image (COCO: 5)")
    parser.add_argument("--time-budget", type=float, default=None, help="start no loop after this many seconds")
    parser.add_argument("--recipe-args", default="", help="extra recipe keys for the project path, '--key value ...'")
    parser.add_argument("--profile-steps", type=int, default=0, help="profile this many steps after the timed ones")
    parser.add_argument("--profile-dir", default=None, help="write each profile table here")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile")
    parser.add_argument(
        "--image-cache",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="project path reads pixels from its resized-image cache (built once, untimed)",
    )
    parser.add_argument("--uncached-full", action="store_true", help="also time full mode decoding JPEGs each step")
    parser.add_argument("--skip-notebook", action="store_true")
    parser.add_argument("--skip-pipeline", action="store_true", help="do not time the input pipeline alone")
    parser.add_argument("--skip-stock", action="store_true")
    parser.add_argument("--generation-images", type=int, default=0, help="also time beam-search captioning")
    parser.add_argument("--generation-attention", default="eager,sdpa", help="attention implementations to use")
    parser.add_argument("--generation-batch-sizes", default=None, help="captioning batch sizes (GPU: 256, CPU: 8)")
    parser.add_argument("--json", default=None, help="write all numbers here")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    quick = args.quick
    layers = args.layers or (1 if quick else 12)
    steps = args.steps or (3 if quick else 30)
    warmup = args.warmup or (1 if quick else 10)
    batch = args.batch_size or (8 if quick else 128)
    stock_batch = args.stock_batch_size or (8 if quick else 64)
    workers = args.workers if args.workers is not None else (0 if quick or not cuda else min(14, os.cpu_count() - 1))
    compile_model = args.compile if args.compile is not None else (cuda and not quick)
    modes = [mode for mode in args.modes.split(",") if mode]
    captions_per_image = args.captions_per_image
    batches = [int(name.partition("@")[2] or batch) for name in modes]
    needed = max(batch, stock_batch, *batches) * (warmup + steps + 1)
    count = args.images or min(-(-needed // captions_per_image), 4096)
    torch.set_float32_matmul_precision("high")
    encode_log = logging.getLogger("blip_recipes.vision_features")  # its "encoded N images in S s" line, on stdout
    encode_log.setLevel(logging.INFO)
    encode_log.addHandler(logging.StreamHandler(sys.stdout))

    work = tempfile.mkdtemp(prefix="blip-throughput-")
    started = time.time()
    print(f"device={device} layers={layers}+{layers} images={count} captions_per_image={captions_per_image} "
          f"steps={steps} warmup={warmup} workers={workers} compile={compile_model}", flush=True)  # fmt: skip
    os.makedirs(os.path.join(work, "jpeg"))
    rows = write_jpegs(os.path.join(work, "jpeg"), count, captions_per_image=captions_per_image)
    pairs = [{"image": row["image"], "text": caption} for row in rows for caption in row["captions"]]
    write_model(os.path.join(work, "model"), layers, layers)
    model_dir = os.path.join(work, "model")
    peak_tflops = measure_peak_tflops(device)
    results = []

    def record(name, mode, images_per_s, batch_size, memory, seconds=None):
        """images_per_s: training items (caption rows) per second, as in every earlier result file."""
        flops = training_flops_per_image(layers, layers, 24, mode, captions_per_image=captions_per_image)
        mfu = images_per_s * flops / (peak_tflops * 1e12) if peak_tflops else None
        results.append({"loop": name, "mode": mode, "batch": batch_size, "images_per_s": images_per_s,
                        "caption_samples_per_s": images_per_s, "captions_per_image": captions_per_image,
                        "distinct_images_per_s": images_per_s / captions_per_image if "grouped" in mode else None,
                        "peak_gib": memory, "mfu": mfu, "gflop_per_image": flops / 1e9,
                        "loop_seconds": seconds})  # fmt: skip
        print(
            f"  {name:<64} {images_per_s:9.1f} img/s  (batch {batch_size}, {time.time() - started:.0f}s)", flush=True
        )
        save()

    def save():
        write_report(args.json, results, device=str(device), gpu=torch.cuda.get_device_name() if cuda else None,
                     layers=layers, steps=steps, warmup=warmup, workers=workers, compile=compile_model,
                     peak_tflops=peak_tflops, data_pipeline_images_per_s=pipeline, generation=generation,
                     captions_per_image=captions_per_image, skipped=skipped,
                     transformers=transformers.__version__)  # fmt: skip

    generation = {}
    pipeline = None
    skipped = []

    def in_budget(name):
        if args.time_budget is None or time.time() - started < args.time_budget:
            return True
        skipped.append(name)
        print(f"  {name}: skipped (--time-budget {args.time_budget:.0f} s spent)", flush=True)
        return False

    if not args.quick and not args.skip_pipeline:
        pipeline = run_data_pipeline(model_dir, rows, batch, workers, batches=steps)
        print(f"  data pipeline alone: {pipeline:.0f} img/s ({workers} workers)", flush=True)

    if not args.skip_notebook:
        record("notebook loop", "full", *run_notebook(model_dir, pairs, device, steps, warmup))
    if not args.skip_stock:
        stock = run_stock_trainer(model_dir, pairs, device, steps, warmup, stock_batch, workers, f"{work}/stock")
        record("stock HF Trainer", "full", *stock)
    if args.uncached_full:
        jpeg = run_recipe(model_dir, rows, device, steps, warmup, batch, workers, "full", f"{work}/jpeg",
                          compile_model, image_cache=False)  # fmt: skip
        record("blip-recipes full (JPEG each step)", "full", *jpeg)
    for name, mode_batch in zip(modes, batches):
        name = name.partition("@")[0]
        if not in_budget(name):
            continue
        mode, *options = name.split("+")
        begun = time.time()
        result = run_recipe(model_dir, rows, device, steps, warmup, mode_batch, workers, mode, f"{work}/{name}",
                            compile_model, image_cache=args.image_cache, vision_features="features" in options,
                            grouped="grouped" in options, profile_steps=args.profile_steps,
                            profile_dir=args.profile_dir, extra=args.recipe_args.split())  # fmt: skip
        label = f"blip-recipes {mode}" + (" + cached features" if "features" in options else "")
        label += " + grouped captions" if "grouped" in options else ""
        record(label, name, *result, seconds=time.time() - begun)
    generation_batches = [int(size) for size in (args.generation_batch_sizes or ("256" if cuda else "8")).split(",")]
    for attention in args.generation_attention.split(",") if args.generation_images else ():
        for size in generation_batches:
            if not in_budget(f"generation {attention} batch {size}"):
                continue
            seconds, done, memory = run_generation(model_dir, device, args.generation_images, size, 3, 20, attention)
            key = attention if size == generation_batches[0] else f"{attention}-batch-{size}"
            generation[key] = {"images": done, "seconds": seconds, "images_per_s": done / seconds, "batch": size,
                               "peak_gib": memory}  # fmt: skip
            peak = f", peak {memory:.2f} GiB" if cuda else ""
            print(f"  generation {attention}, batch {size}: {done} images, beam 3, 20 new tokens: "
                  f"{seconds:.2f} s{peak}", flush=True)  # fmt: skip
            save()

    print()
    print(f"{'loop':<64} {'batch':>5} {'images/s':>9} {'peak GiB':>9} {'MFU':>6}")
    for row in results:
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "-"
        print(f"{row['loop']:<64} {row['batch']:>5} {row['images_per_s']:>9.1f} {row['peak_gib']:>9.2f} {mfu:>6}")
    if peak_tflops:
        full_gflop = training_flops_per_image(layers, layers, 24, "full") / 1e9
        print(f"(MFU against a measured bf16 matmul peak of {peak_tflops:.0f} TFLOP/s; full fine-tuning is "
              f"{full_gflop:.0f} GFLOP per image at {layers}+{layers} layers)")  # fmt: skip
    by_loop = {row["loop"]: row["images_per_s"] for row in results}
    ours = by_loop.get("blip-recipes full")
    save()
    if ours and "notebook loop" in by_loop:
        print(f"speedup_vs_notebook: {ours / by_loop['notebook loop']:.2f}")
    if ours and "stock HF Trainer" in by_loop:
        print(f"speedup_vs_stock_trainer: {ours / by_loop['stock HF Trainer']:.2f}")


if __name__ == "__main__":
    main()
