"""A local stand-in for the Hub's HTTP API, recording what it receives: repo creation, preupload and commit for
pushes, and model and dataset repos served from local folders (info, tree, paths-info, file downloads with byte
ranges) for what transformers, datasets and huggingface_hub read. A pushed repo is served as its commits left it,
per branch (files added and deleted), so what a run pushed can be downloaded again."""

import base64
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote

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


class Repo:
    """A repo's files, read from a local folder, at one commit named by their content."""

    def __init__(self, folder):
        self.folder = str(folder)
        self.files = sorted(
            os.path.relpath(os.path.join(root, name), self.folder)
            for root, _dirs, names in os.walk(self.folder)
            for name in names
        )
        digest = hashlib.sha1()
        for name in self.files:
            digest.update(name.encode() + self.read(name))
        self.sha = digest.hexdigest()

    def read(self, name):
        with open(os.path.join(self.folder, name), "rb") as handle:
            return handle.read()

    def entry(self, path):
        """A tree entry as the Hub lists it: a file (size, blob id) or a folder, or None."""
        if path in self.files:
            data = self.read(path)
            return {"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
        if any(name.startswith(path + "/") for name in self.files):
            return {"type": "directory", "path": path, "oid": hashlib.sha1(path.encode()).hexdigest()}
        return None

    def listing(self, folder, recursive=False):
        """The entries under `folder` ("" for the top): its children, or with `recursive` every file and folder."""
        prefix = folder + "/" if folder else ""
        below = [name[len(prefix) :].split("/") for name in self.files if name.startswith(prefix)]
        if recursive:
            found = {prefix + "/".join(parts[:depth]) for parts in below for depth in range(1, len(parts) + 1)}
        else:
            found = {prefix + parts[0] for parts in below}
        return [self.entry(path) for path in sorted(found)]


class FakeHub:
    def __init__(self, datasets=None, models=None):
        """`datasets`, `models`: {repo id: local folder} served as read-only repos of that kind."""
        self.requests = []  # (method, path, authorization header)
        self.commits = []  # {"repo": ..., "revision": ..., "summary": ..., "files": {path: bytes}}
        self.branches = {}  # repo id -> branches created besides main
        self.created = []
        self.validated = []  # model card YAML the client asked the Hub to validate
        self.commit_seconds = 0.0  # how long each commit takes (a slow upload)
        self.served = {kind: {repo: Repo(folder) for repo, folder in (given or {}).items()}
                       for kind, given in (("datasets", datasets), ("models", models))}  # fmt: skip
        self.storage = tempfile.mkdtemp(prefix="fake-hub-")  # pushed model repos: STORAGE/ID/REVISION/files
        self.pushed = {}  # (repo id, revision) -> Repo
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

            def _not_found(self, code="RepoNotFound", message="not found"):
                data = json.dumps({"error": message}).encode()
                self.send_response(404)
                self.send_header("X-Error-Code", code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _serve_repo(self, parts):
                """GET/HEAD of a served repo (API: /api/KIND/ID/..., files: /datasets/ID/resolve/... for datasets,
                /ID/resolve/... for models); False when the path names none."""
                if parts[:1] == ["api"] and parts[1:2] in (["datasets"], ["models"]) and len(parts) >= 4:
                    repo_id, rest = "/".join(parts[2:4]), parts[4:]
                    revision = unquote(rest[1]) if rest[:1] in (["revision"], ["tree"]) and len(rest) > 1 else "main"
                    repo = hub.repo(parts[1], repo_id, revision)
                    if repo is None:
                        return False
                    if rest[:1] == ["revision"] or not rest:  # info: the commit and its files
                        siblings = [{"rfilename": name} for name in repo.files]
                        self._reply({"id": repo_id, "sha": repo.sha, "private": False, "siblings": siblings})
                    elif rest[:1] == ["tree"]:
                        folder = unquote("/".join(rest[2:]))
                        if folder and (repo.entry(folder) or {}).get("type") != "directory":
                            self._not_found("EntryNotFound")
                        else:
                            recursive = "recursive=true" in self.path.lower()
                            self._reply(repo.listing(folder, recursive))
                    else:
                        self._not_found("EntryNotFound")
                    return True
                kind, parts = ("datasets", parts[1:]) if parts[:1] == ["datasets"] else ("models", parts)
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo = hub.repo(kind, "/".join(parts[:2]), unquote(parts[3]))
                    if repo is None:
                        return False
                    name = unquote("/".join(parts[4:]))
                    if name in repo.files:
                        self._send_file(repo, repo.read(name))
                    else:
                        self._not_found("EntryNotFound")
                    return True
                return False

            def _send_file(self, repo, data):
                """The file, or the byte range asked for (how datasets streams a parquet file)."""
                first, last, status = 0, len(data) - 1, 200
                asked = self.headers.get("Range")
                if asked and self.command == "GET":
                    start, _, end = asked.split("=", 1)[1].partition("-")
                    first, last, status = int(start), min(int(end) if end else last, last), 206
                part = data[first : last + 1]
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(part) if self.command == "GET" else len(data)))
                self.send_header("X-Repo-Commit", repo.sha)
                self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
                if status == 206:
                    self.send_header("Content-Range", f"bytes {first}-{last}/{len(data)}")
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(part)

            def do_GET(self):
                self._record()
                parts = self.path.split("?")[0].strip("/").split("/")
                if self._serve_repo(parts):
                    return
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
                if not self._serve_repo(self.path.split("?")[0].strip("/").split("/")):
                    self.send_response(404)
                    self.end_headers()

            def do_POST(self):
                self._record()
                body = self._body()
                parts = self.path.split("?")[0].strip("/").split("/")
                kind = parts[1] if parts[:1] == ["api"] and len(parts) > 1 else None
                revision = unquote(parts[5]) if len(parts) > 5 else "main"
                repo = hub.repo(kind, "/".join(parts[2:4]), revision) if kind in hub.served else None
                if repo is not None and parts[4:5] == ["paths-info"]:
                    asked = json.loads(body) if body.startswith(b"{") else parse_qs(body.decode())
                    found = [repo.entry(path) for path in asked.get("paths", [])]
                    return self._reply([entry for entry in found if entry])
                if parts[:3] == ["api", "repos", "create"]:
                    request = json.loads(body)
                    name = f"{request.get('organization') or 'user'}/{request['name']}"
                    hub.created.append({"repo": name, "private": request.get("private")})
                    if (name, "main") not in hub.pushed:  # an empty repo, as the Hub creates it
                        hub.pushed[(name, "main")] = hub._store(name, "main", {})
                    return self._reply({"url": f"http://{self.headers['Host']}/{name}", "name": name, "id": name})
                if parts == ["api", "validate-yaml"]:
                    content = json.loads(body).get("content", "")
                    hub.validated.append(content)
                    problem = metadata_problem(content)
                    if problem:
                        return self._reply({"error": problem}, status=400)
                    return self._reply({})
                if len(parts) >= 6 and parts[0] == "api" and parts[4] == "branch":
                    name, branch = f"{parts[2]}/{parts[3]}", unquote(parts[5])
                    hub.branches.setdefault(name, set()).add(branch)
                    if (name, branch) not in hub.pushed:  # a branch starts as main is
                        main = hub.pushed.get((name, "main"))
                        files = {path: main.read(path) for path in main.files} if main else {}
                        hub.pushed[(name, branch)] = hub._store(name, branch, files)
                    return self._reply({})
                if len(parts) >= 6 and parts[0] == "api" and parts[4] in ("preupload", "commit"):
                    revision = unquote(parts[5])
                    if revision != "main" and revision not in hub.branches.get(f"{parts[2]}/{parts[3]}", ()):
                        return self._not_found("RevisionNotFound", f"Invalid rev id: {revision}")  # as the Hub says
                if len(parts) >= 6 and parts[0] == "api" and parts[4] == "preupload":
                    files = json.loads(body)["files"]
                    return self._reply(
                        {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files],
                         "commitOid": "0" * 40}
                    )  # fmt: skip
                if len(parts) >= 6 and parts[0] == "api" and parts[4] == "commit":
                    time.sleep(hub.commit_seconds)
                    commit = {
                        "repo": f"{parts[2]}/{parts[3]}",
                        "revision": unquote(parts[5]),
                        "files": {},
                        "deleted": [],
                        "summary": None,
                    }
                    for line in body.decode().splitlines():
                        if not line.strip():
                            continue
                        item = json.loads(line)
                        if item["key"] == "header":
                            commit["summary"] = item["value"].get("summary")
                        elif item["key"] == "file":
                            commit["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                        elif item["key"] in ("deletedFile", "deletedFolder"):
                            commit["deleted"].append(item["value"]["path"])
                    hub.commits.append(commit)
                    hub._apply(commit)
                    url = f"http://{self.headers['Host']}/{commit['repo']}/commit/{'a' * 40}"
                    return self._reply({"commitUrl": url, "commitOid": "a" * 40, "pullRequestUrl": None})
                return self._reply({"error": f"unexpected {self.path}"}, status=404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def repo(self, kind, repo_id, revision="main"):
        """The repo served as `repo_id` at `revision` (a branch, or the commit id a download names once it has
        asked for the branch's): a pushed one as its commits left it, else a local folder's."""
        if kind == "models":
            for (name, branch), repo in self.pushed.items():
                if name == repo_id and revision in (branch, repo.sha):
                    return repo
        return self.served.get(kind, {}).get(repo_id)

    def files(self, repo_id, revision="main") -> dict:
        """{path: bytes} of a pushed repo now."""
        repo = self.pushed[(repo_id, revision)]
        return {path: repo.read(path) for path in repo.files}

    def _store(self, repo_id, revision, files: dict) -> Repo:
        folder = os.path.join(self.storage, repo_id, revision)
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        for path, data in files.items():
            os.makedirs(os.path.dirname(os.path.join(folder, path)), exist_ok=True)
            with open(os.path.join(folder, path), "wb") as handle:
                handle.write(data)
        return Repo(folder)

    def _apply(self, commit):
        """The repo's files after `commit`: its deletions (a folder's path: what is under it), then its files."""
        key = (commit["repo"], commit["revision"])
        files = self.files(*key) if key in self.pushed else {}
        for path in commit["deleted"]:
            files = {name: data for name, data in files.items() if name != path and not name.startswith(path + "/")}
        self.pushed[key] = self._store(*key, {**files, **commit["files"]})

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        shutil.rmtree(self.storage, ignore_errors=True)
