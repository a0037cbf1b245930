"""serve under hostile uploads: the size limit holds while the body is read, decoding runs off the event loop, and
images declaring too many pixels are refused from their header."""

import asyncio
import io
import threading
import time

import pytest
from PIL import Image

from blip_recipes import serve

pytest.importorskip("fastapi")


class FakeCaptioner:
    name = "fake"

    def caption(self, images):
        return [f"{image.width}x{image.height}" for image in images]


def png(size=(32, 32), mode="RGB"):
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return buffer.getvalue()


def multipart_chunks(total_bytes: int, chunk: int = 64 * 1024):
    boundary = b"x-boundary"
    yield b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n\r\n'
    sent = 0
    while sent < total_bytes:
        yield b"\0" * chunk
        sent += chunk
    yield b"\r\n--" + boundary + b"--\r\n"


def test_a_chunked_body_is_refused_as_soon_as_it_passes_the_limit():
    """No Content-Length (chunked): the app stops reading a little past the limit, not at the end of the body."""
    limit = 256 * 1024
    app = serve.create_app(FakeCaptioner(), max_upload_bytes=limit)
    chunks = multipart_chunks(50 * 2**20)  # a 50 MB body
    consumed = [0]
    sent = []

    async def receive():
        try:
            body = next(chunks)
        except StopIteration:
            return {"type": "http.request", "body": b"", "more_body": False}
        consumed[0] += len(body)
        return {"type": "http.request", "body": body, "more_body": True}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/caption", "raw_path": b"/caption", "query_string": b"",
             "headers": [(b"content-type", b"multipart/form-data; boundary=x-boundary")], "http_version": "1.1",
             "scheme": "http", "server": ("test", 80), "client": ("test", 1), "root_path": ""}  # fmt: skip
    asyncio.run(app(scope, receive, send))
    start = next(message for message in sent if message["type"] == "http.response.start")
    assert start["status"] == 413
    assert b"larger than the 262144 byte limit" in b"".join(m.get("body", b"") for m in sent)
    assert consumed[0] <= limit + serve.MULTIPART_OVERHEAD + 2 * 64 * 1024  # stopped at the limit, not at 50 MB


def test_a_declared_length_over_the_limit_is_refused_before_reading():
    from fastapi.testclient import TestClient

    client = TestClient(serve.create_app(FakeCaptioner(), max_upload_bytes=1000))
    response = client.post("/caption", content=b"x" * 200_000,
                           headers={"content-type": "multipart/form-data; boundary=b"})  # fmt: skip
    assert response.status_code == 413 and "larger than the 1000 byte limit" in response.text


def test_too_many_pixels_are_refused_from_the_header():
    from fastapi.testclient import TestClient

    client = TestClient(serve.create_app(FakeCaptioner(), max_image_pixels=100 * 100))
    small = client.post("/caption", files={"file": ("ok.png", png((100, 100)), "image/png")})
    assert small.status_code == 200 and small.json() == {"caption": "100x100"}
    started = time.monotonic()
    large = client.post("/caption", files={"file": ("bomb.png", png((4000, 4000), "1"), "image/png")})
    assert large.status_code == 415 and "too many pixels (4000x4000 = 16,000,000, limit 10,000)" in large.text
    assert time.monotonic() - started < 5


def test_health_answers_while_an_image_decodes(monkeypatch):
    from fastapi.testclient import TestClient

    real_open = serve.open_image

    def slow_open(*args, **kwargs):
        time.sleep(2.0)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(serve, "open_image", slow_open)
    with TestClient(serve.create_app(FakeCaptioner())) as client:
        result = {}
        upload = threading.Thread(
            target=lambda: result.update(
                caption=client.post("/caption", files={"file": ("a.png", png(), "image/png")})
            )
        )
        upload.start()
        time.sleep(0.3)  # the upload is now decoding
        started = time.monotonic()
        assert client.get("/health").status_code == 200
        health_seconds = time.monotonic() - started
        upload.join()
    assert result["caption"].status_code == 200
    assert health_seconds < 1.0, health_seconds  # not queued behind the 2 s decode


def post_concurrently(client, uploads: list[bytes]) -> list:
    responses = [None] * len(uploads)

    def post(index):
        responses[index] = client.post("/caption", files={"file": (f"{index}.png", uploads[index], "image/png")})

    threads = [threading.Thread(target=post, args=(index,)) for index in range(len(uploads))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return responses


def test_requests_that_arrive_during_a_generation_are_captioned_together_each_with_its_own_caption():
    """One generation at a time, over every image that arrived while the one before ran (at most max_batch_size):
    nine requests while generations take 0.5 s are three generations, not nine, and each gets its own image's
    caption. A generation that fails answers its requests with 500 and the service goes on."""
    from fastapi.testclient import TestClient

    batches, failures = [], []

    class SlowCaptioner(FakeCaptioner):
        def caption(self, images):
            batches.append(len(images))
            time.sleep(0.5)
            if failures:
                raise RuntimeError(failures.pop())
            return super().caption(images)

    sizes = [(20 + index, 40 - index) for index in range(9)]
    with TestClient(serve.create_app(SlowCaptioner(), max_batch_size=4), raise_server_exceptions=False) as client:
        responses = post_concurrently(client, [png(size) for size in sizes])
        assert [response.json() for response in responses] == [{"caption": f"{w}x{h}"} for w, h in sizes]
        assert sum(batches) == 9 and max(batches) == 4 and len(batches) == 3, batches
        failures.append("CUDA out of memory")
        assert client.post("/caption", files={"file": ("a.png", png(), "image/png")}).status_code == 500
        assert client.post("/caption", files={"file": ("a.png", png(), "image/png")}).json() == {"caption": "32x32"}


def test_an_overloaded_service_answers_503_at_once_and_health_counts_the_queue():
    """At most max_waiting decoded images wait for a generation (each can hold up to max_image_pixels x 3 bytes):
    more requests get 503 with Retry-After at once instead of queueing without bound; /health reports the queue."""
    from fastapi.testclient import TestClient

    release = threading.Event()

    class HeldCaptioner(FakeCaptioner):
        def caption(self, images):
            release.wait(10)
            return super().caption(images)

    sizes = [(20 + index, 30) for index in range(6)]
    with TestClient(serve.create_app(HeldCaptioner(), max_batch_size=1, max_waiting=2)) as client:
        responses = [None] * len(sizes)

        def post(index):
            responses[index] = client.post("/caption", files={"file": ("a.png", png(sizes[index]), "image/png")})

        threads = [threading.Thread(target=post, args=(index,)) for index in range(len(sizes))]
        for thread in threads:
            thread.start()
            time.sleep(0.2)  # one at a time: the first is taken into the generation, the next two wait
        health = client.get("/health").json()
        assert (health["generating"], health["waiting"]) == (1, 2), health
        assert [response and response.status_code for response in responses] == [None, None, None, 503, 503, 503]
        release.set()
        for thread in threads:
            thread.join()
        codes = [response.status_code for response in responses]
        assert codes == [200, 200, 200, 503, 503, 503], codes
        assert responses[3].headers["retry-after"] == "1" and "busy: 2 images are waiting" in responses[3].text
        assert [response.json()["caption"] for response in responses[:3]] == [f"{w}x{h}" for w, h in sizes[:3]]
        health = client.get("/health").json()
        assert health == {"status": "ok", "model": "fake", "waiting": 0, "generating": 0, "captioned": 3, "failed": 0}
        assert client.post("/caption", files={"file": ("a.png", png(), "image/png")}).status_code == 200
