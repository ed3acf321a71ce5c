"""A stand-in for the Hugging Face Hub's HTTP API on 127.0.0.1, serving exactly the calls ``huggingface_hub`` 2.4.0
makes for ``HfApi.create_repo(exist_ok=True)`` and ``HfApi.upload_folder`` (read from its source):

- ``POST /api/repos/create`` (JSON ``{name, organization, visibility?}``): ``{"url": ...}``, or 409 when it exists;
- ``POST /api/validate-yaml`` (only when a ``README.md`` is uploaded): ``{"errors": [], "warnings": []}``;
- ``POST /api/models/{repo}/preupload/{revision}`` (JSON ``{files: [{path, sample, size}]}``): every file is
  ``"regular"`` (so no LFS or xet transfer follows), ``shouldIgnore`` false, ``oid`` the git sha1 of what the fake
  already holds at that path (``huggingface_hub`` then leaves unchanged files out of the commit);
- ``POST /api/models/{repo}/commit/{revision}`` (NDJSON: a ``header`` line ``{summary, description}``, then one
  ``file`` line ``{path, content, encoding: base64}`` per file): recorded as a `Commit`;
- ``GET /api/models/{repo}/revision/{revision}``: the repo's info (asked only when nothing changed);
- ``GET /api/agent-harnesses``: an empty registry (``build_hf_headers`` fetches it once a process, unless
  ``HF_HUB_DISABLE_TELEMETRY``, from ``huggingface_hub.constants.ENDPOINT``, i.e. not from ``HfApi(endpoint=...)``).

Anything else is answered 404 and kept in ``unexpected``. Failures and delays are scripted with `FakeHub.fail` and
`FakeHub.delay`; error answers carry ``Retry-After: 0`` so ``huggingface_hub``'s own retries of preupload and commit
(five, on 408, 429, 500, 502, 503 and 504) wait one second each instead of 1, 2, 4, 8 and 8.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


@dataclass
class Commit:
    repo_id: str
    revision: str
    message: str
    files: dict[str, bytes]  # path in the repo -> decoded bytes
    authorization: str | None


@dataclass
class Request:
    method: str
    path: str
    authorization: str | None
    status: int = 0


@dataclass
class _Script:
    status: int
    times: int  # answers left to fail; -1: every one
    only: str | None  # a substring of the body that selects the requests to fail


@dataclass
class FakeHub:
    """The server's state; `start_fake_hub` returns one running on a free port."""

    endpoint: str = ""
    user: str = "fake-user"
    repos: dict[str, dict] = field(default_factory=dict)  # repo id -> {"visibility": ..., "files": {path: bytes}}
    commits: list[Commit] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    _failures: dict[str, list[_Script]] = field(default_factory=dict)
    _delays: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None
    _connections: set = field(default_factory=set)  # open client sockets, closed by stop()

    # ---------------------------------------------------------------- scripting

    def fail(self, kind: str, status: int = 500, *, times: int = 1, only: str | None = None) -> None:
        """Answer the next ``times`` requests of ``kind`` (``create``, ``validate``, ``preupload``, ``commit``,
        ``revision`` or ``any``) with ``status`` (``times=-1``: all of them); ``only`` limits it to requests whose
        body holds that text (e.g. a path)."""
        with self._lock:
            self._failures.setdefault(kind, []).append(_Script(status, times, only))

    def delay(self, kind: str, seconds: float) -> None:
        """Wait ``seconds`` before answering each request of ``kind``."""
        with self._lock:
            self._delays[kind] = seconds

    def stop(self) -> None:
        """Stop listening and close the kept-alive connections: the next request is refused."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            connections, self._connections = list(self._connections), set()
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            connection.close()

    def wait_for_commits(self, n: int, timeout: float = 30.0) -> list[Commit]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.commits) >= n:
                    return list(self.commits)
            time.sleep(0.02)
        raise AssertionError(f"{len(self.commits)} commit(s) arrived, {n} expected")

    # ---------------------------------------------------------------- serving

    def _scripted_failure(self, kind: str, body: bytes) -> int | None:
        with self._lock:
            for name in (kind, "any"):
                for script in self._failures.get(name, []):
                    if script.times == 0 or (script.only is not None and script.only.encode() not in body):
                        continue
                    if script.times > 0:
                        script.times -= 1
                    return script.status
        return None

    def _answer(self, method: str, path: str, body: bytes, authorization: str | None) -> tuple[int, dict]:
        routes = [
            ("POST", r"/api/repos/create", "create"),
            ("POST", r"/api/validate-yaml", "validate"),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)", "preupload"),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)", "commit"),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/revision/(?P<rev>[^/]+)", "revision"),
            ("GET", r"/api/agent-harnesses", "harnesses"),
        ]
        for verb, pattern, kind in routes:
            match = re.fullmatch(pattern, path)
            if verb == method and match:
                break
        else:
            with self._lock:
                self.unexpected.append(f"{method} {path}")
            return 404, {"error": f"the fake hub does not serve {method} {path}"}
        if self._delays.get(kind):
            time.sleep(self._delays[kind])
        status = self._scripted_failure(kind, body)
        if status is not None:
            return status, {"error": f"scripted failure of {kind}"}
        args = match.groupdict()
        if "repo" in args and args["repo"] not in self.repos:
            return 404, {"error": "Repository not found"}
        return getattr(self, f"_{kind}")(body=body, authorization=authorization, **args)

    def _create(self, *, body: bytes, authorization: str | None) -> tuple[int, dict]:
        payload = json.loads(body)
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        url = f"{self.endpoint}/{repo_id}"
        with self._lock:
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo", "url": url}
            self.repos[repo_id] = {"visibility": payload.get("visibility"), "files": {}, "sha": "0" * 40}
        return 200, {"url": url, "name": repo_id}

    def _validate(self, *, body: bytes, authorization: str | None) -> tuple[int, dict]:
        return 200, {"errors": [], "warnings": []}

    def _preupload(self, *, body: bytes, authorization: str | None, repo: str, rev: str) -> tuple[int, dict]:
        stored = self.repos[repo]["files"]
        files = []
        for item in json.loads(body)["files"]:
            old = stored.get(item["path"])
            oid = hashlib.sha1(b"blob %d\0" % len(old) + old).hexdigest() if old is not None else None
            files.append({"path": item["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
        return 200, {"files": files, "commitOid": self.repos[repo]["sha"]}

    def _commit(self, *, body: bytes, authorization: str | None, repo: str, rev: str) -> tuple[int, dict]:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = lines[0]
        assert header["key"] == "header", header
        files = {}
        for line in lines[1:]:
            if line["key"] != "file" or line["value"].get("encoding") != "base64":
                return 400, {"error": f"the fake hub takes only base64 files, not {line['key']}"}
            files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
        oid = hashlib.sha1(body).hexdigest()
        with self._lock:
            self.repos[repo]["files"].update(files)
            self.repos[repo]["sha"] = oid
            self.commits.append(Commit(repo, rev, header["value"]["summary"], files, authorization))
        return 200, {"success": True, "commitOid": oid, "commitUrl": f"{self.endpoint}/{repo}/commit/{oid}",
                     "pullRequestUrl": None}

    def _harnesses(self, *, body: bytes, authorization: str | None) -> tuple[int, dict]:
        return 200, {"standardEnvVars": [], "harnesses": {}}

    def _revision(self, *, body: bytes, authorization: str | None, repo: str, rev: str) -> tuple[int, dict]:
        info = self.repos[repo]
        return 200, {"id": repo, "modelId": repo, "sha": info["sha"], "private": info["visibility"] == "private",
                     "siblings": [{"rfilename": p} for p in sorted(info["files"])]}


def start_fake_hub() -> FakeHub:
    """A `FakeHub` serving on ``127.0.0.1:<free port>`` from a daemon thread; call ``stop()`` when done."""
    hub = FakeHub()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects

        def setup(self) -> None:
            super().setup()
            with hub._lock:
                hub._connections.add(self.connection)

        def finish(self) -> None:
            with hub._lock:
                hub._connections.discard(self.connection)
            try:
                super().finish()
            except OSError:  # closed by stop()
                pass

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            path = urlsplit(self.path).path
            authorization = self.headers.get("Authorization")
            record = Request(self.command, path, authorization)
            with hub._lock:
                hub.requests.append(record)
            status, payload = hub._answer(self.command, path, body, authorization)
            record.status = status
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status >= 400:
                self.send_header("X-Error-Message", payload.get("error", ""))
                self.send_header("Retry-After", "0")
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = _handle

        def log_message(self, format, *args) -> None:  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.handle_error = lambda request, client_address: None  # a connection closed by stop()
    hub._server = server
    hub.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, name="fake-hub", daemon=True).start()
    return hub
