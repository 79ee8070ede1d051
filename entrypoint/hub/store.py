"""Where checkpoints live on the Hub: the interface sync, restore and status use, and which ones count.

Two stores (HF_CHECKPOINT_STORE, opened by `stores.open_store`): `bucket_store.BucketStore` (the default)
keeps them in a Storage Bucket: mutable, not versioned, deletes free storage at once; `repo_store.RepoStore`
keeps checkpoints in the git repo HF_REPO_ID, one commit each, freed by a squash the Hub credits hours later.
Both keep the generation claim, the tokenizer and the run files in the git repo, because only a git commit
offers a compare-and-swap (`parent_commit`), which fencing needs.

A bucket write cannot be fenced: an old instance paused between its claim check and its upload writes
anyway when it wakes. So bucket paths carry the generation that pushed them (no two launches ever write the
same path), and each claim records the *lineage*: for every older generation, the newest step per stage it
had completed when it was fenced. What a generation pushes after that never counts: restore and the
sidecar ignore it (the sidecar deletes it). A git repo needs none of this (a fenced commit gets 412).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

from entrypoint.hub.client import Hub, HubSnapshot, generation_of
from entrypoint.hub.config import HubConfig
from entrypoint.logs import kv
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
    in_bucket: bool = False  # in a bucket (a delete frees it at once), else in the git repo's history


def counted_size(sizes: dict[str, int], in_bucket: bool) -> int:
    """What the Hub counts for a checkpoint's files: every one in a bucket; in a repo the large ones, which
    go through LFS/Xet (safetensors), not the JSON ones, which travel inside the commit."""
    return sum(size for name, size in sizes.items() if in_bucket or name.endswith(".safetensors"))


def counted_bytes(ckpt: StoredCheckpoint) -> int:
    return counted_size({name: f.size for name, f in ckpt.files.items()}, ckpt.in_bucket)


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

    def push(self, view: StoreView, stage: str, ckpt: layout.Checkpoint, side_files: list[Any],
             prune: list[StoredCheckpoint]) -> int:
        """Upload one verified local checkpoint so that it is complete in the store only once it is whole,
        then delete `prune` (made redundant by it), as `prune` does; `side_files` (tokenizer, run files) go to
        the git repo with it. Returns the bytes uploaded."""

    def push_side_files(self, view: StoreView, side_files: list[Any]) -> None: ...

    def prune(self, view: StoreView, doomed: list[StoredCheckpoint]) -> None:
        """Delete these checkpoints, freeing their storage; none of them may look complete half-deleted."""

    def fetch(self, view: StoreView, path: str, partial: Path, size: int) -> None:
        """One attempt at downloading `path` into `partial` (continued from what is there, where the store
        allows); retried by the caller."""

    def storage(self, view: StoreView) -> tuple[int, int | None]:
        """(bytes the store holds now, bytes the Hub says it counts or None): see `budget`."""


# ---------------------------------------------------------------------------------------------- lineage


def commit_side_files(hub: Hub, view: StoreView, side_files: list[Any], model_tag: str) -> None:
    """The tokenizer and run files, in one commit to the git repo, whichever store holds the checkpoints."""
    paths = ", ".join(op.path_in_repo for op in side_files)
    view.head = hub.commit(side_files, f"update {paths} of {model_tag}", parent=view.head)
    log.info(kv(event="pushed_extras", paths=paths, commit=view.head[:12]))


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
    pushed = {stage: [c for c in view.checkpoints[stage] if c.in_bucket] for stage in layout.STAGES}
    for generation in sorted({c.generation for ckpts in pushed.values() for c in ckpts} | {
            generation_of(old_claim)}):
        if str(generation) not in lineage:
            lineage[str(generation)] = {
                stage: max(c.step for c in ckpts if c.generation == generation)
                for stage, ckpts in pushed.items()
                if any(c.generation == generation for c in ckpts)
            }
    return lineage
