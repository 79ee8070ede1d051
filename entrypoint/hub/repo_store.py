"""Checkpoints in the git repo HF_REPO_ID (HF_CHECKPOINT_STORE=repo): one commit each, history squashed.

Each checkpoint goes up as ONE commit holding every file plus MANIFEST.json, so the repo never shows a
partial checkpoint as complete, whatever dies when; the checkpoints it makes redundant are deleted in that
same commit. Every commit carries `parent_commit`, so a claim by a newer launch landing mid-pass makes the
next commit fail (412) and the pass re-reads and finds itself fenced. On the Hub a commit that deletes
files frees nothing (the history keeps them), so it is followed by a squash of the history
(`super_squash_history`): two history writes per checkpoint. The Hub credits a squash only hours later
(`budget`), so the ledger records what each one freed.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationDelete

from entrypoint.hub.budget import Ledger
from entrypoint.hub.client import Hub, HubSnapshot, add_operation
from entrypoint.hub.config import HubConfig, local_generation
from entrypoint.hub.errors import Fenced
from entrypoint.hub.store import RemoteFile, StoredCheckpoint, StoreView, commit_side_files, counted_bytes
from entrypoint.logs import kv
from trainer import checkpoint_layout as layout

log = logging.getLogger("phoenix.sync")

PRUNE_TITLE = "prune"  # in the title of every commit that deletes checkpoints: the history holds them


class RepoStore:
    """The checkpoints of HF_REPO_ID's git tree (see the module's first lines)."""

    def __init__(self, cfg: HubConfig, hub: Hub) -> None:
        self.cfg, self.hub = cfg, hub

    def ensure(self) -> None:
        self.hub.ensure_repo()

    def view(self) -> StoreView:
        snapshot = self.hub.snapshot()
        checkpoints = repo_checkpoints(self.cfg, snapshot)
        return StoreView(snapshot, checkpoints, lambda: self.hub.claim_record(snapshot))

    def tidy(self, view: StoreView) -> None:
        """A history that still holds a prune commit is squashed before anything more is pushed: the squash
        that should have followed it was skipped, failed or killed."""
        if any(_prunes(c.title) for c in self.hub.commits()):
            view.head = self._squash(view.head)

    def push(self, view: StoreView, stage: str, ckpt: layout.Checkpoint, side_files: list[Any],
             prune: list[StoredCheckpoint]) -> int:
        folder = self.cfg.checkpoint_path(stage, ckpt.step)
        ops = [
            add_operation(f"{folder}/{name}", ckpt.path / name, entry["sha256"])
            for name, entry in sorted(ckpt.files.items())
            if not view.snapshot.same(f"{folder}/{name}", ckpt.path / name, entry["sha256"])
        ]
        nbytes = sum(ckpt.files[op.path_in_repo.rsplit("/", 1)[1]]["size"] for op in ops)
        ops.append(add_operation(f"{folder}/{layout.MANIFEST_NAME}", ckpt.path / layout.MANIFEST_NAME))
        title = f"step {ckpt.step} of {self.cfg.model_tag} ({stage})"
        title += f"; {PRUNE_TITLE} {_names(prune)}" if prune else ""
        record = stored(ckpt, stage, folder)  # before the commit: the trainer may prune it right after
        log.info(kv(event="push_start", stage=stage, step=ckpt.step, files=len(ops), bytes=nbytes))
        start = time.monotonic()
        view.head = self.hub.commit([*ops, *side_files, *_deletions(prune)], title, parent=view.head)
        log_push_done(stage, ckpt.step, nbytes, time.monotonic() - start, extras=len(side_files),
                      commit=view.head[:12])
        view.add(record)
        if prune:
            self._deleted(view, prune)
            view.head = self._squash(view.head)
        return nbytes

    def push_side_files(self, view: StoreView, side_files: list[Any]) -> None:
        commit_side_files(self.hub, view, side_files, self.cfg.model_tag)

    def prune(self, view: StoreView, doomed: list[StoredCheckpoint]) -> None:
        """Delete them in one commit, then squash the history to free them (credited later)."""
        title = f"{PRUNE_TITLE} {self.cfg.model_tag}: keep last {self.cfg.keep_last} ({_names(doomed)})"
        view.head = self.hub.commit(_deletions(doomed), title, parent=view.head)
        self._deleted(view, doomed)
        view.head = self._squash(view.head)

    def _deleted(self, view: StoreView, doomed: list[StoredCheckpoint]) -> None:
        """They are out of the head: the Hub counts them until it credits the squash that follows."""
        for ckpt in doomed:
            view.remove(ckpt)
            log.info(kv(event="pruned", stage=ckpt.stage, step=ckpt.step, commit=view.head[:12]))
        Ledger(self.cfg).deleted(sum(map(counted_bytes, doomed)), _names(doomed))

    def _squash(self, head: str) -> str:
        """Free what pruning deleted: on the Hub a delete commit frees nothing, the history keeps every file.
        Returns the new head, or `head` if the squash was skipped (the next commit on it then gets a 412).

        The Hub's squash takes no parent commit, so we check right before it that the head is still ours and
        no newer generation claimed the repo; a squash keeps the head's tree as it is, so even a claim
        landing in the remaining instant loses no file, and the generation is read again on the squashed
        head before anything is committed on it.
        """
        own = local_generation(self.cfg)
        if self.hub.head() != head or self.hub.generation_at(head) > own:
            log.info(kv(event="squash_skipped", reason="the repo moved on since we read it"))
            return head
        self.hub.squash(f"squash the history of {self.cfg.model_tag} to free pruned checkpoints")
        Ledger(self.cfg).squashed()
        squashed = self.hub.head()
        log.info(kv(event="squashed", commit=squashed[:12],
                    credited_in_h=round(self.cfg.credit_delay / 3600, 2)))
        if (theirs := self.hub.generation_at(squashed)) > own:
            raise Fenced(f"fenced: generation {own} < {theirs}")
        return squashed

    def fetch(self, view: StoreView, path: str, partial: Path, size: int) -> None:
        # Xet: hf_xet rebuilds the whole file (a killed one restarts, finished files are kept); else Range.
        if self.hub.fetch_xet(path, partial, revision=view.snapshot.head, size=size):
            return
        with open(partial, "ab") as f:
            self.hub.fetch(path, f, revision=view.snapshot.head, size=size, resume_size=f.tell())
            f.flush()
            os.fsync(f.fileno())

    def storage(self, view: StoreView) -> tuple[int, int | None]:
        """(what the head holds, what the Hub says the repo counts)."""
        return head_bytes(view.snapshot), self.hub.used_storage()


def repo_checkpoints(cfg: HubConfig, snapshot: HubSnapshot) -> dict[str, list[StoredCheckpoint]]:
    """The complete checkpoints of the repo's tree, per stage, newest first."""
    return {stage: [
        StoredCheckpoint(stage, step, cfg.checkpoint_path(stage, step), {
            name: RemoteFile(f.size, f.lfs.sha256 if f.lfs is not None else None)
            for name, f in snapshot.checkpoint_files(cfg, stage, step).items()})
        for step in snapshot.complete_steps(cfg, stage)] for stage in layout.STAGES}


def head_bytes(snapshot: HubSnapshot) -> int:
    """Large (LFS/Xet) files of the head, each content once: what the Hub counts once credits land."""
    return sum({f.lfs.sha256: f.lfs.size for f in snapshot.files.values() if f.lfs is not None}.values())


def _deletions(doomed: list[StoredCheckpoint]) -> list[CommitOperationDelete]:
    return [CommitOperationDelete(c.folder + "/", is_folder=True) for c in doomed]


def _names(doomed: list[StoredCheckpoint]) -> str:
    return ", ".join(f"{c.stage} {c.step}" for c in doomed)


def _prunes(title: str) -> bool:
    """Whether a commit deleted checkpoints (`tidy` squashes a history holding one)."""
    return title.startswith(PRUNE_TITLE) or f"; {PRUNE_TITLE} " in title


def stored(ckpt: layout.Checkpoint, stage: str, folder: str, generation: int = 0) -> StoredCheckpoint:
    """How a local checkpoint looks in the store once pushed."""
    files = {name: RemoteFile(entry["size"], entry["sha256"]) for name, entry in ckpt.files.items()}
    files[layout.MANIFEST_NAME] = RemoteFile((ckpt.path / layout.MANIFEST_NAME).stat().st_size)
    return StoredCheckpoint(stage, ckpt.step, folder, files, generation)


def log_push_done(stage: str, step: int, nbytes: int, seconds: float, **fields: Any) -> None:
    seconds = max(seconds, 1e-6)
    log.info(kv(event="push_done", stage=stage, step=step, bytes=nbytes, seconds=round(seconds, 2),
                mb_s=round(nbytes / seconds / 1e6, 1), **fields))
