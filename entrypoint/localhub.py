"""A local, stdlib-only Hugging Face Hub look-alike that the real `huggingface_hub` client can talk to.

It serves the part of the Hub HTTP API phoenix relies on: whoami, repo create/info, tree and commit listings,
preupload, NDJSON commits, the git-LFS batch API (single-PUT uploads) and `resolve` downloads with Range
support. Point the client at it with `HF_ENDPOINT=<url>` and `HF_HUB_DISABLE_XET=1` (there is no Xet storage
here). State lives in a data directory, so a server can be restarted over the same data:

    blobs/<sha256>                                          file contents, content-addressed
    repos/<model|dataset>/<ns>/<name>/repo.json             visibility, creation date, branch heads
    repos/<model|dataset>/<ns>/<name>/commits/<sha>.json    one immutable file tree per commit

Tests drive it through the Python API (`fail_next`, `cut_next`, `down`, `throttle_bps`, byte counters and
`request_log`); `python -m entrypoint.localhub --data DIR --port 0 --token TOKEN[:USER]` runs it standalone.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import hashlib
import json
import os
import re
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

Repo = tuple[str, str]  # (repo type, repo id), e.g. ("dataset", "karpathy/fineweb-edu-100b-shuffle")
Op = tuple[str, str, dict[str, Any] | None]  # ("add" | "delete" | "delete_folder", path, file entry)

API_TYPES = {"models": "model", "datasets": "dataset"}  # /api/<plural>/... -> repo type
URL_PREFIX = {"model": "", "dataset": "datasets/"}  # repo type -> prefix of web, resolve and LFS URLs
LFS_THRESHOLD = 10 * 1024  # larger (or binary) files go through LFS, as the Hub's preupload decides
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
CHUNK = 64 * 1024
DEFAULT_USER = "phoenix"
# The Hub creates every repo with a first commit holding this file; clients see it in listings, so do we.
GITATTRIBUTES = b"".join(
    b"*.%s filter=lfs diff=lfs merge=lfs -text\n" % ext for ext in (b"bin", b"pt", b"safetensors", b"parquet")
)


class HubError(Exception):
    """An error answered like the Hub does: JSON body plus X-Error-Code / X-Error-Message headers."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        fields: Mapping[str, Any] | None = None,  # extra body fields, e.g. the `url` of a repo that exists
    ):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.fields = dict(headers or {}), dict(fields or {})


class LoggedRequest(NamedTuple):
    method: str
    path: str  # URL path without the query string (LFS upload tickets travel in the query)
    status: int  # 0 when the connection was dropped before a status line


@dataclass
class _Fault:
    remaining: int
    path_contains: str | None
    method: str | None
    status: int = 500
    retry_after: int | None = None
    cut_after: int = 0
    message: str | None = None

    def matches(self, method: str, path: str) -> bool:
        return self.method in (None, method) and (self.path_contains is None or self.path_contains in path)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _wants_lfs(size: int, sample: bytes) -> bool:
    return size > LFS_THRESHOLD or b"\0" in sample


def _file_entry(sha256: str, size: int, lfs: bool, content: bytes = b"") -> dict[str, Any]:
    """A file of a commit's tree; `oid` is its git blob id (for LFS files, the blob id of the pointer)."""
    oid = _git_oid(_lfs_pointer(sha256, size) if lfs else content)
    return {"sha256": sha256, "size": size, "lfs": lfs, "oid": oid}


def _lfs_info(entry: dict[str, Any]) -> dict[str, Any]:
    pointer_size = len(_lfs_pointer(entry["sha256"], entry["size"]))
    return {"sha256": entry["sha256"], "size": entry["size"], "pointerSize": pointer_size}


def _namespace(repo: Repo) -> str:
    return repo[1].split("/")[0]


def _web_path(repo: Repo) -> str:
    return URL_PREFIX[repo[0]] + repo[1]


def _check_path(path: str) -> str:
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in path.split("/")):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


class LocalHub:
    """The server. Use it as a context manager, or call `start()` / `stop()`; `url` is valid once started."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        tokens: Mapping[str, str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ):
        self.data_dir = Path(data_dir)
        # token -> user name; a user owns the namespace of the same name
        self.tokens: dict[str, str] = dict(tokens or {})
        self.host, self.port = host, port
        self.throttle_bps: int | None = None  # caps resolve GET and LFS PUT body speed, bytes per second
        self.bytes_uploaded = 0  # LFS PUT body bytes received
        self.bytes_downloaded = 0  # resolve GET body bytes sent
        self._lock = threading.RLock()  # repo state; commits are applied all-or-nothing under it
        self._obs_lock = threading.Lock()  # counters, request log, faults, tickets, connections
        self._log: list[LoggedRequest] = []
        self._faults: list[_Fault] = []
        self._cuts: list[_Fault] = []
        self._tickets: dict[str, tuple[str, int]] = {}  # LFS upload ticket -> (sha256, size)
        self._commits: dict[Path, dict[str, Any]] = {}  # commit files never change, so cache them
        self._conns: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        for sub in ("blobs", "repos", "tmp"):
            (self.data_dir / sub).mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> LocalHub:
        if self._server is None:
            self._server = _Server((self.host, self.port), _Handler, self)
            self.port = self._server.server_address[1]  # a restart reuses the port: clients keep the URL
            self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._obs_lock:
            conns = list(self._conns)
        for conn in conns:  # keep-alive connections would otherwise go on being served
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join()

    @property
    def down(self) -> bool:
        return self._server is None

    @down.setter
    def down(self, value: bool) -> None:
        """`down = True` closes the listening socket and live connections: clients get ECONNREFUSED."""
        if value:
            self.stop()
        else:
            self.start()

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ test hooks

    def add_token(self, token: str, user: str) -> None:
        self.tokens[token] = user

    def fail_next(
        self,
        n: int = 1,
        status: int = 500,
        path_contains: str | None = None,
        method: str | None = None,
        retry_after: int | None = None,
        message: str | None = None,
    ) -> None:
        """Answer the next `n` matching requests with `status` (plus `Retry-After` when given) and the error
        `message` (the Hub's wording, e.g. "Private repository storage limit reached, ...")."""
        fault = _Fault(n, path_contains, method, status=status, retry_after=retry_after, message=message)
        with self._obs_lock:
            self._faults.append(fault)

    def cut_next(self, after_bytes: int, n: int = 1, path_contains: str | None = None) -> None:
        """Close the connection of the next `n` matching resolve GETs after `after_bytes` body bytes."""
        with self._obs_lock:
            self._cuts.append(_Fault(n, path_contains, "GET", cut_after=after_bytes))

    @property
    def request_log(self) -> list[LoggedRequest]:
        with self._obs_lock:
            return list(self._log)

    def publish(
        self,
        repo_id: str,
        files: Mapping[str, bytes | str | os.PathLike[str]],
        *,
        repo_type: str = "model",
        private: bool = False,
        message: str = "Publish files",
    ) -> str:
        """Commit `files` (bytes or local paths) to `main`, creating the repo if needed; returns the sha."""
        ops: list[Op] = []
        for path, src in files.items():
            if isinstance(src, bytes):
                sha, size = self._store([src])
            else:
                with open(src, "rb") as f:
                    sha, size = self._store(iter(functools.partial(f.read, 1 << 20), b""))
            with open(self._blob(sha), "rb") as blob:
                sample = blob.read(512)
                lfs = _wants_lfs(size, sample)
                content = b"" if lfs else sample + blob.read()
            ops.append(("add", _check_path(path), _file_entry(sha, size, lfs, content)))
        repo = (repo_type, repo_id)
        with self._lock:
            if self._meta(repo) is None:
                self._init_repo(repo, private)
            return self._apply_commit(repo, ops, message, author=_namespace(repo))

    def publish_dataset(
        self, repo_id: str, files: Mapping[str, bytes | str | os.PathLike[str]], **kw: Any
    ) -> str:
        return self.publish(repo_id, files, repo_type="dataset", **kw)

    # ------------------------------------------------------------------ used by the request handler

    def _record(self, entry: LoggedRequest) -> None:
        with self._obs_lock:
            self._log.append(entry)

    def _count(self, uploaded: int = 0, downloaded: int = 0) -> None:
        with self._obs_lock:
            self.bytes_uploaded += uploaded
            self.bytes_downloaded += downloaded

    def _take(self, faults: list[_Fault], method: str, path: str) -> _Fault | None:
        with self._obs_lock:
            for fault in faults:
                if fault.matches(method, path):
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        faults.remove(fault)
                    return fault
        return None

    def _throttle(self, nbytes: int) -> None:
        if self.throttle_bps:
            time.sleep(nbytes / self.throttle_bps)

    def _chunk_size(self) -> int:
        return min(CHUNK, max(1024, self.throttle_bps // 20)) if self.throttle_bps else CHUNK

    # ------------------------------------------------------------------ storage

    def _blob(self, sha256: str) -> Path:
        return self.data_dir / "blobs" / sha256

    def _blob_size(self, oid: str) -> int | None:
        """Size of the stored blob `oid`, None if absent (or if `oid`, from a client, isn't a sha256)."""
        return self._blob(oid).stat().st_size if SHA256_RE.match(oid) and self._blob(oid).exists() else None

    def _store(
        self, chunks: Iterable[bytes], on_chunk: Callable[[int], None] | None = None
    ) -> tuple[str, int]:
        """Add content to the blob store, hashing it on the way; returns (sha256, size)."""
        tmp = self.data_dir / "tmp" / secrets.token_hex(8)
        digest, size = hashlib.sha256(), 0
        try:
            with open(tmp, "wb") as out:
                for chunk in chunks:
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                    if on_chunk is not None:
                        on_chunk(len(chunk))
            sha = digest.hexdigest()
            os.replace(tmp, self._blob(sha))  # content-addressed: replacing a blob by itself is harmless
            return sha, size
        finally:
            tmp.unlink(missing_ok=True)

    def _repo_dir(self, repo: Repo) -> Path:
        return self.data_dir / "repos" / repo[0] / repo[1]

    @staticmethod
    def _write_json(path: Path, obj: Any) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
        os.replace(tmp, path)  # readers never see a half-written ref or commit

    def _meta(self, repo: Repo) -> dict[str, Any] | None:
        path = self._repo_dir(repo) / "repo.json"
        with self._lock:
            return json.loads(path.read_text()) if path.exists() else None

    def _load_commit(self, repo: Repo, sha: str) -> dict[str, Any] | None:
        path = self._repo_dir(repo) / "commits" / f"{sha}.json"
        with self._lock:
            if path not in self._commits and path.exists():
                self._commits[path] = json.loads(path.read_text())
            return self._commits.get(path)

    def _rev_commit(self, repo: Repo, meta: dict[str, Any], rev: str) -> dict[str, Any]:
        """The commit a branch name or a full commit sha points to."""
        sha = meta["refs"].get(rev, rev)
        commit = self._load_commit(repo, sha) if COMMIT_RE.match(sha) else None
        if commit is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    def _init_repo(self, repo: Repo, private: bool) -> None:
        (self._repo_dir(repo) / "commits").mkdir(parents=True)
        self._write_json(
            self._repo_dir(repo) / "repo.json", {"private": private, "createdAt": _now(), "refs": {}}
        )
        sha, size = self._store([GITATTRIBUTES])
        entry = _file_entry(sha, size, False, GITATTRIBUTES)
        self._apply_commit(repo, [("add", ".gitattributes", entry)], "initial commit", author="system")

    def _apply_commit(
        self,
        repo: Repo,
        ops: list[Op],
        title: str,
        *,
        author: str,
        message: str = "",
        parent_commit: str | None = None,
        branch: str = "main",
    ) -> str:
        """Apply `ops` on top of `branch` and move it to the new commit, all or nothing. Returns the sha."""
        with self._lock:
            meta = self._meta(repo)
            if meta is None:
                raise HubError(404, "Repository not found", "RepoNotFound")
            head = meta["refs"].get(branch)
            if head is None and meta["refs"]:  # only a new repo has no branch yet
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            if parent_commit is not None and not (head or "").startswith(parent_commit.lower()):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(self._load_commit(repo, head)["files"]) if head else {}
            for kind, path, entry in ops:
                if kind == "add":
                    files[path] = entry
                elif kind == "delete":
                    if files.pop(path, None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                else:
                    doomed = [p for p in files if p.startswith(path + "/")]
                    if not doomed:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in doomed:
                        del files[p]
            for path in files:  # a path can't be both a file and a folder
                parts = path.split("/")
                if any("/".join(parts[:i]) in files for i in range(1, len(parts))):
                    raise HubError(400, f"Path conflicts with an existing file: {path}")
            date = _now()
            seed = json.dumps([head, files, title, message, date, secrets.token_hex(4)], sort_keys=True)
            sha = hashlib.sha1(seed.encode()).hexdigest()
            commit = {"id": sha, "parents": [head] if head else [], "title": title, "message": message}
            commit |= {"authors": [author], "date": date, "files": files}
            self._write_json(self._repo_dir(repo) / "commits" / f"{sha}.json", commit)
            meta["refs"][branch] = sha
            self._write_json(self._repo_dir(repo) / "repo.json", meta)  # the commit point
            return sha

    # ------------------------------------------------------------------ trees

    @staticmethod
    def _dir_oid(files: Mapping[str, dict[str, Any]], folder: str) -> str:
        lines = sorted(f"{p}:{e['oid']}" for p, e in files.items() if p.startswith(folder + "/"))
        return hashlib.sha1("\n".join(lines).encode()).hexdigest()

    def _last_commit(self, repo: Repo, head: dict[str, Any], path: str, is_dir: bool) -> dict[str, str]:
        """The oldest commit of the run, going back from `head`, in which `path` kept its content."""

        def content(commit: dict[str, Any]) -> str | None:
            files = commit["files"]
            return self._dir_oid(files, path) if is_dir else files.get(path, {}).get("oid")

        current = head
        while current["parents"]:
            parent = self._load_commit(repo, current["parents"][0])
            if parent is None or content(parent) != content(current):
                break
            current = parent
        return {"id": current["id"], "title": current["title"], "date": current["date"]}

    def _tree(
        self, repo: Repo, commit: dict[str, Any], base: str, recursive: bool, expand: bool
    ) -> list[dict]:
        files: dict[str, dict[str, Any]] = commit["files"]
        prefix = base + "/" if base else ""
        if base and not any(p.startswith(prefix) for p in files):
            raise HubError(404, f"Folder not found: {base}", "EntryNotFound")
        out: list[dict[str, Any]] = []
        folders: set[str] = set()
        for path, entry in files.items():
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            depth = len(parts) if recursive else 1
            folders.update(prefix + "/".join(parts[:i]) for i in range(1, min(depth + 1, len(parts))))
            if recursive or len(parts) == 1:
                out.append({"type": "file", "path": path, "size": entry["size"], "oid": entry["oid"]})
                if entry["lfs"]:
                    lfs = _lfs_info(entry)
                    out[-1]["lfs"] = {"oid": lfs.pop("sha256"), **lfs}  # the tree calls the sha256 `oid`
        out += [{"type": "directory", "path": d, "size": 0, "oid": self._dir_oid(files, d)} for d in folders]
        if expand:
            for item in out:
                item["lastCommit"] = self._last_commit(
                    repo, commit, item["path"], item["type"] == "directory"
                )
        return sorted(out, key=lambda item: item["path"])


class _Server(ThreadingHTTPServer):
    request_queue_size = 64  # snapshot_download opens several connections at once

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], hub: LocalHub):
        self.hub = hub
        super().__init__(address, handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub: every response carries a Content-Length
    timeout = 60
    server: _Server

    # ------------------------------------------------------------------ plumbing

    def setup(self) -> None:
        super().setup()
        with self.server.hub._obs_lock:
            self.server.hub._conns.add(self.connection)

    def finish(self) -> None:
        with self.server.hub._obs_lock:
            self.server.hub._conns.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        """Silenced: the hub keeps its own request log, which never includes headers."""

    def send_response(self, code: int, message: str | None = None) -> None:
        self._status = code
        super().send_response(code, message)

    def _dispatch(self) -> None:
        hub = self.server.hub
        self._status, self._body_read = 0, False
        url = urlsplit(self.path)
        self._query = parse_qs(url.query)
        self._base = f"http://{self.headers.get('Host') or hub.url.split('://', 1)[1]}"
        try:
            try:
                if fault := hub._take(hub._faults, self.command, url.path):
                    headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
                    message = fault.message or f"Injected failure ({fault.status})"
                    raise HubError(fault.status, message, headers=headers)
                self._route([unquote(p) for p in url.path.split("/")[1:]])
            except HubError as err:
                self._drain()
                self._error(err)
            except Exception as exc:  # a localhub bug: answer 500 rather than drop the connection
                self.close_connection = True
                if self._status:
                    raise
                self._error(HubError(500, f"localhub internal error: {exc!r}"))
        except (ConnectionError, TimeoutError):
            self.close_connection = True  # the client went away, e.g. killed mid-transfer
        finally:
            hub._record(LoggedRequest(self.command, url.path, self._status))

    do_GET = do_HEAD = do_POST = do_PUT = _dispatch

    def _body_chunks(self) -> Iterator[bytes]:
        self._body_read = True
        if "Transfer-Encoding" in self.headers:  # huggingface_hub always sends a Content-Length
            self.close_connection = True  # the unread body would be taken for the next request
            raise HubError(411, "A Content-Length is required")
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining:
            chunk = self.rfile.read(min(remaining, CHUNK))
            if not chunk:
                raise ConnectionError("client closed the connection mid-body")
            remaining -= len(chunk)
            yield chunk

    def _drain(self) -> None:
        """Consume an unread body, so that the keep-alive connection stays in sync."""
        if not self._body_read:
            with contextlib.suppress(HubError):
                for _ in self._body_chunks():
                    pass

    def _json_body(self) -> Any:
        try:
            return json.loads(b"".join(self._body_chunks()) or b"{}")
        except ValueError as exc:
            raise HubError(400, "Invalid JSON body") from exc

    def _start_response(
        self, status: int, length: int, headers: Mapping[str, str], content_type: str
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()

    def _json(self, status: int, obj: Any, headers: Mapping[str, str] | None = None) -> None:
        body = json.dumps(obj).encode()
        self._start_response(status, len(body), headers or {}, "application/json; charset=utf-8")
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, err: HubError) -> None:
        message = err.message.encode("latin-1", "replace").decode("latin-1")  # header-safe
        headers = {"X-Error-Message": message, **err.headers}
        if err.code:  # how the client picks RepositoryNotFoundError, EntryNotFoundError, ...
            headers["X-Error-Code"] = err.code
        self._json(err.status, {"error": err.message, **err.fields}, headers)

    # ------------------------------------------------------------------ auth

    def _user(self) -> str | None:
        auth = self.headers.get("Authorization")
        if auth is None:
            return None
        scheme, _, token = auth.partition(" ")
        user = self.server.hub.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:  # the client recognises this exact message as a bad token, not a missing repo
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _readable(self, repo: Repo) -> dict[str, Any]:
        user = self._user()
        meta = self.server.hub._meta(repo)
        if meta is None or (meta["private"] and user != _namespace(repo)):
            # Like the Hub, don't reveal private repos: 401 for anonymous callers, 404 for other users.
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        return meta

    def _writable(self, repo: Repo) -> tuple[dict[str, Any], str]:
        meta = self._readable(repo)
        user = self._user()
        if user is None:
            raise HubError(401, "You must be authenticated to write to this repo")
        if user != _namespace(repo):
            raise HubError(403, f"You don't have the rights to write to {repo[1]}")
        return meta, user

    # ------------------------------------------------------------------ routing

    def _route(self, parts: list[str]) -> None:
        cmd = self.command
        if parts[:1] == ["api"]:
            if parts[1:] == ["whoami-v2"] and cmd == "GET":
                return self._whoami()
            if parts[1:] == ["repos", "create"] and cmd == "POST":
                return self._create_repo()
            if parts[1:] == ["validate-yaml"] and cmd == "POST":
                # The client asks before committing a README.md; this double accepts any model card.
                self._json_body()
                return self._json(200, {"errors": [], "warnings": []})
            if len(parts) >= 4 and parts[1] in API_TYPES:
                repo, tail = (API_TYPES[parts[1]], f"{parts[2]}/{parts[3]}"), parts[4:]
                action, rev = (tail + ["", ""])[:2]
                sub = "/".join(tail[2:])
                if not tail and cmd in ("GET", "HEAD"):
                    return self._repo_info(repo, "main")
                if action == "revision" and rev and not sub and cmd in ("GET", "HEAD"):
                    return self._repo_info(repo, rev)
                if action == "tree" and rev and cmd == "GET":
                    return self._list_tree(repo, rev, sub)
                if action == "commits" and rev and not sub and cmd == "GET":
                    return self._list_commits(repo, rev)
                if action == "preupload" and rev and not sub and cmd == "POST":
                    return self._preupload(repo, rev)
                if action == "commit" and rev and not sub and cmd == "POST":
                    return self._post_commit(repo, rev)
        elif parts[:1] == ["lfs-upload"] and len(parts) == 2 and cmd == "PUT":
            return self._lfs_put(parts[1])
        else:
            repo_type = "dataset" if parts[:1] == ["datasets"] else "model"
            parts = parts[1:] if repo_type == "dataset" else parts
            if (
                parts[2:] == ["info", "lfs", "objects", "batch"]
                and parts[1].endswith(".git")
                and cmd == "POST"
            ):
                return self._lfs_batch((repo_type, f"{parts[0]}/{parts[1][:-4]}"))
            if len(parts) >= 5 and parts[2] == "resolve" and cmd in ("GET", "HEAD"):
                return self._download((repo_type, f"{parts[0]}/{parts[1]}"), parts[3], "/".join(parts[4:]))
        raise HubError(404, f"Not found: {cmd} {urlsplit(self.path).path}")

    # ------------------------------------------------------------------ endpoints

    def _whoami(self) -> None:
        user = self._user()
        if user is None:
            raise HubError(401, "You must be authenticated to call whoami")
        token = {"displayName": "localhub", "role": "write"}
        auth = {"type": "access_token", "accessToken": token}
        self._json(200, {"type": "user", "name": user, "fullname": user, "orgs": [], "auth": auth})

    def _create_repo(self) -> None:
        payload, user = self._json_body(), self._user()
        repo_type, name = payload.get("type") or "model", str(payload.get("name") or "")
        if repo_type not in URL_PREFIX or not NAME_RE.match(name) or name.endswith(".git"):
            raise HubError(400, f"Invalid repo type or name: {repo_type} {name!r}")
        if user is None:
            raise HubError(401, "You must be authenticated to create a repo")
        repo = (repo_type, f"{payload.get('organization') or user}/{name}")
        if user != _namespace(repo):
            raise HubError(403, f"You don't have the rights to create a repo under {_namespace(repo)}")
        url = f"{self._base}/{_web_path(repo)}"
        hub = self.server.hub
        with hub._lock:
            if hub._meta(repo) is not None:  # create_repo(exist_ok=True) reads `url` from this answer
                raise HubError(409, f"You already created this {repo_type} repo", fields={"url": url})
            hub._init_repo(repo, bool(payload.get("private")) or payload.get("visibility") == "private")
        self._json(200, {"url": url, "name": repo[1], "id": repo[1]})

    def _repo_info(self, repo: Repo, rev: str) -> None:
        meta = self._readable(repo)
        commit = self.server.hub._rev_commit(repo, meta, rev)
        siblings = []
        for path, entry in sorted(commit["files"].items()):
            siblings.append({"rfilename": path, "size": entry["size"], "blobId": entry["oid"]})
            if entry["lfs"]:
                siblings[-1]["lfs"] = _lfs_info(entry)
        info = {"id": repo[1], "author": _namespace(repo), "sha": commit["id"], "private": meta["private"]}
        info |= {"createdAt": meta["createdAt"], "lastModified": commit["date"], "siblings": siblings}
        self._json(200, info)

    def _list_tree(self, repo: Repo, rev: str, path: str) -> None:
        hub = self.server.hub
        commit = hub._rev_commit(repo, self._readable(repo), rev)
        recursive, expand = (
            self._query.get(k, [""])[0] in ("1", "true", "True") for k in ("recursive", "expand")
        )
        # One page holds everything: the client follows a `Link: rel="next"` header only when there is one.
        self._json(200, hub._tree(repo, commit, path.strip("/"), recursive, expand))

    def _list_commits(self, repo: Repo, rev: str) -> None:
        hub = self.server.hub
        commit: dict[str, Any] | None = hub._rev_commit(repo, self._readable(repo), rev)
        out = []
        while commit is not None:
            authors = [{"user": a} for a in commit["authors"]]
            out.append({k: commit[k] for k in ("id", "title", "message", "date")} | {"authors": authors})
            commit = hub._load_commit(repo, commit["parents"][0]) if commit["parents"] else None
        self._json(200, out)

    def _preupload(self, repo: Repo, rev: str) -> None:
        meta, _ = self._writable(repo)
        files = self.server.hub._rev_commit(repo, meta, rev)["files"]
        answer = []
        for item in self._json_body().get("files", []):
            sample = base64.b64decode(item.get("sample", ""))
            mode = "lfs" if _wants_lfs(int(item.get("size", 0)), sample) else "regular"
            answer.append({"path": item["path"], "uploadMode": mode, "shouldIgnore": False})
            if (existing := files.get(item["path"])) is not None:
                # The client compares it to its local oid (LFS: sha256, else git sha1): unchanged = skipped.
                answer[-1]["oid"] = existing["sha256"] if existing["lfs"] else existing["oid"]
        self._json(200, {"files": answer})

    def _post_commit(self, repo: Repo, branch: str) -> None:
        _, user = self._writable(repo)
        if self._query.get("create_pr"):
            raise HubError(400, "Pull requests are not supported by localhub")
        hub = self.server.hub
        try:
            lines = [json.loads(line) for line in b"".join(self._body_chunks()).splitlines() if line.strip()]
        except ValueError as exc:
            raise HubError(400, "The commit payload must be NDJSON") from exc
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first NDJSON line must be the commit header")
        ops: list[Op] = []
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            raw = str(value.get("path", ""))
            path = _check_path(raw.rstrip("/") if key == "deletedFolder" else raw)  # folders may end with /
            if key == "file":
                content = base64.b64decode(value["content"])
                sha, size = hub._store([content])
                ops.append(("add", path, _file_entry(sha, size, False, content)))
            elif key == "lfsFile":
                oid = str(value.get("oid", ""))
                size = hub._blob_size(oid)
                if size is None or value.get("size", size) != size:
                    raise HubError(400, f"LFS object {oid} of {path} was not uploaded (or has another size)")
                ops.append(("add", path, _file_entry(oid, size, True)))
            elif key in ("deletedFile", "deletedFolder"):
                ops.append(("delete" if key == "deletedFile" else "delete_folder", path, None))
            else:
                raise HubError(400, f"Unknown commit operation: {key}")
        header = lines[0]["value"]
        summary = header.get("summary") or "Update"
        sha = hub._apply_commit(
            repo,
            ops,
            summary,
            author=user,
            message=header.get("description", ""),
            parent_commit=header.get("parentCommit"),
            branch=branch,
        )
        commit_url = f"{self._base}/{_web_path(repo)}/commit/{sha}"
        self._json(200, {"success": True, "commitOid": sha, "commitUrl": commit_url, "pullRequestUrl": None})

    def _lfs_batch(self, repo: Repo) -> None:
        self._writable(repo)
        payload = self._json_body()
        if payload.get("operation") != "upload":
            raise HubError(400, "Only the upload operation is supported")
        hub = self.server.hub
        objects: list[dict[str, Any]] = []
        for obj in payload.get("objects", []):
            oid, size = str(obj.get("oid", "")), obj.get("size")
            objects.append({"oid": oid, "size": size})
            if not SHA256_RE.match(oid) or not isinstance(size, int) or size < 0:
                objects[-1] |= {"size": -1, "error": {"code": 422, "message": "Invalid oid or size"}}
            elif hub._blob_size(oid) is None:  # known blobs get no "actions": the client skips their upload
                ticket = secrets.token_urlsafe(24)
                with hub._obs_lock:
                    hub._tickets[ticket] = (oid, size)
                # No auth header comes with this PUT (the client expects a presigned URL): the ticket is it.
                href = f"{self._base}/lfs-upload/{oid}?ticket={ticket}"
                objects[-1] |= {"authenticated": True, "actions": {"upload": {"href": href}}}
        self._json(200, {"transfer": "basic", "objects": objects})

    def _lfs_put(self, oid: str) -> None:
        hub = self.server.hub
        ticket = self._query.get("ticket", [""])[0]
        with hub._obs_lock:
            expected = hub._tickets.get(ticket)
        if expected is None or expected[0] != oid:
            raise HubError(403, "Invalid or expired upload URL")

        def on_chunk(nbytes: int) -> None:
            hub._count(uploaded=nbytes)
            hub._throttle(nbytes)

        # Stored under the sha256 it really has: a wrong upload never takes the place of the announced blob.
        if hub._store(self._body_chunks(), on_chunk) != expected:
            raise HubError(400, f"Uploaded content does not match oid {oid} and size {expected[1]}")
        with hub._obs_lock:
            hub._tickets.pop(ticket, None)
        self._start_response(200, 0, {}, "text/plain")

    def _download(self, repo: Repo, rev: str, path: str) -> None:
        hub = self.server.hub
        commit = hub._rev_commit(repo, self._readable(repo), rev)
        entry = commit["files"].get(path)
        if entry is None:  # the client caches the miss under X-Repo-Commit
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit["id"]})
        size = entry["size"]
        headers = {"X-Repo-Commit": commit["id"], "Accept-Ranges": "bytes", "ETag": f'"{entry["oid"]}"'}
        if entry["lfs"]:  # the client names its cached blob after the linked (sha256) etag, as on the Hub
            headers |= {"X-Linked-Etag": f'"{entry["sha256"]}"', "X-Linked-Size": str(size)}
        start, end, status = 0, size - 1, 200
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").replace(" ", ""))
        if match and match.group(1) + match.group(2):
            first, last = match.groups()
            start = int(first) if first else max(size - int(last), 0)
            end = min(int(last), size - 1) if first and last else size - 1
            if start >= size or start > end:
                raise HubError(
                    416, "Range not satisfiable", headers=headers | {"Content-Range": f"bytes */{size}"}
                )
            status, headers["Content-Range"] = 206, f"bytes {start}-{end}/{size}"
        self._start_response(status, end - start + 1, headers, "application/octet-stream")
        if self.command == "HEAD":
            return
        cut = hub._take(hub._cuts, "GET", urlsplit(self.path).path)
        remaining = end - start + 1 if cut is None else min(end - start + 1, cut.cut_after)
        with open(hub._blob(entry["sha256"]), "rb") as f:
            f.seek(start)
            while remaining > 0:
                chunk = f.read(min(remaining, hub._chunk_size()))
                self.wfile.write(chunk)
                remaining -= len(chunk)
                hub._count(downloaded=len(chunk))
                hub._throttle(len(chunk))
        if cut is not None:
            self.close_connection = True  # a short body, then EOF: the client sees a truncated transfer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m entrypoint.localhub", description="A local Hugging Face Hub"
    )
    parser.add_argument("--data", required=True, help="data directory (created if missing, reused if not)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument(
        "--token",
        action="append",
        default=[],
        metavar="TOKEN[:USER]",
        help=f"an accepted token and the user it authenticates (default {DEFAULT_USER}); repeatable",
    )
    args = parser.parse_args(argv)
    tokens = {token: user or DEFAULT_USER for token, _, user in (spec.partition(":") for spec in args.token)}
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with LocalHub(args.data, tokens, host=args.host, port=args.port) as hub:
        print(f"url={hub.url}", flush=True)  # tokens are never printed
        stop.wait()


if __name__ == "__main__":
    main()
