"""Local Hub endpoints that move file contents: LFS batch and PUT, Xet tokens, and `resolve` downloads."""

from __future__ import annotations

import secrets
from typing import Any

from entrypoint.demo.localhub.common import SHA256_RE, HubError, Repo
from entrypoint.demo.localhub.request import HubRequest


class FileRoutes(HubRequest):
    def _lfs_batch(self, repo: Repo) -> None:
        self._writable(repo)
        payload = self._json_body()
        if payload.get("operation") != "upload":
            raise HubError(400, "Only the upload operation is supported")
        hub = self.hub
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
        hub = self.hub
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

    # ------------------------------------------------------------------ Xet

    def _xet_write_token(self, repo: Repo, rev: str) -> None:
        self._writable(repo)
        self._xet_token("upload", repo[1], lambda: self.hub.xet_folder("uploads"))

    def _xet_read_token(self, repo: Repo, rev: str) -> None:
        """The `xet-auth` link of a resolve answer names the pack; a token for a whole revision is only
        possible when its Xet files share one pack (the tree gives no xetHash: clients ask per file)."""
        commit = self.hub._rev_commit(repo, self._readable(repo), rev)
        self.hub._check_gate(repo, self._user())
        packs = {e["xet"]["pack"] for e in commit["files"].values() if "xet" in e}
        wanted = self._query.get("pack", [""])[0] or (next(iter(packs)) if len(packs) == 1 else "")
        if wanted not in packs:
            raise HubError(404, f"No Xet file of revision {rev} is stored in pack {wanted!r}")
        self._xet_token("download", repo[1], lambda: self.hub.xet_folder("reads", wanted))

    # ------------------------------------------------------------------ downloads

    def _download(self, repo: Repo, rev: str, path: str) -> None:
        hub = self.hub
        commit = hub._rev_commit(repo, self._readable(repo), rev)
        hub._check_gate(repo, self._user())
        entry = commit["files"].get(path)
        if entry is None:  # the client caches the miss under X-Repo-Commit
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit["id"]})
        size = entry["size"]
        headers = {"X-Repo-Commit": commit["id"], "Accept-Ranges": "bytes", "ETag": f'"{entry["oid"]}"'}
        if entry["lfs"]:  # the client names its cached blob after the linked (sha256) etag, as on the Hub
            headers |= {"X-Linked-Etag": f'"{entry["sha256"]}"', "X-Linked-Size": str(size)}
        if "xet" in entry:  # a Xet client reads the content from the CAS instead of this body
            read_token = f"{self._base}/api/{repo[0]}s/{repo[1]}/xet-read-token/{commit['id']}"
            headers |= {"X-Xet-Hash": entry["xet"]["hash"],
                        "Link": f'<{read_token}?pack={entry["xet"]["pack"]}>; rel="xet-auth"'}
        start, end, status = self._byte_range(size, headers)
        if self.command == "HEAD":
            self._start_response(status, end - start + 1, headers, "application/octet-stream")
            return
        try:  # opened before the status line: a blob squashed away meanwhile is still a clean 404
            f = open(hub._materialize(entry), "rb")  # noqa: SIM115 (closed by _send_bytes)
        except FileNotFoundError:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound") from None
        self._send_bytes(f, start, end, status, headers)
