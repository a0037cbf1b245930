"""`blip-recipes serve`: a small HTTP captioning service (FastAPI + uvicorn, the `serve` extra).

    POST /caption   multipart upload of one image (field "file") -> {"caption": "..."}
    GET  /health    -> {"status": "ok", "model": "...", "waiting": 0, "generating": 0, "captioned": 0, "failed": 0}

Bad uploads get a 4xx with a message (413 too large, 415 not an image, 400 empty, 422 no file), never a 500. The size
limit is enforced while the body is read (a declared Content-Length over it is refused before reading, a chunked body
as soon as it passes it), so an upload never costs more than the limit in memory or disk. Decoding and captioning run
in worker threads, decoding at most `decode_workers` at a time and refusing images over `max_image_pixels` from
their header, so a hostile image cannot block `/health` or other requests. One generation runs at a time, over the
images of every request that arrived while the one before ran (CaptionBatcher). At most `max_waiting` decoded images
wait for a generation: more get 503 with Retry-After, so an overloaded service answers at once and its memory stays
bounded (each waiting image is decoded, up to max_image_pixels x 3 bytes), and /health says how many wait.
"""

import asyncio
import queue
import threading
from concurrent.futures import Future
from typing import Annotated

from .transforms import MAX_IMAGE_PIXELS, BadImageError, open_image

MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers around the file itself


class UploadLimit:
    """ASGI middleware: a request body over `max_bytes` (+ multipart overhead) gets 413 while it is being read."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes + MULTIPART_OVERHEAD

    async def __call__(self, scope, receive, send):
        from fastapi import HTTPException
        from fastapi.responses import JSONResponse

        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"upload is larger than the {self.max_bytes - MULTIPART_OVERHEAD} byte limit"
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await JSONResponse({"detail": message}, status_code=413)(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, message)  # FastAPI answers it; the rest of the body is never read
            return event

        return await self.app(scope, limited_receive, send)


class Busy(Exception):
    """max_waiting images already wait for a generation."""


class CaptionBatcher:
    """Captions concurrent requests together: one generation at a time (predictable memory on a shared GPU), over
    every image that arrived while the one before ran, at most `max_batch_size`, each with the caption it would get
    alone. A request that finds the model idle starts at once: nothing waits to fill a batch. Under load a batch
    shares one generation's fixed costs (2 CPU cores, BLIP-base-sized: 1.45x the requests/s, benchmarks/serving.py).
    More than `max_waiting` images waiting: submit raises Busy."""

    def __init__(self, captioner, max_batch_size: int = 8, max_waiting: int = 64):
        self.captioner, self.max_batch_size, self.max_waiting = captioner, max_batch_size, max_waiting
        self.waiting = queue.Queue()
        self.counts = {"waiting": 0, "generating": 0, "captioned": 0, "failed": 0}
        self.counts_lock = threading.Lock()
        threading.Thread(target=self._generate, name="caption-batcher", daemon=True).start()

    def submit(self, image) -> Future:
        with self.counts_lock:
            if self.counts["waiting"] >= self.max_waiting:
                raise Busy(self.busy_message())
            self.counts["waiting"] += 1
        future = Future()
        self.waiting.put((image, future))
        return future

    def busy_message(self) -> str:
        return f"busy: {self.max_waiting} images are waiting for captions; retry shortly"

    def full(self) -> bool:
        with self.counts_lock:
            return self.counts["waiting"] >= self.max_waiting

    def status(self) -> dict:
        with self.counts_lock:
            return dict(self.counts)

    def _count(self, **changes) -> None:
        with self.counts_lock:
            for key, change in changes.items():
                self.counts[key] += change

    def _generate(self) -> None:
        while True:
            batch = [self.waiting.get()]
            while len(batch) < self.max_batch_size and not self.waiting.empty():
                batch.append(self.waiting.get())
            # A request whose client went away was cancelled: no caption for it. The others can no longer be
            # cancelled, so answering them cannot fail (and stop this thread).
            taken = len(batch)
            batch = [(image, future) for image, future in batch if future.set_running_or_notify_cancel()]
            self._count(waiting=-taken, generating=len(batch))
            if not batch:
                continue
            try:
                captions = self.captioner.caption([image for image, _ in batch])
            except Exception as error:  # every request of the batch answers it (a 500), the service goes on
                self._count(generating=-len(batch), failed=len(batch))
                for _, future in batch:
                    future.set_exception(error)
                continue
            self._count(generating=-len(batch), captioned=len(batch))
            for (_, future), caption in zip(batch, captions, strict=True):
                future.set_result(caption)


def create_app(
    captioner,
    max_upload_bytes: int = 20 * 2**20,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
    decode_workers: int = 2,
    max_batch_size: int = 8,
    max_waiting: int = 64,
):
    from fastapi import FastAPI, File, HTTPException, UploadFile
    from fastapi.concurrency import run_in_threadpool

    app = FastAPI(title="blip-recipes captioning", version="1")
    batcher = CaptionBatcher(captioner, max_batch_size, max_waiting)
    decode_slots = asyncio.Semaphore(decode_workers)

    @app.get("/health")
    def health():
        return {"status": "ok", "model": captioner.name, **batcher.status()}

    @app.post("/caption")
    async def caption(file: Annotated[UploadFile, File(description="the image")]):
        data = await file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"upload is larger than the {max_upload_bytes} byte limit")
        if not data:
            raise HTTPException(400, "empty upload: send an image file in the 'file' field")
        if batcher.full():  # before decoding: a busy service spends nothing more on the request
            raise HTTPException(503, batcher.busy_message(), headers={"Retry-After": "1"})
        try:
            async with decode_slots:
                image = await run_in_threadpool(open_image, data, None, max_image_pixels)
        except BadImageError as error:
            raise HTTPException(415, f"{file.filename or 'upload'} is not a usable image: {error}") from None
        try:
            future = batcher.submit(image)
        except Busy as busy:
            raise HTTPException(503, str(busy), headers={"Retry-After": "1"}) from None
        return {"caption": await asyncio.wrap_future(future)}

    app.add_middleware(UploadLimit, max_bytes=max_upload_bytes)
    return app


def listening_socket(host: str, port: int):
    """The server's socket, bound before the model loads: a port in use or a host that is not this machine's is an
    error at once, not after the model has loaded (uvicorn binds only when it starts)."""
    import socket

    family, kind, protocol, _name, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                                flags=socket.AI_PASSIVE)[0]  # fmt: skip
    sock = socket.socket(family, kind, protocol)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restarts reuse the port
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def serve(
    captioner, sock, max_upload_bytes: int, max_image_pixels: int = MAX_IMAGE_PIXELS, max_batch_size: int = 8,
    max_waiting: int = 64,
) -> None:  # fmt: skip
    """Serve on `sock` (listening_socket's) until stopped."""
    import uvicorn

    host, port = sock.getsockname()[:2]
    app = create_app(captioner, max_upload_bytes, max_image_pixels, max_batch_size=max_batch_size,
                     max_waiting=max_waiting)  # fmt: skip
    config = uvicorn.Config(app, host=host, port=port, log_level="info")
    uvicorn.Server(config).run(sockets=[sock])
