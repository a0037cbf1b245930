"""A local stand-in for the Hub's HTTP API (repo creation, preupload, commit), recording what it receives."""

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml


def metadata_problem(card: str) -> str | None:
    """What the Hub says of a card whose metadata names a base model or dataset by anything but a repo id (a local
    path: "datasets[0] with value /var/hf/images/ is not valid", huggingface/autotrain-advanced#648)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    metadata = yaml.safe_load(card.split("---")[1]) if card.startswith("---") else {}
    named = [("base_model", metadata.get("base_model"))]
    named += [(f"datasets[{index}]", name) for index, name in enumerate(metadata.get("datasets") or [])]
    for key, value in named:
        if value is None:
            continue
        try:
            validate_repo_id(value)
        except HFValidationError:
            return f'"{key}" with value "{value}" is not valid. If possible, use an id from https://hf.co'
    return None


class FakeHub:
    def __init__(self):
        self.requests = []  # (method, path, authorization header)
        self.commits = []  # {"repo": ..., "summary": ..., "files": {path: bytes}}
        self.created = []
        self.validated = []  # model card YAML the client asked the Hub to validate
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _body(self):
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _reply(self, payload, status=200):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _record(self):
                hub.requests.append((self.command, self.path, self.headers.get("Authorization")))

            def do_GET(self):
                self._record()
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts[0] == "api" and parts[1:2] in (["models"], ["datasets"]) and len(parts) >= 4:
                    # model or dataset info: no such repo here, said as the Hub says it
                    data = json.dumps({"error": "Repository not found"}).encode()
                    self.send_response(404)
                    self.send_header("X-Error-Code", "RepoNotFound")
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    return self.wfile.write(data)
                self._reply({"error": "not found"}, status=404)

            def do_HEAD(self):
                self._record()
                self.send_response(404)
                self.end_headers()

            def do_POST(self):
                self._record()
                body = self._body()
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts[:3] == ["api", "repos", "create"]:
                    request = json.loads(body)
                    name = f"{request.get('organization') or 'user'}/{request['name']}"
                    hub.created.append({"repo": name, "private": request.get("private")})
                    return self._reply({"url": f"http://{self.headers['Host']}/{name}", "name": name, "id": name})
                if parts == ["api", "validate-yaml"]:
                    content = json.loads(body).get("content", "")
                    hub.validated.append(content)
                    problem = metadata_problem(content)
                    if problem:
                        return self._reply({"error": problem}, status=400)
                    return self._reply({})
                if len(parts) >= 6 and parts[0] == "api" and parts[4] == "preupload":
                    files = json.loads(body)["files"]
                    return self._reply(
                        {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files],
                         "commitOid": "0" * 40}
                    )  # fmt: skip
                if len(parts) >= 6 and parts[0] == "api" and parts[4] == "commit":
                    commit = {"repo": f"{parts[2]}/{parts[3]}", "files": {}, "summary": None}
                    for line in body.decode().splitlines():
                        if not line.strip():
                            continue
                        item = json.loads(line)
                        if item["key"] == "header":
                            commit["summary"] = item["value"].get("summary")
                        elif item["key"] == "file":
                            commit["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    hub.commits.append(commit)
                    url = f"http://{self.headers['Host']}/{commit['repo']}/commit/{'a' * 40}"
                    return self._reply({"commitUrl": url, "commitOid": "a" * 40, "pullRequestUrl": None})
                return self._reply({"error": f"unexpected {self.path}"}, status=404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
