"""The real Hub's terms, each off by default so tests choose: storage credited late after a squash or an LFS
purge, an hourly commit quota, the storage-patterns lock, Xet token and object faults, one id shared by a
bucket and a repo, and gated repos. The routes ask here; the figures are in repos.py and buckets.py."""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from entrypoint.demo.localhub.common import HubError, Repo, write_json

# The Hub's words (datasets#6257, huggingface_hub#3366 and #3325); clients and people search for them.
COMMIT_QUOTA_MESSAGE = "You have exceeded our hourly quotas for action: commit. We invite you to retry later."
STORAGE_PATTERNS_MESSAGE = (
    "Your storage patterns tripped our internal systems! Please contact us at website@huggingface.co so we "
    "can verify your account and unlock more storage for your use-case."
)
XET_FAULTS = (("auth", "upload"), ("auth", "download"), ("not_found", "download"))


class Storage(NamedTuple):
    counted: int  # what the quota sees and `usedStorage` reports: pending credits still count
    settled: int  # what it will be once every pending credit has landed


@dataclass(frozen=True)
class CommitQuota:
    commits: int  # commit-like actions allowed per user and window
    window_s: float  # the window (3600 on the Hub; scaled down in tests)
    buckets: bool  # whether a bucket batch counts as a commit (not on the Hub, as far as is known)


@dataclass
class XetFault:
    error: str  # "auth" | "not_found"
    transfer: str  # "upload" | "download"
    remaining: int


@dataclass(frozen=True)
class XetTrap:
    """A Xet token handed out already expired, for a CAS that hf_xet must reach over HTTP, so that hf_xet
    refreshes it before any transfer, and the refresh is refused. A refresh looks like any token request (and
    hf_xet pools its connections), so every token request of the transfer's kind for that repo or bucket is
    refused until the client sends it anything else, as a next attempt does (preupload, resolve, listing)."""

    transfer: str
    scope: str  # the repo or bucket id

    def ends_with(self, path: str) -> bool:
        return "/xet-" not in path and f"/{self.scope}/" in f"{path}/"


class HubTerms:
    """Mixed into LocalHub; counters and faults are guarded by `_obs_lock`, pending credits by `_lock`."""

    data_dir: Path
    _lock: threading.RLock
    _obs_lock: threading.Lock

    def __init__(self) -> None:
        self.credit_delay_s = 0.0  # how long squashed or purged storage keeps counting ("within 36 hours")
        self.commit_quota: CommitQuota | None = None
        self.storage_locked: set[str] = set()  # namespaces whose storage patterns tripped the Hub
        self.refuse_shared_names = False  # 409 for a bucket with a repo's id, and for a repo with a bucket's
        self.gated: set[Repo] = set()  # repos whose files only their owner may download (`gate`)
        self._credits_file = self.data_dir / "credits.json"
        self._credits: list[dict[str, Any]] = (
            json.loads(self._credits_file.read_text()) if self._credits_file.exists() else []
        )
        self._commit_windows: dict[str, tuple[float, int]] = {}  # user -> (window start, actions counted)
        self._xet_faults: list[XetFault] = []
        self._xet_traps: list[XetTrap] = []

    # ------------------------------------------------------------------ switches

    def settle_storage(self) -> None:
        """Let every pending credit land now, as if `credit_delay_s` had passed."""
        with self._lock:
            self._credits = []
            write_json(self._credits_file, self._credits)

    def set_commit_quota(self, commits: int | None, window_s: float = 3600, buckets: bool = False) -> None:
        """After `commits` commit-like actions of one user within a fixed window of `window_s` seconds, the
        next answer 429 until the window ends; None lifts the quota. Commits (deletions too), super-squashes
        and LFS purges count, bucket batches only with `buckets`."""
        with self._obs_lock:
            self.commit_quota = None if commits is None else CommitQuota(commits, window_s, buckets)
            self._commit_windows.clear()

    def trip_storage_patterns(self, namespace: str) -> None:
        """From now on the namespace's commits and bucket batches that add files answer the Hub's 403, until
        `unlock_storage` (on the Hub, a person unlocks the account)."""
        self.storage_locked.add(namespace)

    def unlock_storage(self, namespace: str) -> None:
        self.storage_locked.discard(namespace)

    def gate(self, repo_id: str, repo_type: str = "model") -> None:
        """Gate a repo as the Hub does for one whose conditions a user must accept: anyone may see it and
        list its files, but only its owner (no one has accepted) may download them: 403 `GatedRepo`."""
        self.gated.add((repo_type, repo_id))

    def fail_xet_next(self, error: str = "auth", transfer: str = "upload", n: int = 1) -> None:
        """Make the next `n` Xet uploads or downloads (repos and buckets) fail inside hf_xet:

        - "auth": the transfer's Xet token is handed out expired, for a CAS reached over HTTP, and hf_xet's
          refreshes of it are refused with 401 (a token revoked mid-transfer) until the client sends that repo
          or bucket another request (huggingface_hub's next upload or download starts with one; a bare
          `batch_bucket_files` does not);
        - "not_found" (downloads only): the read token's CAS folder lacks the objects (xorbs) the file is made
          of, as if they had been collected. hf_xet's upload path reads no object back, so no upload can
          meet a missing one.
        """
        if (error, transfer) not in XET_FAULTS:
            raise ValueError(f"no Xet fault {error!r} on {transfer!r}")
        with self._obs_lock:
            self._xet_faults.append(XetFault(error, transfer, n))

    # ------------------------------------------------------------------ storage credited late

    def _credit_later(self, repo: Repo, dropped: dict[str, int]) -> None:
        """Content a squash or purge just dropped from `repo`'s history counts for `credit_delay_s` more."""
        if self.credit_delay_s <= 0 or not dropped:
            return
        now = time.time()
        due = now + self.credit_delay_s
        with self._lock:
            self._credits = [c for c in self._credits if c["due"] > now]
            self._credits += [{"type": repo[0], "id": repo[1], "sha256": sha, "size": size, "due": due}
                              for sha, size in dropped.items()]
            write_json(self._credits_file, self._credits)

    def _pending_credits(self, repo: Repo) -> dict[str, int]:
        """sha256 -> size of the content dropped from `repo` whose credit has not landed yet."""
        now = time.time()
        with self._lock:
            return {c["sha256"]: c["size"] for c in self._credits
                    if (c["type"], c["id"]) == repo and c["due"] > now}

    # ------------------------------------------------------------------ checks the routes make

    def _count_commit(self, user: str, bucket: bool = False) -> None:
        """Count one commit-like action of `user`; 429 as on the Hub when the window's quota is spent."""
        with self._obs_lock:
            quota = self.commit_quota
            if quota is None or (bucket and not quota.buckets):
                return
            now = time.monotonic()
            start, used = self._commit_windows.get(user, (now, 0))
            if now >= start + quota.window_s:
                start, used = now, 0
            if used >= quota.commits:
                wait = max(1, math.ceil(start + quota.window_s - now))
                policy = f'"fixed window";"api";q={quota.commits};w={math.ceil(quota.window_s)}'
                headers = {"Retry-After": str(wait), "RateLimit": f'"api";r=0;t={wait}',
                           "RateLimit-Policy": policy}
                raise HubError(429, COMMIT_QUOTA_MESSAGE, headers=headers)
            self._commit_windows[user] = (start, used + 1)

    def _check_gate(self, repo: Repo, user: str | None) -> None:
        if repo in self.gated and user != repo[1].split("/")[0]:
            kind = "dataset" if repo[0] == "dataset" else "model"
            raise HubError(403 if user else 401, f"Access to {kind} {repo[1]} is restricted and you are not "
                           "in the authorized list. Visit https://huggingface.co/" + repo[1] + " to ask for "
                           "access.", "GatedRepo")

    def _check_storage_lock(self, namespace: str) -> None:
        if namespace in self.storage_locked:
            raise HubError(403, STORAGE_PATTERNS_MESSAGE)

    def _xet_verdict(self, transfer: str, scope: str) -> str | None:
        """How to answer a Xet token request for the repo or bucket `scope`: None (as usual), "refuse" (the
        refresh of a trapped token), or the fault to play ("auth", "not_found")."""
        with self._obs_lock:
            if XetTrap(transfer, scope) in self._xet_traps:
                return "refuse"
            fault = next((f for f in self._xet_faults if f.transfer == transfer), None)
            if fault is None:
                return None
            fault.remaining -= 1
            if fault.remaining <= 0:
                self._xet_faults.remove(fault)
            if fault.error == "auth":
                self._xet_traps.append(XetTrap(transfer, scope))
            return fault.error

    def _end_xet_traps(self, path: str) -> None:
        """A request other than a Xet token for a trapped repo or bucket: its trapped transfer is over."""
        with self._obs_lock:
            self._xet_traps = [t for t in self._xet_traps if not t.ends_with(path)]
