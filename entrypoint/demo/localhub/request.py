"""What every local Hub route builds on: the request body, JSON and byte responses (Range, throttled, cut by
fault hooks), the Hub's error shape, auth, and Xet tokens; the server that hands requests to a handler."""

from __future__ import annotations

import contextlib
import json
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from entrypoint.demo.localhub.common import CHUNK, HubError, LoggedRequest, Repo, namespace
from entrypoint.demo.localhub.state import HubState
from entrypoint.demo.localhub.storage import TOKEN_LIFETIME_S


class HubServer(ThreadingHTTPServer):
    request_queue_size = 64  # snapshot_download opens several connections at once

    def __init__(self, address: tuple[str, int], handler: type[HubRequest], hub: HubState):
        self.hub = hub
        super().__init__(address, handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up mid-request (a killed sidecar, a lost instance) is not the server's error:
        no traceback for it on the demo's terminal."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class HubRequest(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub: every response carries a Content-Length
    timeout = 60
    server: HubServer
    _status: int
    _body_read: bool
    _query: dict[str, list[str]]
    _base: str

    # ------------------------------------------------------------------ plumbing

    @property
    def hub(self) -> HubState:
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

    def _name_taken(self, name: str, holder: str, path: str) -> HubError:
        """The 409 for a bucket and a repo of one id (`refuse_shared_names`), shaped like the Hub's "already
        created" answer, whose `url` (here: what holds the id) `create_*(exist_ok=True)` reads."""
        url = f"{self._base}/{path}"
        return HubError(409, f"You already created a {holder} named {name}", fields={"url": url})

    def _xet_token(self, transfer: str, scope: str, make_folder: Callable[[], Path]) -> None:
        """A CAS token as the Hub hands it out: JSON for hf_xet, X-Xet-* headers for huggingface_hub. A Xet
        fault (terms.py) may refuse it, expire it at once for a CAS over HTTP, or leave the objects out."""
        verdict = self.hub._xet_verdict(transfer, scope)
        if verdict == "refuse":
            raise HubError(401, "Invalid credentials in Authorization header")
        expires = int(time.time()) + TOKEN_LIFETIME_S
        if verdict == "auth":  # the CAS is never reached: hf_xet first refreshes the token, and is refused
            cas_url, token, expires = f"{self._base}/xet-cas", "expired", int(time.time())
        else:
            folder = make_folder()
            cas_url, token = f"local://{folder}", folder.name
        if verdict == "not_found":
            self.hub.drop_xet_objects(folder)
            expires = int(time.time())  # huggingface_hub asks again for the next file rather than reuse it
        headers = {"X-Xet-Cas-Url": cas_url, "X-Xet-Access-Token": token}
        headers["X-Xet-Token-Expiration"] = str(expires)
        self._json(200, {"casUrl": cas_url, "accessToken": token, "exp": expires}, headers)

    # ------------------------------------------------------------------ bytes

    def _byte_range(self, size: int, headers: dict[str, str]) -> tuple[int, int, int]:
        """(first byte, last byte, status) that the request's `Range` asks of a `size`-byte file."""
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
        return start, end, status

    def _send_bytes(self, f: BinaryIO, start: int, end: int, status: int, headers: dict[str, str]) -> None:
        """Send bytes `start`..`end` of the open file `f` (closed after), throttled, cut and counted."""
        hub = self.hub
        self._start_response(status, end - start + 1, headers, "application/octet-stream")
        cut = hub._take(hub._cuts, "GET", urlsplit(self.path).path)
        remaining = end - start + 1 if cut is None else min(end - start + 1, cut.cut_after)
        with f:
            f.seek(start)
            while remaining > 0:
                chunk = f.read(min(remaining, hub._chunk_size()))
                self.wfile.write(chunk)
                remaining -= len(chunk)
                hub._count(downloaded=len(chunk))
                hub._throttle(len(chunk))
        if cut is not None:
            self.close_connection = True  # a short body, then EOF: the client sees a truncated transfer
