"""Checkpoints in a Storage Bucket (the default): manifest written last, deleted first, freed at once.

Layout: `<stage>_checkpoints/<tag>/gen_NNNNNN/step_NNNNNN/<files>` in the bucket, the generation being the
launch's that pushed it; the generation claim, the tokenizer and the run files stay in the git repo
HF_REPO_ID (`store` says why). The bucket has the repo's id unless HF_BUCKET_ID names another; if the Hub
refuses a bucket of the repo's id (a 409: the name is taken), it is `<HF_REPO_ID>-checkpoints`, and readers
look for both. Checkpoints an older phoenix pushed into the git repo still count: restore takes them, and
they are pruned (a commit and a squash) as newer ones reach the bucket. A bucket is not transactional, so:

- push: every file in one batch, and MANIFEST.json in a later batch, only once all of them are in; a
  checkpoint is complete only when its manifest is there (restore then checks each listed file's size,
  and its sha256 once downloaded, and falls back to the previous checkpoint on a mismatch);
- prune: the manifests in one batch, then their files, so a prune cut short leaves files without a
  manifest, never something that looks complete; deleting frees the storage at once, so no squash;
- every pass first deletes what killed passes and fenced launches left: files of checkpoints without a
  manifest (except the next one this launch is pushing) and checkpoints outside the lineage; and one
  that lacks a file the volume's copy lists (at its size) is pushed again.

Each pass starts with a check of the claim, and so does every batch that writes or deletes a manifest: a
newer generation ends the pass (it re-reads, finds itself fenced). A launch paused between that check and
its batch can still write that batch; its generation's paths and the claim's lineage make sure it never
becomes what a restore picks, and it deletes only what its own pushes had made redundant before the claim.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

from huggingface_hub import BucketFile
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

from entrypoint.hub.client import Hub, xet_os_error
from entrypoint.hub.config import HubConfig, local_generation
from entrypoint.hub.errors import HeadMoved, HubError, HubFatal, HubUnavailable, RepoMissing, RevisionGone
from entrypoint.hub.repo_store import RepoStore, head_bytes, log_push_done, repo_checkpoints, stored
from entrypoint.hub.store import RemoteFile, StoredCheckpoint, StoreView, commit_side_files, counts
from entrypoint.logs import kv
from trainer import checkpoint_layout as layout

log = logging.getLogger("phoenix.sync")

_GENERATION_DIR = re.compile(r"^gen_(\d{6,})$")
Folders = dict[tuple[int, int], dict[str, BucketFile]]  # (generation, step) -> name -> file


class BucketStore:
    """The checkpoints of the run's bucket (see the module's first lines)."""

    def __init__(self, cfg: HubConfig, hub: Hub) -> None:
        self.cfg, self.hub, self.api = cfg, hub, hub.api
        self.legacy = RepoStore(cfg, hub)  # what an older phoenix pushed into the git repo
        self._bucket_id: str | None = None

    @property
    def bucket_id(self) -> str:
        """The bucket in use (after `ensure`, or a view that found one)."""
        assert self._bucket_id is not None, "no bucket yet"
        return self._bucket_id

    def find(self) -> str | None:
        """The first of `cfg.bucket_ids` that exists (None: none yet); the answer is kept once found."""
        if self._bucket_id is None:
            self._bucket_id = next((b for b in self.cfg.bucket_ids if self._exists(b)), None)
        return self._bucket_id

    def _exists(self, bucket_id: str) -> bool:
        try:
            self.hub.call("bucket_info", lambda: self.api.bucket_info(bucket_id))
            return True
        except RepoMissing:
            return False

    def ensure(self) -> None:
        """The repo, and a bucket: the repo's id, or its second name if the Hub refuses that one. A create
        the Hub answers without the bucket appearing counts as refused (exist_ok would hide a 409)."""
        self.hub.ensure_repo()
        if self.find() is not None:
            return
        refusals = []
        for bucket_id in self.cfg.bucket_ids:
            if (refusal := self._create(bucket_id)) is None:
                self._bucket_id = bucket_id
                if refusals:
                    log.warning(kv(event="bucket_renamed", bucket=bucket_id, refused=refusals[0]))
                return
            refusals.append(f"{bucket_id}: {refusal}")
        name = "HF_BUCKET_ID" if self.cfg.bucket_id else "a bucket for HF_REPO_ID"
        raise HubFatal(f"the Hub refused {name} ({'; '.join(refusals)}): set HF_BUCKET_ID to a free "
                       "'namespace/name' that HF_TOKEN may write")

    def _create(self, bucket_id: str) -> str | None:
        """Create the bucket: None once it is there, else why the Hub refused it (a 409: the name is taken,
        e.g. by a repo). A create answered without the bucket appearing is refused too (exist_ok=True would
        have hidden the 409 itself)."""
        try:
            self.hub.call("create_bucket", lambda: self.api.create_bucket(
                bucket_id, private=self.cfg.private, exist_ok=False))
            refusal = "the Hub answered the create, yet has no such bucket"
        except (HubFatal, HubUnavailable):
            raise
        except HubError as exc:  # a 409 of a racing create of ours is fine: the bucket is there
            refusal = str(exc)
        return None if self._exists(bucket_id) else refusal

    def folder(self, stage: str, generation: int, step: int) -> str:
        return f"{self.cfg.stage_path(stage)}/gen_{generation:06d}/{layout.step_dir_name(step)}"

    def view(self) -> StoreView:
        snapshot = self.hub.snapshot()
        view = StoreView(snapshot, repo_checkpoints(self.cfg, snapshot),  # an older phoenix's, in the repo
                         lambda: self.hub.claim_record(snapshot))
        bucket_id = self.find()
        for stage in layout.STAGES:
            folders = self._folders(bucket_id, stage, view.remote) if bucket_id else {}
            complete: dict[int, StoredCheckpoint] = {}
            for (generation, step), files in sorted(folders.items()):  # a newer generation's same step wins
                if layout.MANIFEST_NAME in files and counts(view.claim, generation, stage, step) and \
                        self._as_on_volume(stage, step, files):
                    complete[step] = StoredCheckpoint(
                        stage, step, self.folder(stage, generation, step),
                        {name: RemoteFile(f.size) for name, f in files.items()}, generation, in_bucket=True)
            for ckpt in complete.values():  # the bucket's copy of a step wins over the repo's
                view.add(ckpt)
            view.garbage += self._garbage(folders, complete)
        return view

    def _folders(self, bucket_id: str, stage: str, remote: dict[str, BucketFile]) -> Folders:
        """The stage's files in the bucket by (generation, step) and name; all of them also into `remote`."""
        prefix = self.cfg.stage_path(stage) + "/"
        entries = self.hub.call("list_bucket_tree", lambda: [
            e for e in self.api.list_bucket_tree(bucket_id, prefix=prefix, recursive=True)
            if isinstance(e, BucketFile)])
        folders: Folders = {}
        for entry in entries:
            remote[entry.path] = entry
            generation_name, step_name, name = (entry.path[len(prefix):].split("/") + ["", ""])[:3]
            found, step = _GENERATION_DIR.match(generation_name), layout.parse_step(step_name)
            if found and step is not None and name:
                folders.setdefault((int(found.group(1)), step), {})[name] = entry
        return folders

    def _as_on_volume(self, stage: str, step: int, files: dict[str, BucketFile]) -> bool:
        """False if the volume holds this step and a file its manifest lists is missing from the bucket or
        of another size: not complete then, so the sidecar pushes it again (restore checks the same against
        the bucket's own manifest)."""
        try:
            local = layout.read_manifest(layout.stage_dir(self.cfg.base_dir, stage, self.cfg.model_tag)
                                         / layout.step_dir_name(step))
        except layout.CheckpointInvalid:
            return True
        return all(name in files and files[name].size == e["size"] for name, e in local["files"].items())

    def _garbage(self, folders: Folders, complete: dict[int, StoredCheckpoint]) -> list[str]:
        """Files of folders that are not complete checkpoints counted here, but this launch's next one."""
        own, newest, garbage = local_generation(self.cfg), max(complete, default=-1), []
        for (generation, step), files in folders.items():
            if step in complete and complete[step].generation == generation:
                continue
            if generation == own and step > newest and layout.MANIFEST_NAME not in files:
                continue  # this launch's next checkpoint, cut short: its next push overwrites it
            if generation <= own:  # a newer one fences us: what it writes is not ours to delete
                garbage += [f.path for f in files.values()]
        return garbage

    def tidy(self, view: StoreView) -> None:
        """Delete files of checkpoints without a manifest and of checkpoints outside the lineage; squash the
        repo's history if a prune of its older checkpoints was not followed by one."""
        self.legacy.tidy(view)
        if not view.garbage:
            return
        self._batch("delete partial and fenced checkpoints", delete=view.garbage)
        log.info(kv(event="deleted_leftovers", files=len(view.garbage)))
        view.garbage = []

    def push(self, view: StoreView, stage: str, ckpt: layout.Checkpoint, side_files: list[Any],
             prune: list[StoredCheckpoint]) -> int:
        generation = local_generation(self.cfg)
        folder = self.folder(stage, generation, ckpt.step)
        record = stored(ckpt, stage, folder, generation)
        manifest = (ckpt.path / layout.MANIFEST_NAME).read_bytes()  # the one `layout.verify` just checked
        names = sorted(ckpt.files)
        nbytes = sum(ckpt.files[name]["size"] for name in names)
        log.info(kv(event="push_start", stage=stage, step=ckpt.step, files=len(names) + 1, bytes=nbytes,
                    bucket_folder=folder))
        start = time.monotonic()
        self._batch(f"upload {folder}", add=[(str(ckpt.path / name), f"{folder}/{name}") for name in names])
        # Only now, and only if we are still the newest generation, does it become complete.
        self._check_claim()
        self._batch(f"upload {folder}/{layout.MANIFEST_NAME}",
                    add=[(manifest, f"{folder}/{layout.MANIFEST_NAME}")])
        log_push_done(stage, ckpt.step, nbytes, time.monotonic() - start, extras=len(side_files),
                      bucket_folder=folder)
        view.add(record)
        if prune:
            self.prune(view, prune)
        if side_files:
            self.push_side_files(view, side_files)
        return nbytes

    def push_side_files(self, view: StoreView, side_files: list[Any]) -> None:
        commit_side_files(self.hub, view, side_files, self.cfg.model_tag)

    def prune(self, view: StoreView, doomed: list[StoredCheckpoint]) -> None:
        """Manifests first, in their own batch: from then on none of them counts; then their files. Those in
        the repo (an older phoenix's) go in one commit and a squash."""
        if legacy := [c for c in doomed if not c.in_bucket]:
            self.legacy.prune(view, legacy)
        if not (doomed := [c for c in doomed if c.in_bucket]):
            return
        self._check_claim()
        self._batch("delete manifests", delete=[f"{c.folder}/{layout.MANIFEST_NAME}" for c in doomed])
        for ckpt in doomed:
            view.remove(ckpt)
            log.info(kv(event="pruned", stage=ckpt.stage, step=ckpt.step, bucket_folder=ckpt.folder))
        files = [f"{c.folder}/{name}" for c in doomed for name in c.files if name != layout.MANIFEST_NAME]
        self._batch("delete pruned files", delete=files)
        freed = sum(f.size for c in doomed for f in c.files.values())
        log.info(kv(event="freed", files=len(files), bytes=freed))

    def fetch(self, view: StoreView, path: str, partial: Path, size: int) -> None:
        """hf_xet rebuilds the whole file (a killed one restarts; finished files are kept by the caller)."""
        if path in view.snapshot.files:  # an older phoenix's checkpoint, in the repo
            return self.legacy.fetch(view, path, partial, size)
        entry = view.remote.get(path)
        try:
            if entry is None:
                raise EntryNotFoundError(path)
            self.api.download_bucket_files(self.bucket_id, [(entry, str(partial))],
                                           raise_on_missing_files=True)
        except (EntryNotFoundError, HfHubHTTPError) as exc:
            if isinstance(exc, HfHubHTTPError) and getattr(exc.response, "status_code", None) != 404:
                raise
            raise RevisionGone(f"{path} was deleted from the bucket while being read (pruned)") from exc
        except RuntimeError as exc:
            if (error := xet_os_error(exc, partial)) is None:
                raise
            raise error from exc

    def storage(self, view: StoreView) -> tuple[int, int | None]:
        """(bucket size + the repo head's large files, bucket size + the Hub's figure for the repo)"""
        size = 0 if (bucket_id := self.find()) is None else self.hub.call(
            "bucket_info", lambda: self.api.bucket_info(bucket_id)).size
        reported = self.hub.used_storage()
        return size + head_bytes(view.snapshot), None if reported is None else size + reported

    def _check_claim(self) -> None:
        """Before a batch that makes checkpoints count or stop counting (a manifest written or deleted):
        a newer generation ends the pass. Other batches need no check: files without a manifest never
        count, and what tidy deletes no longer counts under any newer claim either."""
        theirs = self.hub.generation_at("main")
        if theirs > (own := local_generation(self.cfg)):
            raise HeadMoved(f"generation {theirs} was claimed during the pass (ours: {own})")

    def _batch(self, what: str, **operations: Any) -> None:
        self.hub.call(what, lambda: self.api.batch_bucket_files(self.bucket_id, **operations))
