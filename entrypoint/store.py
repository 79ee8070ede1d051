"""Where checkpoints live on the Hub: the interface sync, restore and status use, and which ones count.

Two stores (HF_REPO_TYPE): `store_repo.RepoStore` keeps checkpoints in the git repo HF_REPO_ID, one commit
each; `store_bucket.BucketStore` keeps them in the Storage Bucket HF_REPO_ID (`bucket`): mutable, not
versioned, deletes free storage at once. Both keep the generation claim, the tokenizer and the run files in
the git repo, because only a git commit offers a compare-and-swap (`parent_commit`), which fencing needs.

A bucket write cannot be fenced: an old instance paused between its claim check and its upload writes
anyway when it wakes. So bucket paths carry the generation that pushed them (no two launches ever write the
same path), and each claim records the *lineage*: for every older generation, the newest step per stage it
had completed when it was fenced. What a generation pushes after that never counts: restore and the
sidecar ignore it (the sidecar deletes it). A git repo needs none of this (a fenced commit gets 412).
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

from huggingface_hub import CommitOperationAdd

from entrypoint.hub import GENERATION_FILE, Hub, HubConfig, HubSnapshot, generation_of, local_generation
from entrypoint.hubcall import HeadMoved, HubError, kv
from trainer import checkpoint_layout as layout

log = logging.getLogger("phoenix.hub")


@dataclass(frozen=True)
class RemoteFile:
    size: int
    sha256: str | None = None  # known without downloading (a repo's LFS/Xet files); a bucket lists none


@dataclass(frozen=True)
class StoredCheckpoint:
    """A checkpoint whose MANIFEST.json is in the store: the store's definition of complete."""

    stage: str
    step: int
    folder: str  # where its files are in the store
    files: dict[str, RemoteFile]  # by name, MANIFEST.json included
    generation: int = 0  # the launch that pushed it (bucket paths record it; a repo needs no such thing)


@dataclass
class StoreView:
    """The store at one moment: the git repo (claim, run files) and the complete checkpoints that count.

    A pass keeps it current as it pushes and prunes; `head` is the repo commit the next commit builds on.
    """

    snapshot: HubSnapshot
    checkpoints: dict[str, list[StoredCheckpoint]]  # per stage, newest first
    read_claim: Callable[[], dict[str, Any]]
    head: str = ""
    garbage: list[str] = field(default_factory=list)  # bucket: files of partial or fenced checkpoints
    remote: dict[str, Any] = field(default_factory=dict)  # the store's own listing entries, by path

    def __post_init__(self) -> None:
        self.head = self.head or self.snapshot.head

    @cached_property
    def claim(self) -> dict[str, Any]:
        """The repo's generation.json, read once, when first needed (a restore of a repo never needs it)."""
        return self.read_claim()

    def steps(self, stage: str) -> list[int]:
        return [c.step for c in self.checkpoints[stage]]

    def add(self, ckpt: StoredCheckpoint) -> None:
        kept = [c for c in self.checkpoints[ckpt.stage] if c.step != ckpt.step]
        self.checkpoints[ckpt.stage] = sorted([*kept, ckpt], key=lambda c: c.step, reverse=True)

    def remove(self, ckpt: StoredCheckpoint) -> None:
        self.checkpoints[ckpt.stage] = [c for c in self.checkpoints[ckpt.stage] if c is not ckpt]


class CheckpointStore(Protocol):
    """What sync, restore and status need from a store; `hub` is the git repo in both."""

    cfg: HubConfig
    hub: Hub

    def ensure(self) -> None:
        """Create what is missing (private unless HF_PRIVATE=false); existing ones are left as they are."""

    def view(self) -> StoreView: ...

    def tidy(self, view: StoreView) -> None:
        """Before pushing, finish what a killed or failed pass left: free the storage it still holds."""

    def push(self, view: StoreView, stage: str, ckpt: layout.Checkpoint, side_files: list[Any]) -> None:
        """Upload one verified local checkpoint so that it is complete in the store only once it is whole;
        `side_files` (tokenizer, run files) go to the git repo with it."""

    def push_side_files(self, view: StoreView, side_files: list[Any]) -> None: ...

    def prune(self, view: StoreView, doomed: list[StoredCheckpoint]) -> None:
        """Delete these checkpoints, freeing their storage; none of them may look complete half-deleted."""

    def fetch(self, view: StoreView, path: str, partial: Path, size: int) -> None:
        """One attempt at downloading `path` into `partial` (continued from what is there, where the store
        allows); retried by the caller."""

    def used_storage(self) -> int | None:
        """Bytes the store counts against the account's storage (None if not reported)."""


def open_store(cfg: HubConfig, hub: Hub | None = None) -> CheckpointStore:
    """The store HF_REPO_TYPE selects, over `hub` (the git repo) if given."""
    hub = hub or Hub(cfg)
    if cfg.repo_type == "bucket":
        from entrypoint.store_bucket import BucketStore

        return BucketStore(cfg, hub)
    from entrypoint.store_repo import RepoStore

    return RepoStore(cfg, hub)


# ---------------------------------------------------------------------------------------------- lineage


def counts(claim: dict[str, Any], generation: int, stage: str, step: int) -> bool:
    """Whether a complete checkpoint pushed by `generation` counts under `claim`: a generation a newer
    claim fenced counts only up to the step it had completed by then; any other one counts."""
    limits = claim.get("lineage", {}).get(str(generation)) if isinstance(claim.get("lineage"), dict) else None
    if not isinstance(limits, dict):
        return True
    limit = limits.get(stage)
    return isinstance(limit, int) and step <= limit


def lineage_for_claim(old_claim: dict[str, Any], view: StoreView) -> dict[str, dict[str, int]]:
    """The lineage a new claim records: the old claim's, plus each generation this claim fences that has no
    entry yet (the claim it replaces, and any with checkpoints here), frozen at its newest counted step."""
    lineage = dict(old_claim.get("lineage") or {})
    pushed_by = {c.generation for stage in layout.STAGES for c in view.checkpoints[stage]}
    for generation in sorted(pushed_by | {generation_of(old_claim)}):
        if str(generation) not in lineage:
            lineage[str(generation)] = {
                stage: max(c.step for c in view.checkpoints[stage] if c.generation == generation)
                for stage in layout.STAGES
                if any(c.generation == generation for c in view.checkpoints[stage])
            }
    return lineage


def claim_generation(cfg: HubConfig, hub: Hub | None = None, *, attempts: int = 5) -> int:
    """Fence off every older launch: commit generation max(Hub, volume) + 1, then write it to the volume.

    Called by the entrypoint at launch. The commit carries parent_commit, so two launches racing for the
    same number cannot both win: the loser re-reads and takes the next one. With a bucket the claim also
    freezes the lineage (see the module's first lines). Raises HubError if the Hub cannot be reached; the
    volume is then left unchanged.
    """
    store = open_store(cfg, hub)
    store.ensure()
    path = cfg.run_path(GENERATION_FILE)
    for _ in range(attempts):
        view = store.view()
        generation = max(generation_of(view.claim), local_generation(cfg)) + 1
        # When and where, for the one line a fenced instance prints (trainer.fencing).
        claim: dict[str, Any] = {"generation": generation, "host": socket.gethostname(),
                                 "claimed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if cfg.repo_type == "bucket":
            claim["lineage"] = lineage_for_claim(view.claim, view)
        body = json.dumps(claim, indent=1, sort_keys=True).encode() + b"\n"
        try:
            store.hub.commit(
                [CommitOperationAdd(path_in_repo=path, path_or_fileobj=body)],
                f"claim generation {generation} of {cfg.model_tag}",
                parent=view.head,
            )
        except HeadMoved:
            continue
        layout.write_json_atomic(cfg.local(path), {"generation": generation})
        log.info(kv(event="generation_claimed", generation=generation, repo=cfg.repo_id))
        return generation
    raise HubError(f"could not claim a generation on {cfg.repo_id}: the repo kept changing under us")
