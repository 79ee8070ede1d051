"""Local Hub endpoints about repos and history: whoami, create, info, tree, commits, commit, squash."""

from __future__ import annotations

import base64
import json
from typing import Any

from entrypoint.demo.localhub.common import (
    NAME_RE,
    URL_PREFIX,
    HubError,
    Op,
    Repo,
    check_path,
    file_entry,
    lfs_info,
    namespace,
    wants_lfs,
    web_path,
)
from entrypoint.demo.localhub.request import HubRequest


class RepoRoutes(HubRequest):
    def _whoami(self) -> None:
        user = self._user()
        if user is None:
            raise HubError(401, "You must be authenticated to call whoami")
        token = {"displayName": "localhub", "role": "write"}
        auth = {"type": "access_token", "accessToken": token}
        self._json(200, {"type": "user", "name": user, "fullname": user, "orgs": [], "auth": auth})

    def _create_repo(self) -> None:
        payload, user = self._json_body(), self._user()
        repo_type, name = payload.get("type") or "model", str(payload.get("name") or "")
        if repo_type not in URL_PREFIX or not NAME_RE.match(name) or name.endswith(".git"):
            raise HubError(400, f"Invalid repo type or name: {repo_type} {name!r}")
        if user is None:
            raise HubError(401, "You must be authenticated to create a repo")
        repo = (repo_type, f"{payload.get('organization') or user}/{name}")
        if user != namespace(repo):
            raise HubError(403, f"You don't have the rights to create a repo under {namespace(repo)}")
        url = f"{self._base}/{web_path(repo)}"
        hub = self.hub
        with hub._lock:
            if hub._meta(repo) is not None:  # create_repo(exist_ok=True) reads `url` from this answer
                raise HubError(409, f"You already created this {repo_type} repo", fields={"url": url})
            if hub.refuse_shared_names and hub._bucket(repo[1]) is not None:
                raise self._name_taken(repo[1], "bucket", f"buckets/{repo[1]}")
            hub._init_repo(repo, bool(payload.get("private")) or payload.get("visibility") == "private")
        self._json(200, {"url": url, "name": repo[1], "id": repo[1]})

    def _repo_info(self, repo: Repo, rev: str) -> None:
        meta = self._readable(repo)
        commit = self.hub._rev_commit(repo, meta, rev)
        siblings = []
        for path, entry in sorted(commit["files"].items()):
            siblings.append({"rfilename": path, "size": entry["size"], "blobId": entry["oid"]})
            if entry["lfs"]:
                siblings[-1]["lfs"] = lfs_info(entry)
        info = {"id": repo[1], "author": namespace(repo), "sha": commit["id"], "private": meta["private"]}
        info |= {"createdAt": meta["createdAt"], "lastModified": commit["date"], "siblings": siblings}
        if "usedStorage" in self._query.get("expand", []):  # as on the Hub: only when asked for
            info["usedStorage"] = self.hub.storage_used(repo[1], repo[0])
        self._json(200, info)

    def _list_tree(self, repo: Repo, rev: str, path: str) -> None:
        hub = self.hub
        commit = hub._rev_commit(repo, self._readable(repo), rev)
        recursive, expand = (
            self._query.get(k, [""])[0] in ("1", "true", "True") for k in ("recursive", "expand")
        )
        # One page holds everything: the client follows a `Link: rel="next"` header only when there is one.
        self._json(200, hub._tree(repo, commit, path.strip("/"), recursive, expand))

    def _list_commits(self, repo: Repo, rev: str) -> None:
        hub = self.hub
        commit: dict[str, Any] | None = hub._rev_commit(repo, self._readable(repo), rev)
        out = []
        while commit is not None:
            authors = [{"user": a} for a in commit["authors"]]
            out.append({k: commit[k] for k in ("id", "title", "message", "date")} | {"authors": authors})
            commit = hub._load_commit(repo, commit["parents"][0]) if commit["parents"] else None
        self._json(200, out)

    def _preupload(self, repo: Repo, rev: str) -> None:
        meta, _ = self._writable(repo)
        files = self.hub._rev_commit(repo, meta, rev)["files"]
        answer = []
        for item in self._json_body().get("files", []):
            sample = base64.b64decode(item.get("sample", ""))
            mode = "lfs" if wants_lfs(int(item.get("size", 0)), sample) else "regular"
            answer.append({"path": item["path"], "uploadMode": mode, "shouldIgnore": False})
            if (existing := files.get(item["path"])) is not None:
                # The client compares it to its local oid (LFS: sha256, else git sha1): unchanged = skipped.
                answer[-1]["oid"] = existing["sha256"] if existing["lfs"] else existing["oid"]
        self._json(200, {"files": answer})

    def _post_commit(self, repo: Repo, branch: str) -> None:
        _, user = self._writable(repo)
        if self._query.get("create_pr"):
            raise HubError(400, "Pull requests are not supported by localhub")
        hub = self.hub
        hub._count_commit(user)
        try:
            lines = [json.loads(line) for line in b"".join(self._body_chunks()).splitlines() if line.strip()]
        except ValueError as exc:
            raise HubError(400, "The commit payload must be NDJSON") from exc
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first NDJSON line must be the commit header")
        ops: list[Op] = []
        packs: dict[str, str] = {}  # upload folder -> the pack it is frozen into for this commit
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            raw = str(value.get("path", ""))
            path = check_path(raw.rstrip("/") if key == "deletedFolder" else raw)  # folders may end with /
            if key == "file":
                content = base64.b64decode(value["content"])
                sha, size = hub._store([content])
                ops.append(("add", path, file_entry(sha, size, False, content)))
            elif key == "lfsFile":
                ops.append(("add", path, self._large_file(path, value, packs)))
            elif key in ("deletedFile", "deletedFolder"):
                ops.append(("delete" if key == "deletedFile" else "delete_folder", path, None))
            else:
                raise HubError(400, f"Unknown commit operation: {key}")
        if any(kind == "add" for kind, _, _ in ops):  # a locked account may still delete and squash
            hub._check_storage_lock(namespace(repo))
        header = lines[0]["value"]
        summary = header.get("summary") or "Update"
        sha = hub._apply_commit(
            repo,
            ops,
            summary,
            author=user,
            message=header.get("description", ""),
            parent_commit=header.get("parentCommit"),
            branch=branch,
        )
        commit_url = f"{self._base}/{web_path(repo)}/commit/{sha}"
        self._json(200, {"success": True, "commitOid": sha, "commitUrl": commit_url, "pullRequestUrl": None})

    def _large_file(self, path: str, value: dict[str, Any], packs: dict[str, str]) -> dict[str, Any]:
        """The entry of an `lfsFile` line, which names the content by sha256 only, as on the Hub: uploaded
        through Xet (found in an upload folder's shards), through LFS (a blob), or already in the repo."""
        hub, oid = self.hub, str(value.get("oid", ""))
        xet, size = None, None
        if (uploaded := hub._xet_uploaded(oid)) is not None:
            xet_hash, size, folder = uploaded
            if hub._entry_by_sha(oid) is None and hub._blob_size(oid) is None:
                hub._count(uploaded=size)  # new content; the Hub's chunk dedup would store nothing more
            if str(folder) not in packs:
                packs[str(folder)] = hub._pack(folder)
            pack = packs[str(folder)]
            xet = {"hash": xet_hash, "pack": pack}
        elif (size := hub._blob_size(oid)) is None and (known := hub._entry_by_sha(oid)) is not None:
            xet, size = known.get("xet"), known["size"]
        if size is None or value.get("size", size) != size:
            raise HubError(400, f"LFS object {oid} of {path} was not uploaded (or has another size)")
        return file_entry(oid, size, True, xet=xet)

    def _super_squash(self, repo: Repo, branch: str) -> None:
        _, user = self._writable(repo)
        self.hub._count_commit(user)  # a history write like a commit (what the Hub counts is not documented)
        title = str(self._json_body().get("message") or f"Super-squash branch '{branch}'")
        self.hub.squash(repo, branch, title, user)
        self._json(200, {"success": True})

    def _list_lfs_files(self, repo: Repo) -> None:
        self._writable(repo)
        self._json(200, self.hub.lfs_files(repo))

    def _delete_lfs_files(self, repo: Repo) -> None:
        _, user = self._writable(repo)
        self.hub._count_commit(user)  # it rewrites the history: counted as a commit, like a squash
        deletions = self._json_body().get("deletions", {})
        if not deletions.get("rewriteHistory", True):
            raise HubError(400, "localhub only deletes LFS files with rewriteHistory=true")
        self.hub.purge_lfs(repo, {str(s) for s in deletions.get("sha", [])})
        self._json(200, {"success": True})
