"""HTTP plumbing of the local Hub: one request handler, auth, the Hub's error shape, and the URL routing."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from entrypoint.localhub.api_buckets import BucketRoutes
from entrypoint.localhub.api_files import FileRoutes
from entrypoint.localhub.api_repos import RepoRoutes
from entrypoint.localhub.common import API_TYPES, CHUNK, HubError, LoggedRequest, Repo, namespace

if TYPE_CHECKING:
    from entrypoint.localhub.server import LocalHub


class Server(ThreadingHTTPServer):
    request_queue_size = 64  # snapshot_download opens several connections at once

    def __init__(self, address: tuple[str, int], hub: LocalHub):
        self.hub = hub
        super().__init__(address, Handler)


class Handler(RepoRoutes, FileRoutes, BucketRoutes, BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub: every response carries a Content-Length
    timeout = 60
    server: Server

    # ------------------------------------------------------------------ plumbing

    @property
    def hub(self) -> LocalHub:
        return self.server.hub

    def setup(self) -> None:
        super().setup()
        with self.hub._obs_lock:
            self.hub._conns.add(self.connection)

    def finish(self) -> None:
        with self.hub._obs_lock:
            self.hub._conns.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        """Silenced: the hub keeps its own request log, which never includes headers."""

    def send_response(self, code: int, message: str | None = None) -> None:
        self._status = code
        # Logged before the response leaves: a client that has read it must find it in request_log.
        self.hub._record(LoggedRequest(self.command, urlsplit(self.path).path, code))
        super().send_response(code, message)

    def _dispatch(self) -> None:
        hub = self.hub
        self._status, self._body_read = 0, False
        url = urlsplit(self.path)
        self._query = parse_qs(url.query)
        self._base = f"http://{self.headers.get('Host') or hub.url.split('://', 1)[1]}"
        hub._count_in_flight(+1)
        try:
            try:
                hub._hold(self.command, url.path)
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
            if not self._status:  # no answer sent: the client went away first
                hub._record(LoggedRequest(self.command, url.path, 0))
            hub._count_in_flight(-1)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

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
        user = self.hub.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:  # the client recognises this exact message as a bad token, not a missing repo
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _readable(self, repo: Repo) -> dict[str, Any]:
        user = self._user()
        meta = self.hub._meta(repo)
        if meta is None or (meta["private"] and user != namespace(repo)):
            # Like the Hub, don't reveal private repos: 401 for anonymous callers, 404 for other users.
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        return meta

    def _writable(self, repo: Repo) -> tuple[dict[str, Any], str]:
        meta = self._readable(repo)
        user = self._user()
        if user is None:
            raise HubError(401, "You must be authenticated to write to this repo")
        if user != namespace(repo):
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
            if parts[1:2] == ["buckets"] and self._bucket_route(parts[2:]):
                return None
            if len(parts) >= 4 and parts[1] in API_TYPES:
                repo, tail = (API_TYPES[parts[1]], f"{parts[2]}/{parts[3]}"), parts[4:]
                action, rev = (tail + ["", ""])[:2]
                sub = "/".join(tail[2:])
                routes = {
                    ("GET", "revision"): self._repo_info,
                    ("GET", "commits"): self._list_commits,
                    ("POST", "preupload"): self._preupload,
                    ("POST", "commit"): self._post_commit,
                    ("POST", "super-squash"): self._super_squash,
                    ("GET", "xet-write-token"): self._xet_write_token,
                    ("GET", "xet-read-token"): self._xet_read_token,
                }
                if not tail and cmd in ("GET", "HEAD"):
                    return self._repo_info(repo, "main")
                if action == "tree" and rev and cmd == "GET":
                    return self._list_tree(repo, rev, sub)
                if action == "lfs-files" and not sub:
                    if not rev and cmd == "GET":
                        return self._list_lfs_files(repo)
                    if rev == "batch" and cmd == "POST":
                        return self._delete_lfs_files(repo)
                route = routes.get(("GET" if cmd == "HEAD" else cmd, action))
                if route is not None and rev and not sub:
                    return route(repo, rev)
        elif parts[:1] == ["buckets"] and parts[3:4] == ["resolve"] and len(parts) >= 5:
            if cmd not in ("GET", "HEAD"):
                raise HubError(405, f"Method not allowed: {cmd}")
            return self._bucket_download(f"{parts[1]}/{parts[2]}", "/".join(parts[4:]))
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
