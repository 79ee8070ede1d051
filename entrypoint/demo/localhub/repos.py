"""Repos and commits of the local Hub: refs, immutable commit trees, listings, squash, storage and quotas.

Storage is counted as on the Hub: every large (LFS or Xet) file that any stored commit of a repo references,
each distinct content once. Deleting a file in a commit frees nothing; `squash` (the Hub's super-squash) and
`purge_lfs` (permanent LFS deletion) drop history and free what nothing else references, on disk at once and
in the counted figure once `credit_delay_s` has passed (terms.py): until then the quota still counts it.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from entrypoint.demo.localhub.common import (
    COMMIT_RE,
    GITATTRIBUTES,
    QUOTA_MESSAGE,
    HubError,
    Op,
    Repo,
    file_entry,
    lfs_info,
    namespace,
    now,
    write_json,
)


class RepoStore:
    """Mixed into LocalHub; repo state changes only under `_lock`, so every commit is all or nothing."""

    data_dir: Path

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._commits: dict[Path, dict[str, Any]] = {}  # commit files never change, so cache them
        self.quotas: dict[str, int] = {}  # "namespace" or "namespace/name" -> bytes of large files allowed

    # ------------------------------------------------------------------ public figures

    def set_quota(self, owner: str, nbytes: int | None) -> None:
        """Cap the storage of a namespace (its repos and buckets together), or of one repo or bucket
        ("ns/name"); None lifts the cap."""
        if nbytes is None:
            self.quotas.pop(owner, None)
        else:
            self.quotas[owner] = nbytes

    def storage_used(self, repo_id: str, repo_type: str = "model") -> int:
        """Bytes the Hub counts for the repo, what `usedStorage` reports and quotas see: the large files its
        history references, and those a squash or purge dropped whose credit is still pending; each once."""
        with self._lock:
            return sum(self._counted_lfs((repo_type, repo_id)).values())

    def storage_settled(self, repo_id: str, repo_type: str = "model") -> int:
        """Bytes of the large files the repo's history references now: `storage_used` once credits land."""
        with self._lock:
            return sum(self._history_lfs((repo_type, repo_id)).values())

    # ------------------------------------------------------------------ state on disk

    def _repo_dir(self, repo: Repo) -> Path:
        return self.data_dir / "repos" / repo[0] / repo[1]

    def _repos(self) -> list[Repo]:
        root = self.data_dir / "repos"
        return [
            (meta.parent.parent.parent.name, f"{meta.parent.parent.name}/{meta.parent.name}")
            for meta in root.glob("*/*/*/repo.json")
        ]

    def _meta(self, repo: Repo) -> dict[str, Any] | None:
        path = self._repo_dir(repo) / "repo.json"
        with self._lock:
            return json.loads(path.read_text()) if path.exists() else None

    def _load_commit(self, repo: Repo, sha: str) -> dict[str, Any] | None:
        path = self._repo_dir(repo) / "commits" / f"{sha}.json"
        with self._lock:
            if path not in self._commits and path.exists():
                self._commits[path] = json.loads(path.read_text())
            return self._commits.get(path)

    def _all_commits(self, repo: Repo) -> list[dict[str, Any]]:
        with self._lock:
            paths = sorted((self._repo_dir(repo) / "commits").glob("*.json"))
            return [c for c in (self._load_commit(repo, p.stem) for p in paths) if c is not None]

    def _rev_commit(self, repo: Repo, meta: dict[str, Any], rev: str) -> dict[str, Any]:
        """The commit a branch name or a full commit sha points to."""
        sha = meta["refs"].get(rev, rev)
        commit = self._load_commit(repo, sha) if COMMIT_RE.match(sha) else None
        if commit is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    def _init_repo(self, repo: Repo, private: bool) -> None:
        (self._repo_dir(repo) / "commits").mkdir(parents=True)
        write_json(self._repo_dir(repo) / "repo.json", {"private": private, "createdAt": now(), "refs": {}})
        sha, size = self._store([GITATTRIBUTES])  # type: ignore[attr-defined]
        entry = file_entry(sha, size, False, GITATTRIBUTES)
        self._apply_commit(repo, [("add", ".gitattributes", entry)], "initial commit", author="system")

    def _write_commit(
        self, repo: Repo, parent: str | None, files: dict[str, Any], title: str, message: str, author: str
    ) -> str:
        date = now()
        seed = json.dumps([parent, files, title, message, date, secrets.token_hex(4)], sort_keys=True)
        sha = hashlib.sha1(seed.encode()).hexdigest()
        commit = {"id": sha, "parents": [parent] if parent else [], "title": title, "message": message}
        commit |= {"authors": [author], "date": date, "files": files}
        write_json(self._repo_dir(repo) / "commits" / f"{sha}.json", commit)
        return sha

    def _apply_commit(
        self,
        repo: Repo,
        ops: list[Op],
        title: str,
        *,
        author: str,
        message: str = "",
        parent_commit: str | None = None,
        branch: str = "main",
    ) -> str:
        """Apply `ops` on top of `branch` and move it to the new commit, all or nothing. Returns the sha."""
        with self._lock:
            meta = self._meta(repo)
            if meta is None:
                raise HubError(404, "Repository not found", "RepoNotFound")
            head = meta["refs"].get(branch)
            if head is None and meta["refs"]:  # only a new repo has no branch yet
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            if parent_commit is not None and not (head or "").startswith(parent_commit.lower()):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(self._load_commit(repo, head)["files"]) if head else {}
            for kind, path, entry in ops:
                if kind == "add":
                    files[path] = entry
                elif kind == "delete":
                    if files.pop(path, None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                else:
                    doomed = [p for p in files if p.startswith(path + "/")]
                    if not doomed:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in doomed:
                        del files[p]
            for path in files:  # a path can't be both a file and a folder
                parts = path.split("/")
                if any("/".join(parts[:i]) in files for i in range(1, len(parts))):
                    raise HubError(400, f"Path conflicts with an existing file: {path}")
            self._check_quota(repo, [e for _, _, e in ops if e is not None and e["lfs"]])
            sha = self._write_commit(repo, head, files, title, message, author)
            meta["refs"][branch] = sha
            write_json(self._repo_dir(repo) / "repo.json", meta)  # the commit point
            return sha

    # ------------------------------------------------------------------ storage accounting

    @staticmethod
    def _lfs_of(commits: Iterable[dict[str, Any]]) -> dict[str, int]:
        return {e["sha256"]: e["size"] for c in commits for e in c["files"].values() if e["lfs"]}

    def _history_lfs(self, repo: Repo) -> dict[str, int]:
        """sha256 -> size of every large file some stored commit of `repo` references."""
        return self._lfs_of(self._all_commits(repo))

    def _counted_lfs(self, repo: Repo) -> dict[str, int]:
        """What the quota counts for `repo`: its history's large files and the credits still pending."""
        return self._history_lfs(repo) | self._pending_credits(repo)  # type: ignore[attr-defined]

    def _owner_lfs(self, owner: str, settled: bool = False) -> dict[str, int]:
        """The large files of the repos a quota owner ("ns", or "ns/name") holds, each content once."""
        files: dict[str, int] = {}
        for repo in self._owner_repos(owner):
            files |= self._history_lfs(repo) if settled else self._counted_lfs(repo)
        return files

    def _owner_repos(self, owner: str) -> list[Repo]:
        return [r for r in self._repos() if r[1] == owner or namespace(r) == owner]

    def _entry_by_sha(self, sha256: str) -> dict[str, Any] | None:
        """A committed large file with this content, in any repo (its Xet pack, if any, is shared)."""
        with self._lock:
            for repo in self._repos():
                for commit in self._all_commits(repo):
                    for entry in commit["files"].values():
                        if entry["lfs"] and entry["sha256"] == sha256:
                            return entry
        return None

    def _check_quota(self, repo: Repo, added: list[dict[str, Any]]) -> None:
        """403 as on the Hub when the new large files would take the repo or its namespace past a quota."""
        for owner, limit in self.quotas.items():
            if repo not in self._owner_repos(owner):
                continue
            stored = self._owner_lfs(owner)
            after = stored | {e["sha256"]: e["size"] for e in added}
            buckets = self._bucket_bytes(owner)  # type: ignore[attr-defined]
            if sum(after.values()) + buckets > limit and len(after) > len(stored):
                raise HubError(403, QUOTA_MESSAGE)

    def squash(self, repo: Repo, branch: str, title: str, author: str) -> str:
        """The Hub's super-squash: one parentless commit holding the branch's tree, the rest of the history
        dropped, and the large files nothing references any more deleted. Returns the new head."""
        with self._lock:
            meta = self._meta(repo)
            if meta is None or branch not in meta["refs"]:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            before = self._all_commits(repo)
            held = self._lfs_of(before)
            head = self._load_commit(repo, meta["refs"][branch])
            assert head is not None
            sha = self._write_commit(repo, None, dict(head["files"]), title, "", author)
            meta["refs"][branch] = sha
            write_json(self._repo_dir(repo) / "repo.json", meta)
            kept = {meta["refs"][b] for b in meta["refs"]}
            for commit in before:
                if commit["id"] not in kept and not self._reachable(repo, commit["id"], kept):
                    path = self._repo_dir(repo) / "commits" / f"{commit['id']}.json"
                    path.unlink(missing_ok=True)
                    self._commits.pop(path, None)
            self._collect([e for c in before for e in c["files"].values()])
            self._credit_dropped(repo, held)
            return sha

    def _reachable(self, repo: Repo, sha: str, heads: set[str]) -> bool:
        for head in heads:
            commit = self._load_commit(repo, head)
            while commit is not None:
                if commit["id"] == sha:
                    return True
                commit = self._load_commit(repo, commit["parents"][0]) if commit["parents"] else None
        return False

    def lfs_files(self, repo: Repo) -> list[dict[str, Any]]:
        """What `HfApi.list_lfs_files` reads: each large file of the history, with a path that held it."""
        seen: dict[str, dict[str, Any]] = {}
        for commit in self._all_commits(repo):
            for path, e in commit["files"].items():
                if e["lfs"] and e["sha256"] not in seen:
                    seen[e["sha256"]] = {"fileOid": e["sha256"], "oid": e["sha256"], "filename": path,
                                         "size": e["size"], "pushedAt": commit["date"], "ref": None}
        return list(seen.values())

    def purge_lfs(self, repo: Repo, shas: set[str]) -> None:
        """Permanent LFS deletion (history rewritten): every commit forgets the files with these contents."""
        with self._lock:
            held = self._history_lfs(repo)
            dropped: list[dict[str, Any]] = []
            for commit in self._all_commits(repo):
                gone = {p: e for p, e in commit["files"].items() if e["lfs"] and e["sha256"] in shas}
                if gone:
                    dropped += gone.values()
                    commit["files"] = {p: e for p, e in commit["files"].items() if p not in gone}
                    write_json(self._repo_dir(repo) / "commits" / f"{commit['id']}.json", commit)
            self._collect(dropped)
            self._credit_dropped(repo, held)

    def _credit_dropped(self, repo: Repo, held: dict[str, int]) -> None:
        """What the history held before and holds no more is credited back later (terms.py)."""
        kept = self._history_lfs(repo)
        self._credit_later(repo, {sha: size for sha, size in held.items() if sha not in kept})  # type: ignore[attr-defined]

    def _collect(self, candidates: list[dict[str, Any]]) -> None:
        """Delete the stored content of `candidates` that no commit of any repo references any more."""
        live_shas: set[str] = set()
        live_packs: set[str] = set()
        for repo in self._repos():
            for commit in self._all_commits(repo):
                for e in commit["files"].values():
                    live_shas.add(e["sha256"])
                    if "xet" in e:
                        live_packs.add(e["xet"]["pack"])
        for entry in candidates:
            if entry["sha256"] not in live_shas:
                self._blob(entry["sha256"]).unlink(missing_ok=True)  # type: ignore[attr-defined]
            if "xet" in entry and entry["xet"]["pack"] not in live_packs:
                self._drop_pack(entry["xet"]["pack"])  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ trees

    @staticmethod
    def _dir_oid(files: Mapping[str, dict[str, Any]], folder: str) -> str:
        lines = sorted(f"{p}:{e['oid']}" for p, e in files.items() if p.startswith(folder + "/"))
        return hashlib.sha1("\n".join(lines).encode()).hexdigest()

    def _last_commit(self, repo: Repo, head: dict[str, Any], path: str, is_dir: bool) -> dict[str, str]:
        """The oldest commit of the run, going back from `head`, in which `path` kept its content."""

        def content(commit: dict[str, Any]) -> str | None:
            files = commit["files"]
            return self._dir_oid(files, path) if is_dir else files.get(path, {}).get("oid")

        current = head
        while current["parents"]:
            parent = self._load_commit(repo, current["parents"][0])
            if parent is None or content(parent) != content(current):
                break
            current = parent
        return {"id": current["id"], "title": current["title"], "date": current["date"]}

    def _tree(
        self, repo: Repo, commit: dict[str, Any], base: str, recursive: bool, expand: bool
    ) -> list[dict]:
        files: dict[str, dict[str, Any]] = commit["files"]
        prefix = base + "/" if base else ""
        if base and not any(p.startswith(prefix) for p in files):
            raise HubError(404, f"Folder not found: {base}", "EntryNotFound")
        out: list[dict[str, Any]] = []
        folders: set[str] = set()
        for path, entry in files.items():
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            depth = len(parts) if recursive else 1
            folders.update(prefix + "/".join(parts[:i]) for i in range(1, min(depth + 1, len(parts))))
            if recursive or len(parts) == 1:
                out.append({"type": "file", "path": path, "size": entry["size"], "oid": entry["oid"]})
                if entry["lfs"]:
                    lfs = lfs_info(entry)
                    out[-1]["lfs"] = {"oid": lfs.pop("sha256"), **lfs}  # the tree calls the sha256 `oid`
        out += [{"type": "directory", "path": d, "size": 0, "oid": self._dir_oid(files, d)} for d in folders]
        if expand:
            for item in out:
                item["lastCommit"] = self._last_commit(
                    repo, commit, item["path"], item["type"] == "directory"
                )
        return sorted(out, key=lambda item: item["path"])
