"""Storage Buckets of the local Hub: mutable, non-versioned maps of paths to Xet files, one store per bucket.

A bucket lives in `buckets/<ns>/<name>/bucket.json` (written atomically): visibility, creation date, its
files (path -> xetHash, size, mtime, uploadedAt) and `store`, the Xet pack holding the content of every file
it lists. Nothing is versioned: an addFile replaces a path in place, a deleteFile removes it, and the bucket's
storage (`size`, as `bucket_info` names it) is the sum of the sizes of the files it holds now, so a delete
frees storage at once, whatever `credit_delay_s` (the Hub documents bucket deletions as immediate). Quotas
(`set_quota`) count it: per bucket ("ns/name") or per namespace, together with the namespace's repos.

One pack per bucket, because `download_bucket_files` reads every file of a call through a single read token.
A write token hands out a copy of the bucket's store to upload into; at batch time, an upload folder that
still holds the whole store (no other batch landed meanwhile) is frozen into the new store, by hard links.
Otherwise (a concurrent writer, a copyFile from another bucket or repo) the server rebuilds the missing files
with hf_xet and uploads them into a copy of the store: Xet hashes are content hashes, so they are unchanged.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from entrypoint.demo.localhub.common import QUOTA_MESSAGE, SHA256_RE, HubError, check_path, now, write_json
from entrypoint.demo.localhub.faults import Fault
from entrypoint.demo.localhub.storage import _XET_INDEX

EMPTY_XET_HASH = "0" * 64  # what hf_xet names an empty file; it has no content to store
Source = tuple[str, Path]  # ("upload" | "pack", CAS folder) that holds a Xet file


def _iso_ms(mtime_ms: Any) -> str:
    """The client sends mtime in milliseconds since the epoch; the Hub answers it as an ISO date."""
    try:
        stamp = datetime.fromtimestamp(int(mtime_ms) / 1000, tz=timezone.utc)
    except (TypeError, ValueError, OverflowError, OSError):
        return now()
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class BucketStore:
    """Mixed into LocalHub; bucket state changes only under the repo lock `_lock`."""

    data_dir: Path
    _lock: threading.RLock
    _obs_lock: threading.Lock
    quotas: dict[str, int]
    _bucket_op_faults: list[Fault]

    def __init__(self) -> None:
        self.bucket_page_size = 1000  # tree entries per page; the client follows `Link: rel="next"`
        (self.data_dir / "buckets").mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ public figures

    def bucket_size(self, bucket_id: str) -> int:
        """Bytes of the files the bucket holds now (its storage; what `bucket_info().size` reports)."""
        with self._lock:
            bucket = self._bucket(bucket_id)
            return sum(e["size"] for e in bucket["files"].values()) if bucket else 0

    # ------------------------------------------------------------------ state on disk

    def _bucket_file(self, bucket_id: str) -> Path:
        return self.data_dir / "buckets" / bucket_id / "bucket.json"

    def _bucket(self, bucket_id: str) -> dict[str, Any] | None:
        path = self._bucket_file(bucket_id)
        with self._lock:
            return json.loads(path.read_text()) if path.exists() else None

    def _bucket_ids(self, namespace: str) -> list[str]:
        folder = self.data_dir / "buckets" / namespace
        return sorted(f"{namespace}/{p.parent.name}" for p in folder.glob("*/bucket.json"))

    def _bucket_bytes(self, owner: str) -> int:
        """Storage of the buckets a namespace quota counts besides repos (none for a "ns/name" quota)."""
        return 0 if "/" in owner else sum(self.bucket_size(b) for b in self._bucket_ids(owner))

    def _create_bucket(self, bucket_id: str, private: bool) -> bool:
        """Create an empty bucket; False if it exists already."""
        with self._lock:
            path = self._bucket_file(bucket_id)
            if path.exists():
                return False
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, {"private": private, "createdAt": now(), "store": None, "files": {}})
            return True

    def _delete_bucket(self, bucket_id: str) -> None:
        with self._lock:
            bucket = self._bucket(bucket_id)
            if bucket is None:
                return
            self._bucket_file(bucket_id).unlink()  # the commit point; the rest is cleanup
            shutil.rmtree(self._bucket_file(bucket_id).parent, ignore_errors=True)
            if bucket["store"]:
                self._drop_pack(bucket["store"])  # type: ignore[attr-defined]
            self._forget_files(bucket["files"].values())

    # ------------------------------------------------------------------ listings

    @staticmethod
    def _file_item(path: str, entry: dict[str, Any]) -> dict[str, Any]:
        return {"type": "file", "path": path, **entry}

    def _bucket_tree(self, bucket: dict[str, Any], prefix: str, recursive: bool) -> list[dict[str, Any]]:
        """Files whose path starts with `prefix` (lexically, as on the Hub), and their folders below the
        prefix's own folder; without `recursive`, only the first level below that folder."""
        base = prefix.rsplit("/", 1)[0] + "/" if "/" in prefix else ""
        items: list[dict[str, Any]] = []
        folders: dict[str, str] = {}  # folder -> newest uploadedAt of its files
        for path, entry in sorted(bucket["files"].items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(base) :].split("/")
            depth = len(parts) - 1 if recursive else min(len(parts) - 1, 1)
            for i in range(1, depth + 1):
                folder = base + "/".join(parts[:i])
                folders[folder] = max(folders.get(folder, ""), entry["uploadedAt"])
            if recursive or len(parts) == 1:
                items.append(self._file_item(path, entry))
        items += [{"type": "directory", "path": f, "uploadedAt": at} for f, at in folders.items()]
        return sorted(items, key=lambda item: item["path"])

    # ------------------------------------------------------------------ batch

    def _apply_batch(
        self, bucket_id: str, ops: list[dict[str, Any]], can_read: Callable[[str, str], bool]
    ) -> list[dict[str, str]]:
        """Apply addFile / copyFile / deleteFile lines in order; returns the failed ones ({path, error}),
        which change nothing. All the rest lands at once, or nothing does (403 on quota)."""
        with self._lock:
            bucket = self._bucket(bucket_id)
            if bucket is None:
                raise HubError(404, "Bucket not found", "RepoNotFound")
            store = self._pack_files(bucket["store"])
            files: dict[str, dict[str, Any]] = dict(bucket["files"])
            needed: dict[str, tuple[int, list[Source]]] = {}  # xet hash -> size, where its content is
            failed: list[dict[str, str]] = []
            uploaded_at = now()
            for op in ops:
                kind, path = op.get("type"), str(op.get("path", ""))
                try:
                    check_path(path)
                    if kind not in ("addFile", "copyFile", "deleteFile"):
                        raise HubError(400, f"Unknown operation type: {kind}")
                    if (fault := self._take(self._bucket_op_faults, str(kind), path)) is not None:  # type: ignore[attr-defined]
                        raise HubError(fault.status, fault.message or "Injected failure")
                    if kind == "deleteFile":
                        files.pop(path, None)  # deleting a missing path is a no-op, as in object stores
                        continue
                    xet_hash = str(op.get("xetHash") or "")
                    size = self._locate(xet_hash, op, store, needed, can_read)
                    files[path] = {"xetHash": xet_hash, "size": size, "mtime": _iso_ms(op.get("mtime")),
                                   "uploadedAt": uploaded_at}
                except HubError as err:
                    failed.append({"path": path, "error": err.message})
            self._check_bucket_quota(bucket_id, bucket["files"], files)
            old_store = bucket["store"]
            if needed:
                bucket["store"] = self._restock(old_store, needed)
            dropped = [e for p, e in bucket["files"].items() if files.get(p) != e]
            bucket["files"] = files
            write_json(self._bucket_file(bucket_id), bucket)  # the commit point
            if old_store and old_store != bucket["store"]:
                self._drop_pack(old_store)  # type: ignore[attr-defined]
            self._forget_files(dropped)
            return failed

    def _locate(
        self,
        xet_hash: str,
        op: dict[str, Any],
        store: dict[str, int],
        needed: dict[str, tuple[int, list[Source]]],
        can_read: Callable[[str, str], bool],
    ) -> int:
        """The size of the file `op` names, noting in `needed` where to find it if the store lacks it."""
        if not SHA256_RE.match(xet_hash):
            raise HubError(400, f"Invalid xetHash: {xet_hash!r}")
        if xet_hash == EMPTY_XET_HASH:
            return 0
        if op["type"] == "addFile":
            if xet_hash in store:
                return store[xet_hash]
            if xet_hash in needed:
                return needed[xet_hash][0]
            holding = self._uploads_holding(xet_hash)
            if not holding:
                raise HubError(404, f"Xet file {xet_hash} was not uploaded")
            size, sources = holding[0][1], [("upload", folder) for folder, _ in holding]
        else:
            repo_type, repo_id = str(op.get("sourceRepoType", "")), str(op.get("sourceRepoId", ""))
            if not can_read(repo_type, repo_id):
                raise HubError(404, f"Source {repo_type} {repo_id} not found")
            found = self._source_pack(repo_type, repo_id, xet_hash)
            if found is None:
                raise HubError(404, f"Xet file {xet_hash} not found in {repo_type} {repo_id}")
            size, pack = found
            if xet_hash in store:
                return size
            sources = [("pack", pack)]
        needed.setdefault(xet_hash, (size, []))[1].extend(sources)
        return size

    def _uploads_holding(self, xet_hash: str) -> list[tuple[Path, int]]:
        """Upload folders whose shards describe the Xet file `xet_hash`, newest first, with its size."""
        folders = sorted((self.data_dir / "xet" / "uploads").iterdir(), key=lambda f: f.stat().st_mtime)
        found = []
        for folder in reversed(folders):
            for file_hash, _, size in self._xet_files(folder):  # type: ignore[attr-defined]
                if file_hash == xet_hash:
                    found.append((folder, size))
                    break
        return found

    def _source_pack(self, repo_type: str, repo_id: str, xet_hash: str) -> tuple[int, Path] | None:
        """(size, pack folder) of the file with this Xet hash in a bucket, or in a repo's main branch."""
        packs = self.data_dir / "xet" / "packs"
        if repo_type == "bucket":
            bucket = self._bucket(repo_id)
            sizes = {e["xetHash"]: e["size"] for e in bucket["files"].values()} if bucket else {}
            return (sizes[xet_hash], packs / bucket["store"]) if bucket and xet_hash in sizes else None
        meta = self._meta((repo_type, repo_id))  # type: ignore[attr-defined]
        head = self._load_commit((repo_type, repo_id), meta["refs"]["main"]) if meta else None  # type: ignore[attr-defined]
        for entry in head["files"].values() if head else ():
            if entry.get("xet", {}).get("hash") == xet_hash:
                return entry["size"], packs / entry["xet"]["pack"]
        return None

    def _pack_files(self, pack: str | None) -> dict[str, int]:
        """Xet hash -> size of every file a pack holds."""
        if pack is None:
            return {}
        return {h: size for h, _, size in self._xet_files(self.data_dir / "xet" / "packs" / pack)}  # type: ignore[attr-defined]

    @staticmethod
    def _shard_names(folder: Path) -> set[str]:
        return {p.name for p in (folder / _XET_INDEX / "shards").glob("*.mdb")}

    def _restock(self, store: str | None, needed: dict[str, tuple[int, list[Source]]]) -> str:
        """A new pack holding the store and every needed file: an upload folder that has them all frozen
        as it is (the usual case), else a copy of the store that the server uploads the missing files into."""
        have = self._shard_names(self.data_dir / "xet" / "packs" / store) if store else set()
        uploads = [{f for kind, f in sources if kind == "upload"} for _, sources in needed.values()]
        for folder in set.intersection(*uploads):
            if have <= self._shard_names(folder):
                return self._pack(folder)  # type: ignore[attr-defined]
        blobs = [self._bucket_blob(h, size, sources) for h, (size, sources) in needed.items()]
        folder = self.xet_folder("uploads", store)  # type: ignore[attr-defined]
        try:
            hashes = self._xet_upload(folder, blobs)  # type: ignore[attr-defined]
            if hashes != list(needed):
                raise HubError(500, "localhub: a file rebuilt from Xet came back with another hash")
            return self._pack(folder)  # type: ignore[attr-defined]
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _bucket_blob(self, xet_hash: str, size: int, sources: list[Source]) -> Path:
        """The plain bytes of a Xet file (for HTTP downloads and restocking), rebuilt once with hf_xet."""
        blob = self.data_dir / "xet" / "files" / xet_hash
        if not blob.exists():
            tmp = blob.with_name(blob.name + ".tmp")
            try:
                self._xet_download(sources[0][1], xet_hash, size, tmp)  # type: ignore[attr-defined]
                if tmp.stat().st_size != size:
                    raise HubError(500, f"localhub: Xet file {xet_hash} rebuilt with a wrong size")
                tmp.replace(blob)
            finally:
                tmp.unlink(missing_ok=True)
        return blob

    def _forget_files(self, entries: Any) -> None:
        """Delete the rebuilt bytes of files no bucket holds any more."""
        live = {
            e["xetHash"]
            for ns in (self.data_dir / "buckets").iterdir()
            for b in self._bucket_ids(ns.name)
            for e in (self._bucket(b) or {"files": {}})["files"].values()
        }
        for entry in entries:
            if entry["xetHash"] not in live:
                (self.data_dir / "xet" / "files" / entry["xetHash"]).unlink(missing_ok=True)

    # ------------------------------------------------------------------ quota

    def _check_bucket_quota(self, bucket_id: str, before: dict[str, Any], after: dict[str, Any]) -> None:
        """403 as on the Hub when a batch that grows the bucket takes it or its namespace past a quota."""
        old, new = (sum(e["size"] for e in files.values()) for files in (before, after))
        if new <= old:
            return
        namespace = bucket_id.split("/")[0]
        for owner, limit in self.quotas.items():
            if owner == bucket_id:
                used = new
            elif owner == namespace:
                # The namespace's repos as counted: what a squash freed lately counts until its credit lands.
                repos = sum(self._owner_lfs(namespace).values())  # type: ignore[attr-defined]
                used = new - old + self._bucket_bytes(namespace) + repos
            else:
                continue
            if used > limit:
                raise HubError(403, QUOTA_MESSAGE)
