"""The Hub's git repo as phoenix uses it: a snapshot of its files at one commit, and the repo client.

The repo mirrors the volume: `tokenizer/tokenizer.json`, `runs/<tag>/run.json`, `runs/<tag>/generation.json`
(the fencing token, see `stores.claim_generation`) and, with HF_CHECKPOINT_STORE=repo (else they are in a
Storage Bucket), the checkpoints: `<stage>_checkpoints/<tag>/step_NNNNNN/<files>` (see `repo_store`). Calls go
through `calls.call`: retried when transient, else one line.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from huggingface_hub import CommitOperationAdd, HfApi, RepoFile, hf_hub_url
from huggingface_hub.errors import EntryNotFoundError

# `http_get` is the library's own resumable download loop (Range requests from `resume_size`); the
# higher-level hf_hub_download restarts a killed download from byte 0 (see `restore`). `xet_get` is its
# Xet download of one file (hf_xet reconstructs it from CAS chunks).
from huggingface_hub.file_download import get_hf_file_metadata, http_get, xet_get
from huggingface_hub.utils import build_hf_headers
from huggingface_hub.utils._runtime import is_xet_available
from huggingface_hub.utils.sha import git_hash

from entrypoint.hub.calls import Pause, call
from entrypoint.hub.config import GENERATION_FILE, HubConfig
from entrypoint.hub.errors import RepoMissing
from entrypoint.logs import kv
from trainer import __version__
from trainer import checkpoint_layout as layout

log = logging.getLogger("phoenix.hub")
T = TypeVar("T")

_OS_ERROR = re.compile(r"\(os error (\d+)\)")


@dataclass(frozen=True)
class HubSnapshot:
    """The repo at one commit: every file with its size and hashes."""

    head: str
    files: dict[str, RepoFile]

    def complete_steps(self, cfg: HubConfig, stage: str) -> list[int]:
        """Steps whose MANIFEST.json is on the Hub, highest first: the Hub's definition of complete."""
        prefix = cfg.stage_path(stage) + "/"
        steps = set()
        for path in self.files:
            step_name, _, name = path.removeprefix(prefix).partition("/")
            step = layout.parse_step(step_name)
            if path.startswith(prefix) and name == layout.MANIFEST_NAME and step is not None:
                steps.add(step)
        return sorted(steps, reverse=True)

    def checkpoint_files(self, cfg: HubConfig, stage: str, step: int) -> dict[str, RepoFile]:
        prefix = cfg.checkpoint_path(stage, step) + "/"
        return {p[len(prefix) :]: f for p, f in self.files.items() if p.startswith(prefix)}

    def same(self, path_in_repo: str, local: Path, sha256: str | None = None) -> bool:
        """True if the Hub already holds exactly this content at this path (LFS sha256 or git blob id)."""
        remote = self.files.get(path_in_repo)
        if remote is None or remote.size != local.stat().st_size:
            return False
        if remote.lfs is not None:
            return remote.lfs.sha256 == (sha256 or layout.sha256_file(local))
        return remote.blob_id == git_hash(local.read_bytes())


class Hub:
    """A Hub repo seen through huggingface_hub's HfApi, with phoenix's retries and error lines."""

    def __init__(self, cfg: HubConfig, api: HfApi | None = None, pause: Pause | None = None):
        if cfg.repo_id is None:
            raise ValueError("Hub needs HF_REPO_ID")
        self.cfg = cfg
        self.pause = pause or Pause()
        self.repo_id: str = cfg.repo_id
        self.repo_type = cfg.git_repo_type
        self.api = api or HfApi(
            endpoint=cfg.endpoint, token=cfg.token, library_name="phoenix", library_version=__version__
        )

    def call(self, what: str, fn: Callable[[], T], **kw: Any) -> T:
        return call(what, fn, self.cfg, pause=self.pause, **kw)

    def ensure_repo(self) -> None:
        """Create the repo if missing (private unless HF_PRIVATE=false); an existing one is left as it is.

        Looked up first: create_repo is rate limited, and on the Hub it needs the right to create repos in
        the namespace even when the repo exists (exist_ok), which a token scoped to one repo lacks.
        """
        try:
            self.head()
            return
        except RepoMissing:
            pass
        self.call(
            "create_repo",
            lambda: self.api.create_repo(
                self.repo_id, repo_type=self.repo_type, private=self.cfg.private, exist_ok=True
            ),
        )

    def head(self) -> str:
        info = self.call("repo_info", lambda: self.api.repo_info(self.repo_id, repo_type=self.repo_type))
        assert info.sha is not None
        return info.sha

    def snapshot(self) -> HubSnapshot:
        """Head commit and the full file listing at exactly that commit."""
        head = self.head()
        entries = self.call(
            "list_repo_tree",
            lambda: list(
                self.api.list_repo_tree(
                    self.repo_id, recursive=True, revision=head, repo_type=self.repo_type
                )
            ),
        )
        return HubSnapshot(head=head, files={e.path: e for e in entries if isinstance(e, RepoFile)})

    def commits(self) -> list[Any]:
        return self.call("list_repo_commits", lambda: self.api.list_repo_commits(
            self.repo_id, repo_type=self.repo_type))

    def used_storage(self) -> int | None:
        """Bytes of large files the repo's history holds, as the Hub counts them (None if not reported)."""
        info = self.call("repo_info", lambda: self.api.repo_info(
            self.repo_id, repo_type=self.repo_type, expand=["usedStorage"]))
        return info.used_storage

    def squash(self, message: str) -> None:
        """Squash the history of `main` into one commit with the same tree: frees what nothing keeps."""
        self.call("super_squash_history", lambda: self.api.super_squash_history(
            self.repo_id, repo_type=self.repo_type, commit_message=message))

    def url(self, path_in_repo: str, revision: str) -> str:
        return hf_hub_url(
            self.repo_id,
            path_in_repo,
            repo_type=self.repo_type,
            revision=revision,
            endpoint=self.cfg.endpoint,
        )

    def fetch(
        self, path_in_repo: str, dest: BinaryIO, *, revision: str, size: int | None, resume_size: int = 0
    ) -> None:
        """Stream one file into `dest` (positioned after `resume_size` bytes already there) via Range."""
        http_get(
            self.url(path_in_repo, revision),
            dest,
            resume_size=resume_size,
            headers=build_hf_headers(
                token=self.cfg.token, library_name="phoenix", library_version=__version__
            ),
            expected_size=size,
            displayed_filename=path_in_repo,
        )

    def fetch_xet(self, path_in_repo: str, dest: Path, *, revision: str, size: int) -> bool:
        """Download a Xet-backed file into `dest` through hf_xet; False (nothing done) for other files,
        or when Xet is off (HF_HUB_DISABLE_XET=1, no hf_xet)."""
        if not is_xet_available():
            return False
        headers = build_hf_headers(token=self.cfg.token, library_name="phoenix", library_version=__version__)
        url = self.url(path_in_repo, revision)
        meta = get_hf_file_metadata(url, token=self.cfg.token, headers=headers, endpoint=self.cfg.endpoint)
        if meta.xet_file_data is None:
            return False
        try:
            xet_get(incomplete_path=dest, xet_file_data=meta.xet_file_data, headers=headers,
                    expected_size=size, displayed_filename=path_in_repo)
        except RuntimeError as exc:
            if (error := xet_os_error(exc, dest)) is None:
                raise
            raise error from exc
        return True

    def read_json(self, snapshot: HubSnapshot, path_in_repo: str) -> Any:
        """A small JSON file at the snapshot's commit, or None if it is not in the repo."""
        remote = snapshot.files.get(path_in_repo)
        if remote is None:
            return None

        def download() -> bytes:
            buf = io.BytesIO()
            self.fetch(path_in_repo, buf, revision=snapshot.head, size=remote.size)
            return buf.getvalue()

        data = self.call(f"download {path_in_repo}", download)
        try:
            return json.loads(data)
        except ValueError:
            log.warning(kv(event="bad_json", path=path_in_repo))
            return None

    def claim_record(self, snapshot: HubSnapshot) -> dict[str, Any]:
        """The Hub's generation.json (generation, claimed_at, host), {} if absent or unreadable."""
        record = self.read_json(snapshot, self.cfg.run_path(GENERATION_FILE))
        return record if isinstance(record, dict) else {}

    def generation(self, snapshot: HubSnapshot) -> int:
        return generation_of(self.claim_record(snapshot))

    def generation_at(self, revision: str) -> int:
        """The generation claimed at `revision` (a commit; "main": the newest), in one request, no listing:
        the checks right before a squash or a bucket batch."""
        path = self.cfg.run_path(GENERATION_FILE)

        def download() -> bytes | None:
            buf = io.BytesIO()
            try:
                self.fetch(path, buf, revision=revision, size=None)
            except EntryNotFoundError:  # no claim yet
                return None
            return buf.getvalue()

        data = self.call(f"download {path}", download)
        try:
            return generation_of(json.loads(data)) if data else 0
        except ValueError:
            log.warning(kv(event="bad_json", path=path))
            return 0

    def commit(self, operations: list[Any], message: str, parent: str) -> str:
        """One commit on top of `parent` (412: HeadMoved); returns the new head; LFS uploads are parallel."""

        def attempt() -> str:
            # Operation objects are mutated by create_commit, so every attempt gets fresh copies.
            ops = [_fresh(op) for op in operations]
            info = self.api.create_commit(
                self.repo_id,
                ops,
                commit_message=message,
                repo_type=self.repo_type,
                parent_commit=parent,
            )
            return info.oid

        return self.call(f"commit {message!r}", attempt)


def xet_os_error(exc: RuntimeError, dest: Path) -> OSError | None:
    """hf_xet reports a local I/O failure (full disk, read-only volume) as a RuntimeError ending in "(os error
    N)": the OSError with that errno, so it is the same one-line volume error as over HTTP (else None)."""
    if (found := _OS_ERROR.search(str(exc))) is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code), str(dest))


def add_operation(path_in_repo: str, local: Path, sha256: str | None = None) -> CommitOperationAdd:
    """An upload of `local`; a known sha256 (from the manifest) saves create_commit from hashing it again."""
    op = CommitOperationAdd(path_in_repo=path_in_repo, path_or_fileobj=str(local))
    if sha256 is not None:
        op.upload_info.sha256 = bytes.fromhex(sha256)
    return op


def _fresh(op: Any) -> Any:
    if not isinstance(op, CommitOperationAdd):
        return op
    sha = op.upload_info.sha256.hex() if op.upload_info.is_hashed else None
    if isinstance(op.path_or_fileobj, bytes):
        return CommitOperationAdd(path_in_repo=op.path_in_repo, path_or_fileobj=op.path_or_fileobj)
    return add_operation(op.path_in_repo, Path(str(op.path_or_fileobj)), sha)


def generation_of(obj: Any) -> int:
    value = obj.get("generation") if isinstance(obj, dict) else None
    return value if isinstance(value, int) and value >= 0 else 0
