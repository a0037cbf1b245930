"""`blip-recipes serve`: a small HTTP captioning service (FastAPI + uvicorn, the `serve` extra).

    POST /caption   multipart upload of one image (field "file") -> {"caption": "..."}
    GET  /health    -> {"status": "ok", "model": "..."}

Bad uploads get a 4xx with a message (413 too large, 415 not an image, 400 empty, 422 no file), never a 500.
"""

import threading
from typing import Annotated

from .transforms import BadImageError, open_image


def create_app(captioner, max_upload_bytes: int = 20 * 2**20):
    from fastapi import FastAPI, File, HTTPException, Request, UploadFile
    from fastapi.concurrency import run_in_threadpool

    app = FastAPI(title="blip-recipes captioning", version="1")
    lock = threading.Lock()  # one generation at a time: predictable memory on a shared GPU

    @app.get("/health")
    def health():
        return {"status": "ok", "model": captioner.name}

    @app.post("/caption")
    async def caption(request: Request, file: Annotated[UploadFile, File(description="the image")]):
        declared = int(request.headers.get("content-length") or 0)
        data = await file.read(max_upload_bytes + 1)
        if declared > max_upload_bytes + 64 * 1024 or len(data) > max_upload_bytes:
            raise HTTPException(413, f"upload is larger than the {max_upload_bytes} byte limit")
        if not data:
            raise HTTPException(400, "empty upload: send an image file in the 'file' field")
        try:
            image = open_image(data)
        except BadImageError as error:
            raise HTTPException(415, f"{file.filename or 'upload'} is not a usable image: {error}") from None

        def run():
            with lock:
                return captioner.caption([image])[0]

        return {"caption": await run_in_threadpool(run)}

    return app


def serve(captioner, host: str, port: int, max_upload_bytes: int) -> None:
    import uvicorn

    uvicorn.run(create_app(captioner, max_upload_bytes), host=host, port=port, log_level="info")
