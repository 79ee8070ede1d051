"""Local Hub endpoints of Storage Buckets: create, info, list, delete, tree, paths-info, batch, Xet tokens,
and `resolve` (Xet metadata for hf_xet, plain bytes with Range for everyone else)."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode, urlsplit

from entrypoint.demo.localhub.common import NAME_RE, HubError, web_path
from entrypoint.demo.localhub.request import HubRequest


class BucketRoutes(HubRequest):
    def _bucket_route(self, parts: list[str]) -> bool:
        """Route `/api/buckets/<parts>`; False if no bucket route matches."""
        cmd = "GET" if self.command == "HEAD" else self.command
        if len(parts) == 1 and cmd == "GET":
            self._list_buckets(parts[0])
            return True
        if len(parts) < 2:
            return False
        bucket_id, action, rest = f"{parts[0]}/{parts[1]}", (parts[2:] or [""])[0], "/".join(parts[3:])
        if not action:
            route = {"POST": self._create_bucket, "GET": self._bucket_info, "DELETE": self._delete_bucket}
        elif action == "tree" and cmd == "GET":
            self._bucket_tree(bucket_id, rest)
            return True
        else:
            route = {
                "POST": {"paths-info": self._bucket_paths_info, "batch": self._bucket_batch}.get(action),
                "GET": {"xet-write-token": self._bucket_write_token,
                        "xet-read-token": self._bucket_read_token}.get(action),
            }
            if rest:
                return False
        handler = route.get(cmd)
        if handler is None:
            return False
        handler(bucket_id)
        return True

    # ------------------------------------------------------------------ auth

    def _bucket_readable(self, bucket_id: str) -> dict[str, Any]:
        user = self._user()
        bucket = self.hub._bucket(bucket_id)
        if bucket is None or (bucket["private"] and user != bucket_id.split("/")[0]):
            # As for repos: 401 for anonymous callers, 404 for other users; the client makes it a
            # BucketNotFoundError from the RepoNotFound code on an /api/buckets/ URL.
            raise HubError(401 if user is None else 404, "Bucket not found", "RepoNotFound")
        return bucket

    def _bucket_writable(self, bucket_id: str) -> dict[str, Any]:
        bucket = self._bucket_readable(bucket_id)
        user = self._user()
        if user is None:
            raise HubError(401, "You must be authenticated to write to this bucket")
        if user != bucket_id.split("/")[0]:
            raise HubError(403, f"You don't have the rights to write to {bucket_id}")
        return bucket

    def _can_read(self, repo_type: str, repo_id: str) -> bool:
        """Whether the caller may read a copyFile's source (a bucket, model or dataset)."""
        try:
            if repo_type == "bucket":
                self._bucket_readable(repo_id)
            elif repo_type in ("model", "dataset"):
                self._readable((repo_type, repo_id))
            else:
                return False
        except HubError:
            return False
        return True

    # ------------------------------------------------------------------ buckets

    def _bucket_info_json(self, bucket_id: str, bucket: dict[str, Any]) -> dict[str, Any]:
        size = sum(e["size"] for e in bucket["files"].values())
        return {"id": bucket_id, "private": bucket["private"], "createdAt": bucket["createdAt"],
                "size": size, "totalFiles": len(bucket["files"])}

    def _create_bucket(self, bucket_id: str) -> None:
        payload, user = self._json_body(), self._user()
        namespace, name = bucket_id.split("/")
        if user is None:
            raise HubError(401, "You must be authenticated to create a bucket")
        namespace = user if namespace == "me" else namespace
        if not NAME_RE.match(name):
            raise HubError(400, f"Invalid bucket name: {name!r}")
        if user != namespace:
            raise HubError(403, f"You don't have the rights to create a bucket under {namespace}")
        bucket_id = f"{namespace}/{name}"
        url = f"{self._base}/buckets/{bucket_id}"
        hub = self.hub
        with hub._lock:
            repos = [r for r in (("model", bucket_id), ("dataset", bucket_id)) if hub._meta(r) is not None]
            if hub.refuse_shared_names and repos:
                raise self._name_taken(bucket_id, f"{repos[0][0]} repo", web_path(repos[0]))
            if not hub._create_bucket(bucket_id, payload.get("visibility") == "private"):
                raise HubError(409, "You already created this bucket", fields={"url": url})
        self._json(200, {"url": url, "name": bucket_id, "id": bucket_id})

    def _bucket_info(self, bucket_id: str) -> None:
        self._json(200, self._bucket_info_json(bucket_id, self._bucket_readable(bucket_id)))

    def _list_buckets(self, namespace: str) -> None:
        user = self._user()
        if namespace == "me":
            if user is None:
                raise HubError(401, "You must be authenticated to list your buckets")
            namespace = user
        out = []
        for bucket_id in self.hub._bucket_ids(namespace):
            bucket = self.hub._bucket(bucket_id)
            if bucket is not None and (not bucket["private"] or user == namespace):
                out.append(self._bucket_info_json(bucket_id, bucket))
        self._json(200, out)

    def _delete_bucket(self, bucket_id: str) -> None:
        self._bucket_writable(bucket_id)
        self.hub._delete_bucket(bucket_id)
        self._json(200, {})

    # ------------------------------------------------------------------ files

    def _bucket_tree(self, bucket_id: str, prefix: str) -> None:
        bucket = self._bucket_readable(bucket_id)
        recursive = self._query.get("recursive", [""])[0].lower() in ("1", "true")
        items = self.hub._bucket_tree(bucket, prefix, recursive)
        start = int(self._query.get("cursor", ["0"])[0] or 0)
        size = self.hub.bucket_page_size
        headers = {}
        if start + size < len(items):  # one page at a time, linked as the client's `paginate` expects
            query = {k: v[0] for k, v in self._query.items()} | {"cursor": str(start + size)}
            headers["Link"] = f'<{self._base}{urlsplit(self.path).path}?{urlencode(query)}>; rel="next"'
        self._json(200, items[start : start + size], headers)

    def _bucket_paths_info(self, bucket_id: str) -> None:
        files = self._bucket_readable(bucket_id)["files"]
        paths = self._json_body().get("paths", [])
        found = [p for p in paths if isinstance(p, str) and p in files]  # unknown paths are left out
        self._json(200, [self.hub._file_item(p, files[p]) for p in found])

    def _bucket_batch(self, bucket_id: str) -> None:
        self._bucket_writable(bucket_id)
        self.hub._count_commit(str(self._user()), bucket=True)
        try:
            ops = [json.loads(line) for line in b"".join(self._body_chunks()).splitlines() if line.strip()]
        except ValueError as exc:
            raise HubError(400, "The batch payload must be NDJSON") from exc
        if not all(isinstance(op, dict) for op in ops):
            raise HubError(400, "Each NDJSON line must be an operation object")
        if any(op.get("type") in ("addFile", "copyFile") for op in ops):
            self.hub._check_storage_lock(bucket_id.split("/")[0])
        failed = self.hub._apply_batch(bucket_id, ops, self._can_read)
        # As on the Hub: failures listed in a 200 when some operations landed, in a 422 when none did.
        status = 422 if ops and len(failed) == len(ops) else 200
        self._json(status, {"success": not failed, "processed": len(ops) - len(failed), "failed": failed})

    # ------------------------------------------------------------------ Xet

    def _bucket_write_token(self, bucket_id: str) -> None:
        """A copy of the bucket's store to upload into (see buckets.py for why a copy of the store)."""
        store = self._bucket_writable(bucket_id)["store"]
        self._xet_token("upload", bucket_id, lambda: self.hub.xet_folder("uploads", store))

    def _bucket_read_token(self, bucket_id: str) -> None:
        store = self._bucket_readable(bucket_id)["store"]
        self._xet_token("download", bucket_id, lambda: self.hub.xet_folder("reads", store))

    def _bucket_download(self, bucket_id: str, path: str) -> None:
        """`HEAD|GET /buckets/<id>/resolve/<path>`: Xet headers, and the bytes (Range allowed) on GET."""
        hub = self.hub
        bucket = self._bucket_readable(bucket_id)
        entry = bucket["files"].get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        size, xet_hash = entry["size"], entry["xetHash"]
        read_token = f"{self._base}/api/buckets/{bucket_id}/xet-read-token"
        headers = {"Accept-Ranges": "bytes", "ETag": f'"{xet_hash}"', "X-Linked-Size": str(size),
                   "X-Linked-Etag": f'"{xet_hash}"', "X-Xet-Hash": xet_hash,
                   "Link": f'<{read_token}>; rel="xet-auth"'}
        if self.command == "HEAD" or size == 0:
            start, end, status = self._byte_range(size, headers) if size else (0, -1, 200)
            self._start_response(status, end - start + 1, headers, "application/octet-stream")
            return
        start, end, status = self._byte_range(size, headers)
        store = hub.data_dir / "xet" / "packs" / str(bucket["store"])
        f = open(hub._bucket_blob(xet_hash, size, [("pack", store)]), "rb")  # noqa: SIM115 (closed by _send_bytes)
        self._send_bytes(f, start, end, status, headers)
