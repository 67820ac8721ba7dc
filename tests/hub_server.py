"""A tiny stand-in for the Hugging Face Hub HTTP API, for protocol tests.

It tests the protocol, not the Hub: it answers the few endpoints ``huggingface_hub`` calls for
``create_repo``, ``create_branch`` and ``upload_folder`` of small regular files (repo creation, branch creation,
README metadata validation, preupload, NDJSON commit with base64 inline content), records every request, and
rebuilds what a commit carried so tests can compare it byte for byte with the local folder. It knows nothing of
the Hub's real permission, LFS or Xet logic. Whether the real Hub accepts the same requests is out of its reach.

The server listens on 127.0.0.1 on a free port, serves from a daemon thread and shuts itself down after
``lifetime_s`` seconds even if a test forgets to stop it.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_REPO = r"(?P<repo>[^/]+(?:/[^/]+)?)"
_ROUTES = [
    ("create_repo", re.compile(r"^/api/repos/create$")),
    ("validate_yaml", re.compile(r"^/api/validate-yaml$")),
    ("create_branch", re.compile(rf"^/api/models/{_REPO}/branch/(?P<rev>[^/]+)$")),
    ("preupload", re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$")),
    ("commit", re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$")),
]


@dataclass
class Request:
    """One request as the server saw it."""

    method: str
    path: str
    endpoint: str  # route name, or "unknown"
    headers: dict[str, str]
    body: bytes


@dataclass
class Commit:
    """A commit rebuilt from its NDJSON payload."""

    repo_id: str
    revision: str
    summary: str
    files: dict[str, bytes] = field(default_factory=dict)


class FakeHub:
    """Context manager running the fake Hub; ``url`` is the endpoint to hand to ``HfApi``.

    Args:
        fail_with: If set, every request is answered with this HTTP status and an error message.
        lifetime_s: The server stops by itself after this many seconds.
    """

    def __init__(self, fail_with: int | None = None, lifetime_s: float = 60.0) -> None:
        self.fail_with = fail_with
        self.requests: list[Request] = []
        self.repos: dict[str, dict[str, Any]] = {}
        self.branches: set[tuple[str, str]] = set()
        self.commits: list[Commit] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._timer = threading.Timer(lifetime_s, self.stop)
        self._timer.daemon = True

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop serving and close the socket; safe to call twice."""
        self._timer.cancel()
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()

    def endpoints(self) -> list[str]:
        """Route names of the requests received, in order."""
        return [r.endpoint for r in self.requests]

    # ------------------------------------------------------------------ request handling (server threads)

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        endpoint, match = "unknown", None
        for name, pattern in _ROUTES:
            match = pattern.match(path.split("?", 1)[0])
            if match:
                endpoint = name
                break
        with self._lock:
            self.requests.append(Request(method, path, endpoint, headers, body))
            if self.fail_with is not None:
                return self.fail_with, {"error": f"fake hub configured to fail with {self.fail_with}"}
            if method != "POST" or match is None:
                return 404, {"error": f"fake hub does not implement {method} {path}"}
            return getattr(self, f"_{endpoint}")(match, json.loads(body) if endpoint != "commit" else body)

    def _create_repo(self, match: re.Match, payload: dict) -> tuple[int, Any]:
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        if repo_id in self.repos:
            # The Hub's 409 still carries the repo URL, which create_repo(exist_ok=True) returns.
            return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
        self.repos[repo_id] = payload
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}

    def _validate_yaml(self, match: re.Match, payload: dict) -> tuple[int, Any]:
        return 200, {"errors": [], "warnings": []}

    def _create_branch(self, match: re.Match, payload: dict) -> tuple[int, Any]:
        key = (match["repo"], match["rev"])
        if key in self.branches:
            return 409, {"error": "Reference already exists"}
        self.branches.add(key)
        return 200, {}

    def _preupload(self, match: re.Match, payload: dict) -> tuple[int, Any]:
        if match["repo"] not in self.repos:
            return 404, {"error": "Repository not found"}
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in payload["files"]]
        return 200, {"files": files, "commitOid": "0" * 40}

    def _commit(self, match: re.Match, body: bytes) -> tuple[int, Any]:
        if match["repo"] not in self.repos:
            return 404, {"error": "Repository not found"}
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        commit = Commit(match["repo"], match["rev"], header["summary"])
        for item in lines:
            if item["key"] == "file":
                assert item["value"]["encoding"] == "base64"
                commit.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
        self.commits.append(commit)
        oid = f"{len(self.commits):040x}"
        return 200, {"commitUrl": f"{self.url}/{match['repo']}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects from the Hub

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            self._answer()

        def do_GET(self) -> None:  # noqa: N802
            self._answer()

        def do_PUT(self) -> None:  # noqa: N802
            self._answer()

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, payload = hub.handle(self.command, self.path, headers, body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status >= 400 and isinstance(payload, dict) and "error" in payload:
                self.send_header("X-Error-Message", payload["error"])
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
            pass

    return Handler
