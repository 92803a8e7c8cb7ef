"""A small Hub-compatible HTTP server for tests (stdlib only, 127.0.0.1, in memory).

It implements the endpoints huggingface_hub 2.x calls to create a repo, validate a README's
metadata, preupload (regular vs LFS decision), upload LFS objects (basic transfer), commit
(NDJSON), and the ones transformers / hf_hub_download call to read files back
(HEAD/GET resolve, model info). Xet storage is not implemented: clients must run with
HF_HUB_DISABLE_XET=1 so LFS files take the plain LFS path.

    server = HubServer(token="hf_test_...")
    server.start()           # server.url -> "http://127.0.0.1:PORT"
    server.fail_status = 500 # every request now answers 500
    server.stop()
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

# Files stored through LFS, like the Hub's default .gitattributes (binary/large files).
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".png", ".jpg", ".npz")
LFS_MIN_SIZE = 10 * 1024 * 1024
USER = "test-user"


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Repo:
    def __init__(self, repo_id: str, private: bool):
        self.repo_id = repo_id
        self.private = private
        self.files: dict[str, bytes] = {}
        self.lfs_paths: set[str] = set()
        self.sha = hashlib.sha1(repo_id.encode()).hexdigest()
        self.commits: list[dict] = []

    def oid(self, path: str) -> str:
        data = self.files[path]
        return hashlib.sha256(data).hexdigest() if path in self.lfs_paths else git_sha1(data)


class HubServer:
    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.fail_status: int | None = None
        self.requests: list[tuple[str, str]] = []  # (method, path) log, for debugging tests
        self.lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    # ---- lifecycle
    def start(self) -> "HubServer":
        handler = type("BoundHubHandler", (HubHandler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def stored_bytes(self) -> list[bytes]:
        """Every byte string the hub holds (files and LFS objects)."""
        with self.lock:
            out = list(self.lfs_objects.values())
            for repo in self.repos.values():
                out.extend(repo.files.values())
                out.extend(json.dumps(c).encode() for c in repo.commits)
            return out


class HubHandler(BaseHTTPRequestHandler):
    hub: HubServer  # bound by HubServer.start
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # keep test output quiet
        pass

    # ---- plumbing
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload=None, headers: dict | None = None, body: bytes | None = None) -> None:
        if body is None:
            body = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        hdrs = {"Content-Type": "application/json"} if payload is not None else {}
        hdrs.update(headers or {})
        for key, value in hdrs.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, {"error": message}, headers)

    def _auth(self) -> str | None:
        """'ok' with the valid token, None without one; answers 401 and returns 'bad' otherwise."""
        value = self.headers.get("Authorization")
        if value is None:
            return None
        if value != f"Bearer {self.hub.token}":
            self._error(401, "Invalid credentials in Authorization header")
            return "bad"
        return "ok"

    def _dispatch(self) -> None:
        path = unquote(urlsplit(self.path).path)
        with self.hub.lock:
            self.hub.requests.append((self.command, path))
        body = self._body() if self.command in ("POST", "PUT") else b""
        if self.hub.fail_status is not None:
            return self._error(self.hub.fail_status, "Internal Error - the test hub is failing on purpose")
        auth = self._auth()
        if auth == "bad":
            return
        for method, pattern, func in ROUTES:
            if method == self.command or (method == "GET" and self.command == "HEAD"):
                match = re.fullmatch(pattern, path)
                if match:
                    return func(self, auth, body, **match.groupdict())
        self._error(404, f"no route for {self.command} {path}")

    do_GET = do_HEAD = do_POST = do_PUT = _dispatch

    def _repo(self, repo_id: str, auth: str | None, write: bool) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if write and auth != "ok":
            self._error(401, "You must be authenticated to write to a repo")
            return None
        if repo is None or (repo.private and auth != "ok"):
            self._error(404, "Repository not found", code="RepoNotFound")
            return None
        return repo

    # ---- API endpoints
    def whoami(self, auth, body):
        if auth != "ok":
            return self._error(401, "Invalid credentials in Authorization header")
        self._send(200, {"type": "user", "name": USER, "auth": {"accessToken": {"role": "write"}}})

    def create_repo(self, auth, body):
        if auth != "ok":
            return self._error(401, "You must be authenticated to create a repo")
        payload = json.loads(body)
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        url = f"{self.hub.url}/{repo_id}"
        with self.hub.lock:
            if repo_id in self.hub.repos:
                return self._send(409, {"error": "You already created this model repo", "url": url})
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            self.hub.repos[repo_id] = Repo(repo_id, private)
        self._send(200, {"url": url, "name": repo_id, "id": uuid.uuid4().hex})

    def validate_yaml(self, auth, body):
        content = json.loads(body)["content"]
        match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        if match:
            try:
                import yaml

                meta = yaml.safe_load(match.group(1))
                if not isinstance(meta, dict):
                    raise ValueError("metadata is not a mapping")
            except Exception as exc:
                return self._send(400, {"errors": [{"message": f"invalid YAML: {exc}"}]})
        self._send(200, {"errors": [], "warnings": []})

    def repo_info(self, auth, body, repo_id, revision=None):
        repo = self._repo(repo_id, auth, write=False)
        if repo is None:
            return
        siblings = [{"rfilename": p, "size": len(d)} for p, d in sorted(repo.files.items())]
        self._send(200, {"id": repo_id, "modelId": repo_id, "sha": repo.sha, "private": repo.private,
                         "siblings": siblings, "tags": [], "downloads": 0, "likes": 0})

    def preupload(self, auth, body, repo_id, revision):
        repo = self._repo(repo_id, auth, write=True)
        if repo is None:
            return
        files = []
        for item in json.loads(body)["files"]:
            path = item["path"]
            lfs = path.endswith(LFS_SUFFIXES) or item["size"] >= LFS_MIN_SIZE
            oid = repo.oid(path) if path in repo.files and (path in repo.lfs_paths) == lfs else None
            files.append({"path": path, "uploadMode": "lfs" if lfs else "regular",
                          "shouldIgnore": False, "oid": oid})
        self._send(200, {"files": files, "commitOid": repo.sha})

    def lfs_batch(self, auth, body, repo_id):
        repo = self._repo(repo_id, auth, write=True)
        if repo is None:
            return
        objects = []
        for obj in json.loads(body)["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.hub.lfs_objects:
                entry["actions"] = {
                    "upload": {"href": f"{self.hub.url}/_lfs/{obj['oid']}"},
                    "verify": {"href": f"{self.hub.url}/_lfs_verify/{repo_id}"},
                }
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects},
                   headers={"Content-Type": "application/vnd.git-lfs+json"})

    def lfs_put(self, auth, body, oid):
        # Like a presigned storage URL: no Hub auth, the content must match its oid.
        if hashlib.sha256(body).hexdigest() != oid:
            return self._error(400, "sha256 mismatch")
        with self.hub.lock:
            self.hub.lfs_objects[oid] = body
        self._send(200, body=b"", headers={"ETag": f'"{oid}"'})

    def lfs_verify(self, auth, body, repo_id):
        oid = json.loads(body)["oid"]
        if oid not in self.hub.lfs_objects:
            return self._error(404, "LFS object not found")
        self._send(200, {"ok": True})

    def commit(self, auth, body, repo_id, revision):
        repo = self._repo(repo_id, auth, write=True)
        if repo is None:
            return
        if revision != "main":
            return self._error(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = lines[0]["value"] if lines and lines[0]["key"] == "header" else {}
        with self.hub.lock:
            files, lfs_paths = dict(repo.files), set(repo.lfs_paths)
            for item in lines[1:]:
                key, value = item["key"], item["value"]
                path = value["path"]
                if key == "file":
                    files[path] = base64.b64decode(value["content"])
                    lfs_paths.discard(path)
                elif key == "lfsFile":
                    if value["oid"] not in self.hub.lfs_objects:
                        return self._error(400, f"LFS object {value['oid']} was not uploaded")
                    files[path] = self.hub.lfs_objects[value["oid"]]
                    lfs_paths.add(path)
                elif key == "deletedFile":
                    files.pop(path, None)
                    lfs_paths.discard(path)
                elif key == "deletedFolder":
                    for p in [p for p in files if p.startswith(path.rstrip("/") + "/")]:
                        files.pop(p)
                        lfs_paths.discard(p)
                else:
                    return self._error(400, f"unsupported commit operation {key!r}")
            repo.files, repo.lfs_paths = files, lfs_paths
            repo.sha = hashlib.sha1((repo.sha + json.dumps(header)).encode() + uuid.uuid4().bytes).hexdigest()
            repo.commits.append({"summary": header.get("summary"), "oid": repo.sha, "paths": sorted(files)})
        self._send(200, {"success": True, "commitOid": repo.sha,
                         "commitUrl": f"{self.hub.url}/{repo_id}/commit/{repo.sha}"})

    def resolve(self, auth, body, repo_id, revision, filename):
        repo = self._repo(repo_id, auth, write=False)
        if repo is None:
            return
        if revision not in ("main", repo.sha):
            return self._error(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        if filename not in repo.files:
            return self._error(404, "Entry not found", code="EntryNotFound")
        data = repo.files[filename]
        oid = repo.oid(filename)
        headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{oid}"', "Content-Type": "application/octet-stream"}
        if filename in repo.lfs_paths:
            headers.update({"X-Linked-Etag": f'"{oid}"', "X-Linked-Size": str(len(data))})
        self._send(200, body=data, headers=headers)


REPO = r"(?P<repo_id>[^/]+/[^/]+?)"
ROUTES = [
    ("GET", r"/api/whoami-v2", HubHandler.whoami),
    ("POST", r"/api/repos/create", HubHandler.create_repo),
    ("POST", r"/api/validate-yaml", HubHandler.validate_yaml),
    ("GET", rf"/api/models/{REPO}(?:/revision/(?P<revision>[^/]+))?", HubHandler.repo_info),
    ("POST", rf"/api/models/{REPO}/preupload/(?P<revision>[^/]+)", HubHandler.preupload),
    ("POST", rf"/api/models/{REPO}/commit/(?P<revision>[^/]+)", HubHandler.commit),
    ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", HubHandler.lfs_batch),
    ("PUT", r"/_lfs/(?P<oid>[0-9a-f]{64})", HubHandler.lfs_put),
    ("POST", rf"/_lfs_verify/{REPO}", HubHandler.lfs_verify),
    ("GET", rf"/{REPO}/resolve/(?P<revision>[^/]+)/(?P<filename>.+)", HubHandler.resolve),
]

