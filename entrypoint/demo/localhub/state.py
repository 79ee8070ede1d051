"""Everything the local Hub holds, without HTTP: repos, file contents, buckets, tokens, the Hub's terms and
the test hooks; storage figures across repos and buckets; and publishing files into it from Python."""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from entrypoint.demo.localhub.buckets import BucketStore
from entrypoint.demo.localhub.common import Op, check_path, file_entry, namespace, wants_lfs
from entrypoint.demo.localhub.faults import FaultHooks
from entrypoint.demo.localhub.repos import RepoStore
from entrypoint.demo.localhub.storage import ContentStore
from entrypoint.demo.localhub.terms import HubTerms, Storage


class HubState(FaultHooks, HubTerms, RepoStore, ContentStore, BucketStore):
    """The Hub's data and its test hooks, as the routes see them; `LocalHub` serves it over HTTP."""

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
        HubTerms.__init__(self)
        (self.data_dir / "repos").mkdir(parents=True, exist_ok=True)
        self._tickets: dict[str, tuple[str, int]] = {}  # LFS upload ticket -> (sha256, size)
        self._conns: set[socket.socket] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def storage(self, owner: str) -> Storage:
        """Counted and settled storage of a namespace (its repos and buckets together, as its quota counts
        them) or of the repos and bucket of one id ("ns/name"). Bucket deletes are settled at once."""
        with self._lock:
            buckets = self.bucket_size(owner) if "/" in owner else self._bucket_bytes(owner)
            counted, settled = (sum(self._owner_lfs(owner, settled).values()) for settled in (False, True))
            return Storage(counted + buckets, settled + buckets)

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
