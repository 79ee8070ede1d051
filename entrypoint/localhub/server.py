"""The local Hub server: lifecycle (start, stop, down), publishing files from Python, and the CLI."""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import signal
import socket
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from entrypoint.localhub.buckets import BucketStore
from entrypoint.localhub.common import DEFAULT_USER, Op, check_path, file_entry, namespace, wants_lfs
from entrypoint.localhub.faults import FaultHooks
from entrypoint.localhub.handler import Server
from entrypoint.localhub.repos import RepoStore
from entrypoint.localhub.storage import ContentStore


class LocalHub(FaultHooks, RepoStore, ContentStore, BucketStore):
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
        FaultHooks.__init__(self)
        RepoStore.__init__(self)
        ContentStore.__init__(self)
        BucketStore.__init__(self)
        (self.data_dir / "repos").mkdir(parents=True, exist_ok=True)
        self._tickets: dict[str, tuple[str, int]] = {}  # LFS upload ticket -> (sha256, size)
        self._conns: set[socket.socket] = set()
        self._server: Server | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> LocalHub:
        if self._server is None:
            self._server = Server((self.host, self.port), self)
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

    # ------------------------------------------------------------------ publishing from Python

    def add_token(self, token: str, user: str) -> None:
        self.tokens[token] = user

    def publish(
        self,
        repo_id: str,
        files: Mapping[str, bytes | str | os.PathLike[str]],
        *,
        repo_type: str = "model",
        private: bool = False,
        message: str = "Publish files",
    ) -> str:
        """Commit `files` (bytes or local paths) to `main` as plain LFS/regular files, creating the repo
        if needed; returns the sha. (Xet-backed files come only from a client uploading through Xet.)"""
        ops: list[Op] = []
        for path, src in files.items():
            if isinstance(src, bytes):
                sha, size = self._store([src])
            else:
                with open(src, "rb") as f:
                    sha, size = self._store(iter(functools.partial(f.read, 1 << 20), b""))
            with open(self._blob(sha), "rb") as blob:
                sample = blob.read(512)
                lfs = wants_lfs(size, sample)
                content = b"" if lfs else sample + blob.read()
            ops.append(("add", check_path(path), file_entry(sha, size, lfs, content)))
        repo = (repo_type, repo_id)
        with self._lock:
            if self._meta(repo) is None:
                self._init_repo(repo, private)
            return self._apply_commit(repo, ops, message, author=namespace(repo))

    def publish_dataset(
        self, repo_id: str, files: Mapping[str, bytes | str | os.PathLike[str]], **kw: Any
    ) -> str:
        return self.publish(repo_id, files, repo_type="dataset", **kw)


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
    parser.add_argument("--quota", action="append", default=[], metavar="OWNER=BYTES",
                        help="cap the storage of a namespace, or of one repo or bucket (ns/name); repeatable")
    args = parser.parse_args(argv)
    tokens = {token: user or DEFAULT_USER for token, _, user in (spec.partition(":") for spec in args.token)}
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with LocalHub(args.data, tokens, host=args.host, port=args.port) as hub:
        for spec in args.quota:
            owner, _, nbytes = spec.partition("=")
            hub.set_quota(owner, int(nbytes))
        print(f"url={hub.url}", flush=True)  # tokens are never printed
        stop.wait()
