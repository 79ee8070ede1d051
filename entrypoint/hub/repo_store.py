"""Checkpoints in the git repo HF_REPO_ID: one commit per checkpoint, pruned in one commit, history squashed.

Each checkpoint goes up as ONE commit holding every file plus MANIFEST.json, so the repo never shows a
partial checkpoint as complete, whatever dies when. Every commit carries `parent_commit`, so a claim by a
newer launch landing mid-pass makes the next commit fail (412) and the pass re-reads and finds itself
fenced. On the Hub a commit that deletes files frees nothing (the history keeps them), so a prune commit is
followed by a squash of the history (`super_squash_history`), which frees them.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationDelete

from entrypoint.hub.client import Hub, add_operation
from entrypoint.hub.config import HubConfig, local_generation
from entrypoint.hub.errors import Fenced
from entrypoint.hub.store import RemoteFile, StoredCheckpoint, StoreView
from entrypoint.logs import kv
from trainer import checkpoint_layout as layout

log = logging.getLogger("phoenix.sync")

PRUNE_TITLE = "prune"  # the title of prune commits starts with it: the history holds pruned files


class RepoStore:
    """The checkpoints of HF_REPO_ID's git tree (see the module's first lines)."""

    def __init__(self, cfg: HubConfig, hub: Hub) -> None:
        self.cfg, self.hub = cfg, hub

    def ensure(self) -> None:
        self.hub.ensure_repo()

    def view(self) -> StoreView:
        snapshot = self.hub.snapshot()
        checkpoints = {}
        for stage in layout.STAGES:
            checkpoints[stage] = [
                StoredCheckpoint(stage, step, self.cfg.checkpoint_path(stage, step), {
                    name: RemoteFile(f.size, f.lfs.sha256 if f.lfs is not None else None)
                    for name, f in snapshot.checkpoint_files(self.cfg, stage, step).items()})
                for step in snapshot.complete_steps(self.cfg, stage)
            ]
        return StoreView(snapshot, checkpoints, lambda: self.hub.claim_record(snapshot))

    def tidy(self, view: StoreView) -> None:
        """A history that still holds a prune commit is squashed before anything more is pushed: the squash
        that should have followed it was skipped, failed or killed."""
        pruning = self.cfg.keep_last is not None
        if pruning and any(c.title.startswith(PRUNE_TITLE) for c in self.hub.commits()):
            view.head = self._squash(view.head)

    def push(self, view: StoreView, stage: str, ckpt: layout.Checkpoint, side_files: list[Any]) -> None:
        folder = self.cfg.checkpoint_path(stage, ckpt.step)
        ops = [
            add_operation(f"{folder}/{name}", ckpt.path / name, entry["sha256"])
            for name, entry in sorted(ckpt.files.items())
            if not view.snapshot.same(f"{folder}/{name}", ckpt.path / name, entry["sha256"])
        ]
        nbytes = sum(ckpt.files[op.path_in_repo.rsplit("/", 1)[1]]["size"] for op in ops)
        ops.append(add_operation(f"{folder}/{layout.MANIFEST_NAME}", ckpt.path / layout.MANIFEST_NAME))
        title = f"step {ckpt.step} of {self.cfg.model_tag} ({stage})"
        record = stored(ckpt, stage, folder)  # before the commit: the trainer may prune it right after
        log.info(kv(event="push_start", stage=stage, step=ckpt.step, files=len(ops), bytes=nbytes))
        start = time.monotonic()
        view.head = self.hub.commit(ops + side_files, title, parent=view.head)
        log_push_done(stage, ckpt.step, nbytes, time.monotonic() - start, extras=len(side_files),
                      commit=view.head[:12])
        view.add(record)

    def push_side_files(self, view: StoreView, side_files: list[Any]) -> None:
        paths = ", ".join(op.path_in_repo for op in side_files)
        view.head = self.hub.commit(side_files, f"update {paths} of {self.cfg.model_tag}", parent=view.head)
        log.info(kv(event="pushed_extras", paths=paths, commit=view.head[:12]))

    def prune(self, view: StoreView, doomed: list[StoredCheckpoint]) -> None:
        """Delete them in one commit, then squash the history to free them."""
        ops = [CommitOperationDelete(c.folder + "/", is_folder=True) for c in doomed]
        view.head = self.hub.commit(
            ops, f"{PRUNE_TITLE} {self.cfg.model_tag}: keep last {self.cfg.keep_last}", parent=view.head
        )
        for ckpt in doomed:
            view.remove(ckpt)
            log.info(kv(event="pruned", stage=ckpt.stage, step=ckpt.step, commit=view.head[:12]))
        view.head = self._squash(view.head)

    def _squash(self, head: str) -> str:
        """Free what pruning deleted: on the Hub a delete commit frees nothing, the history keeps every file.
        Returns the new head, or `head` if the squash was skipped (the next commit on it then gets a 412).

        The Hub's squash takes no parent commit, so we check right before it that the head is still ours and
        no newer generation claimed the repo; a squash keeps the head's tree as it is, so even a claim
        landing in the remaining instant loses no file, and the generation is read again on the squashed
        head before anything is committed on it.
        """
        snapshot = self.hub.snapshot()
        own = local_generation(self.cfg)
        if snapshot.head != head or self.hub.generation(snapshot) > own:
            log.info(kv(event="squash_skipped", reason="the repo moved on since we read it"))
            return head
        used = self.hub.used_storage()
        self.hub.squash(f"squash the history of {self.cfg.model_tag} to free pruned checkpoints")
        squashed = self.hub.snapshot()
        log.info(kv(event="squashed", before_bytes=used if used is not None else "-",
                    after_bytes=self.hub.used_storage() or "-", commit=squashed.head[:12]))
        if (theirs := self.hub.generation(squashed)) > own:
            raise Fenced(f"fenced: generation {own} < {theirs}")
        return squashed.head

    def fetch(self, view: StoreView, path: str, partial: Path, size: int) -> None:
        # Xet: hf_xet rebuilds the whole file (a killed one restarts, finished files are kept); else Range.
        if self.hub.fetch_xet(path, partial, revision=view.snapshot.head, size=size):
            return
        with open(partial, "ab") as f:
            self.hub.fetch(path, f, revision=view.snapshot.head, size=size, resume_size=f.tell())
            f.flush()
            os.fsync(f.fileno())

    def used_storage(self) -> int | None:
        """What the repo's history holds, as the Hub bills it."""
        return self.hub.used_storage()


def stored(ckpt: layout.Checkpoint, stage: str, folder: str, generation: int = 0) -> StoredCheckpoint:
    """How a local checkpoint looks in the store once pushed."""
    files = {name: RemoteFile(entry["size"], entry["sha256"]) for name, entry in ckpt.files.items()}
    files[layout.MANIFEST_NAME] = RemoteFile((ckpt.path / layout.MANIFEST_NAME).stat().st_size)
    return StoredCheckpoint(stage, ckpt.step, folder, files, generation)


def log_push_done(stage: str, step: int, nbytes: int, seconds: float, **fields: Any) -> None:
    seconds = max(seconds, 1e-6)
    log.info(kv(event="push_done", stage=stage, step=step, bytes=nbytes, seconds=round(seconds, 2),
                mb_s=round(nbytes / seconds / 1e6, 1), **fields))
