"""Where the local Hub keeps file contents: a sha256-addressed blob store and local Xet CAS folders.

hf_xet's built-in local CAS (`casUrl` = `local://<folder>`) locks its folder (a redb index) for as long as
the client process keeps its Xet session, so no folder is ever shared between two processes:

    xet/uploads/<id>/   one per write token: the client uploads there
    xet/packs/<id>/     made at commit from an upload folder (xorbs and shards hard-linked, index copied);
                        a committed Xet file records its pack, which stays until nothing references it
    xet/reads/<id>/     one per read token: a hard-linked copy of one pack for one client to read
    xet/files/<hash>    a bucket file rebuilt from a pack, for plain HTTP downloads (see buckets.py)

The commit names a Xet file by sha256 only, as on the Hub; the pack holding it is found by reading the
upload folders' shards (hf_xet writes the sha256 of each file in its shard's metadata). Plain HTTP downloads
of a Xet file are served from a blob that the server materializes from the pack with hf_xet on first use.
A bucket's write token is a copy of the bucket's pack rather than an empty folder, so that its batch can
freeze the upload folder into the bucket's next pack as it is.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import struct
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from entrypoint.demo.localhub.common import SHA256_RE, HubError

_SHARD_HEADER = 48  # tag (32) + version (8) + footer size (8)
_ENTRY = 48  # every record of a shard's file-info section is 48 bytes
_WITH_VERIFICATION, _WITH_METADATA = 1 << 31, 1 << 30
_BOOKEND = b"\xff" * 32
_XET_INDEX = Path("xet/xorbs")  # what hf_xet's local CAS keeps under the endpoint folder
_READ_FOLDER_TTL_S = 3600  # read tokens live 30 min: a folder older than twice that is nobody's
TOKEN_LIFETIME_S = 1800


def _merkle_hex(raw: bytes) -> str:
    """Xet prints a 32-byte hash as four little-endian u64s, each in hex."""
    return "".join(raw[i : i + 8][::-1].hex() for i in range(0, 32, 8))


def shard_files(data: bytes) -> Iterable[tuple[str, str, int]]:
    """(xet hash, sha256, size) of each file described by one MDB shard (xet-core spec/shard.md); the sha256
    is "" for a file uploaded without one (bucket uploads skip it)."""
    offset = _SHARD_HEADER
    while offset + _ENTRY <= len(data) and data[offset : offset + 32] != _BOOKEND:
        file_hash = _merkle_hex(data[offset : offset + 32])
        flags, count = struct.unpack_from("<II", data, offset + 32)
        size = sum(struct.unpack_from("<I", data, offset + _ENTRY * (1 + i) + 36)[0] for i in range(count))
        offset += _ENTRY * (1 + count)
        if flags & _WITH_VERIFICATION:
            offset += _ENTRY * count
        sha256 = ""
        if flags & _WITH_METADATA:
            sha256 = _merkle_hex(data[offset : offset + 32])
            offset += _ENTRY
        yield file_hash, sha256, size


def _link_copy(src: Path, dest: Path) -> None:
    """Copy hf_xet's local CAS: immutable xorbs and shards hard-linked, the (mutable) index copied."""
    dest.mkdir(parents=True)
    for path in sorted(src.rglob("*")):
        target = dest / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif path.suffix == ".redb":
            shutil.copyfile(path, target)
        else:
            os.link(path, target)


class ContentStore:
    """Mixed into LocalHub: blobs by sha256, and the Xet folders described in the module docstring."""

    data_dir: Path
    _obs_lock: threading.Lock

    def __init__(self) -> None:
        # Shard files are named after their content's hash, and copies of a folder share them: cache by name.
        self._shards: dict[str, list[tuple[str, str, int]]] = {}
        self._xet_session: Any = None
        for sub in ("blobs", "tmp", "xet/uploads", "xet/packs", "xet/reads", "xet/files"):
            (self.data_dir / sub).mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ blobs

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

    # ------------------------------------------------------------------ Xet

    def xet_folder(self, kind: str, pack: str | None = None) -> Path:
        """A fresh CAS folder for one token: empty, or a copy of `pack` (a read, or a bucket's upload)."""
        if pack is None:
            folder = self.data_dir / "xet" / kind / secrets.token_hex(8)
            folder.mkdir()
            return folder
        source = self.data_dir / "xet" / "packs" / pack
        if not source.is_dir():
            raise HubError(404, f"Xet pack {pack} is gone (the history holding it was squashed)")
        return self._copy_folder(source, kind)

    def _copy_folder(self, source: Path, kind: str = "reads") -> Path:
        """A fresh CAS folder under `xet/<kind>/` holding a copy of the CAS folder `source`."""
        self._sweep_reads()
        folder = self.data_dir / "xet" / kind / secrets.token_hex(8)
        _link_copy(source / _XET_INDEX, folder / _XET_INDEX)
        return folder

    def _sweep_reads(self) -> None:
        cutoff = time.time() - 2 * _READ_FOLDER_TTL_S
        for folder in (self.data_dir / "xet" / "reads").iterdir():
            if folder.stat().st_mtime < cutoff:
                shutil.rmtree(folder, ignore_errors=True)

    def _xet_files(self, upload: Path) -> list[tuple[str, str, int]]:
        """(xet hash, sha256, size) of every file uploaded into one upload folder."""
        files = []
        for shard in sorted((upload / _XET_INDEX / "shards").glob("*.mdb")):
            if shard.name not in self._shards:
                self._shards[shard.name] = list(shard_files(shard.read_bytes()))
            files += self._shards[shard.name]
        return files

    def _xet_uploaded(self, sha256: str) -> tuple[str, int, Path] | None:
        """(xet hash, size, upload folder) of a file some client uploaded through Xet, by its sha256."""
        for upload in sorted((self.data_dir / "xet" / "uploads").iterdir()):
            for xet_hash, sha, size in self._xet_files(upload):
                if sha == sha256:
                    return xet_hash, size, upload
        return None

    def _pack(self, upload: Path) -> str:
        """Freeze an upload folder into a new pack (the uploading client may still hold the original)."""
        pack = secrets.token_hex(8)
        _link_copy(upload / _XET_INDEX, self.data_dir / "xet" / "packs" / pack / _XET_INDEX)
        return pack

    @staticmethod
    def drop_xet_objects(folder: Path) -> None:
        """Delete the xorbs of a CAS folder, keeping its index: files listed there can no longer be read."""
        for xorb in (folder / _XET_INDEX / "xorbs").glob("*"):  # an empty bucket's folder has none
            xorb.unlink()

    def _drop_pack(self, pack: str) -> None:
        shutil.rmtree(self.data_dir / "xet" / "packs" / pack, ignore_errors=True)

    def _materialize(self, entry: dict[str, Any]) -> Path:
        """The blob of a committed file; a Xet file is first rebuilt from its pack (hf_xet) and checked."""
        blob = self._blob(entry["sha256"])
        if blob.exists() or "xet" not in entry:
            return blob
        tmp = self.data_dir / "tmp" / secrets.token_hex(8)
        try:
            pack = self.data_dir / "xet" / "packs" / entry["xet"]["pack"]
            if not pack.is_dir():
                raise HubError(404, f"Xet pack {pack.name} is gone (the history holding it was squashed)")
            self._xet_download(pack, entry["xet"]["hash"], entry["size"], tmp)
            with open(tmp, "rb") as f:
                if hashlib.file_digest(f, "sha256").hexdigest() != entry["sha256"]:
                    raise HubError(500, f"Xet file {entry['xet']['hash']} does not match its sha256")
            os.replace(tmp, blob)
            return blob
        finally:
            tmp.unlink(missing_ok=True)

    def _session(self) -> Any:
        import hf_xet  # only a client that uploaded through Xet makes this necessary, and it has hf_xet

        with self._obs_lock:
            if self._xet_session is None:
                self._xet_session = hf_xet.XetSession()
            return self._xet_session

    def _xet_download(self, source: Path, xet_hash: str, size: int, dest: Path) -> None:
        """Rebuild one Xet file from a CAS folder (a pack or an upload) with hf_xet; it reads a copy, since
        the uploading client may still hold `source`."""
        import hf_xet

        folder = self._copy_folder(source)
        try:
            with self._session().new_file_download_group(
                endpoint=f"local://{folder}", token="localhub", token_expiry_unix_secs=int(time.time()) + 600
            ) as group:
                group.start_download_file(hf_xet.XetFileInfo(xet_hash, size), str(dest))
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _xet_upload(self, folder: Path, sources: Iterable[Path]) -> list[str]:
        """Upload local files into a CAS folder with hf_xet; returns their Xet hashes."""
        import hf_xet

        with self._session().new_upload_commit(
            endpoint=f"local://{folder}", token="localhub", token_expiry_unix_secs=int(time.time()) + 600
        ) as commit:
            handles = [commit.start_upload_file(str(src), sha256=hf_xet.SKIP_SHA256) for src in sources]
        return [handle.result().xet_info.hash for handle in handles]
