"""What every part of the local Hub shares: the Hub's error shape, repo naming, file entries, helpers."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

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
# The Hub's answer when a push would take an account past its private storage (huggingface_hub#3048).
QUOTA_MESSAGE = "Private repository storage limit reached, please upgrade your plan"
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


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def wants_lfs(size: int, sample: bytes) -> bool:
    return size > LFS_THRESHOLD or b"\0" in sample


def file_entry(
    sha256: str, size: int, lfs: bool, content: bytes = b"", xet: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """A file of a commit's tree; `oid` is its git blob id (for LFS files, the blob id of the pointer).

    `xet` ({"hash", "pack"}) marks a file uploaded through Xet: its content lives in that Xet pack.
    """
    oid = git_oid(lfs_pointer(sha256, size) if lfs else content)
    entry: dict[str, Any] = {"sha256": sha256, "size": size, "lfs": lfs, "oid": oid}
    if xet is not None:
        entry["xet"] = dict(xet)
    return entry


def lfs_info(entry: dict[str, Any]) -> dict[str, Any]:
    pointer_size = len(lfs_pointer(entry["sha256"], entry["size"]))
    return {"sha256": entry["sha256"], "size": entry["size"], "pointerSize": pointer_size}


def namespace(repo: Repo) -> str:
    return repo[1].split("/")[0]


def web_path(repo: Repo) -> str:
    return URL_PREFIX[repo[0]] + repo[1]


def check_path(path: str) -> str:
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in path.split("/")):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)  # readers never see a half-written ref or commit
