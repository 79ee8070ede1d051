"""`phoenix restore`: bring the latest complete checkpoint of each stage back from the Hub onto the volume.

Only what is needed travels: per stage the newest checkpoint complete in the store (MANIFEST.json present,
and in a bucket, pushed within the run's lineage: see `store`) and newer than the volume's own, plus the
tokenizer and `runs/<tag>/` files from the git repo. Files land in a staging dir,
`$NANOCHAT_BASE_DIR/.restore/<stage>_checkpoints/<tag>/step_NNNNNN/`, each first as `<name>.incomplete`,
renamed once its size is right. A killed restore resumes there: finished files are kept, a partial one
continues with an HTTP Range request (huggingface_hub's `http_get`; `hf_hub_download` would restart it
from byte 0 in a new process); a Xet-backed file comes through hf_xet (`xet_get`), which rebuilds it whole.
If the history is squashed while we read (the commit we pinned vanishes), or a bucket file is pruned,
restore starts over on a fresh view, keeping what it staged. Every sha256 is checked against the manifest
in staging (before downloading, also every size, against the store's listing), then
`checkpoint_layout.publish_copy` publishes atomically, as the trainer does. A checkpoint that is corrupt
or partial on the Hub is skipped, with a warning naming the file, for the one before it; a stage whose every
checkpoint is so, with none on the volume, is an error (`Unservable`) rather than a silent fresh start.

Whoever restores holds the run's lock (`phoenix run` has it; `phoenix restore` takes it, waiting for another
restore, refusing a run), so no two writers ever share the staging files. Chat's weight fetch, outside the
checkpoints, holds a lock of its own on `weights/`.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import click

from entrypoint.hub.client import Hub
from entrypoint.hub.config import GENERATION_FILE, RUN_FILE, TOKENIZER_PATH, HubConfig
from entrypoint.hub.errors import HubError, HubFatal, RepoMissing, RevisionGone
from entrypoint.hub.repo_store import RepoStore
from entrypoint.hub.store import CheckpointStore, StoredCheckpoint, StoreView
from entrypoint.hub.stores import open_store
from entrypoint.launch.volume import RESTORE_COMMAND, LockHeld, VolumeLock, lock_path
from entrypoint.logs import kv, setup_hub_logging
from trainer import checkpoint_content as content
from trainer import checkpoint_layout as layout

log = logging.getLogger("phoenix.restore")

INCOMPLETE_SUFFIX = ".incomplete"
STAGING_DIR = ".restore"
DOWNLOAD_WORKERS = 8
SNAPSHOT_ATTEMPTS = 3


class CorruptOnHub(HubError):
    """The Hub's copy of a checkpoint cannot be restored; the message names the file."""


class Unservable(HubError):
    """The Hub lists checkpoints of a stage the volume has none of, and not one of them is intact. Waiting
    will not mend them (the sidecar that pushed them is fenced off by this launch), and restoring nothing
    would start the stage over under the old run's name."""


def restore(cfg: HubConfig | None = None, hub: Hub | None = None,
            fresh_start_ok: Collection[str] = ()) -> dict[str, int | None]:
    """Restore from the Hub what the volume lacks; return the latest complete local step per stage.

    Nothing is downloaded for a stage whose volume checkpoint is as new as the Hub's. Raises HubFatal
    (credentials, repo id), HubUnavailable (Hub unreachable after retries; the entrypoint decides whether to
    start from the volume anyway) and Unservable, unless the stage is in `fresh_start_ok`. The caller holds
    the run's lock.
    """
    cfg = cfg or HubConfig.from_env()
    if cfg.repo_id is None:
        log.info("HF_REPO_ID not set: Hub sync and restore are off")
        return _local_steps(cfg)
    store = open_store(cfg, hub)
    for attempt in range(1, SNAPSHOT_ATTEMPTS + 1):
        try:
            return _restore_from_head(cfg, store, fresh_start_ok)
        except RevisionGone as exc:
            if attempt == SNAPSHOT_ATTEMPTS:
                raise
            # The sidecar freed pruned checkpoints under us (a squash, a bucket delete): files already
            # downloaded stay in staging, so reading the new head costs only what is still missing.
            log.warning(kv(event="restore_retry", reason=str(exc), action="re-reading the Hub"))
    raise AssertionError("unreachable")


def _restore_from_head(cfg: HubConfig, store: CheckpointStore,
                       fresh_start_ok: Collection[str]) -> dict[str, int | None]:
    try:
        view = store.view()
    except RepoMissing:
        log.info(
            kv(
                event="restore_skip",
                reason="the Hub repo does not exist yet (or HF_TOKEN cannot see it)",
                repo=cfg.repo_id,
            )
        )
        return _local_steps(cfg)
    restored = new_run = False
    for stage in layout.STAGES:
        local = layout.latest(layout.stage_dir(cfg.base_dir, stage, cfg.model_tag))
        corrupt: list[str] = []
        for stored in view.checkpoints[stage]:
            step = stored.step
            if local is not None and step <= local.step:
                log.info(kv(event="restore_skip", stage=stage, volume_step=local.step, hub_step=step))
                break
            try:
                _restore_checkpoint(store, view, stored)
                restored = True
                break
            except CorruptOnHub as exc:
                corrupt.append(str(exc))
                log.warning(
                    kv(
                        event="hub_checkpoint_corrupt",
                        stage=stage,
                        step=step,
                        error=str(exc),
                        action="trying the previous checkpoint",
                    )
                )
        else:
            if corrupt and local is None:
                _unservable(cfg, stage, corrupt, fresh_start_ok)
                new_run |= stage == "base"
    _restore_side_files(store, view, overwrite=restored, run_files=not new_run)
    staging_root = cfg.base_dir / STAGING_DIR
    if staging_root.is_dir() and not any(p.is_file() for p in staging_root.rglob("*")):
        shutil.rmtree(staging_root)  # keep partial downloads only: they are what a rerun resumes from
    steps = _local_steps(cfg)
    log.info(
        kv(
            event="restore_done",
            **{stage: steps[stage] if steps[stage] is not None else "-" for stage in steps},
        )
    )
    return steps


def _unservable(cfg: HubConfig, stage: str, corrupt: list[str], fresh_start_ok: Collection[str]) -> None:
    flag = "phoenix run -- --allow-fresh-start" if stage == "base" else "SFT_ARGS=--allow-fresh-start"
    if stage not in fresh_start_ok:
        raise Unservable(
            f"the Hub holds {len(corrupt)} {stage} checkpoint(s) of MODEL_TAG={cfg.model_tag} and not one is "
            f"intact ({corrupt[0]}), nor is there one on the volume: put an intact checkpoint back on the "
            f"volume or the Hub, or start the {stage} stage over as a new run ({flag})"
        )
    over = "as a new run (new ids: the old run's files stay on the Hub)" if stage == "base" else "from base"
    log.warning(kv(event="hub_checkpoint_unservable", stage=stage, checkpoints=len(corrupt),
                   action=f"starting the {stage} stage over {over}, as {flag} allows"))


def _local_steps(cfg: HubConfig) -> dict[str, int | None]:
    steps = {}
    for stage in layout.STAGES:
        ckpt = layout.latest(layout.stage_dir(cfg.base_dir, stage, cfg.model_tag))
        steps[stage] = ckpt.step if ckpt is not None else None
    return steps


def _restore_checkpoint(
    store: CheckpointStore, view: StoreView, stored: StoredCheckpoint
) -> layout.Checkpoint:
    cfg, stage, step, folder, remote = store.cfg, stored.stage, stored.step, stored.folder, stored.files
    staging = cfg.base_dir / STAGING_DIR / cfg.checkpoint_path(stage, step)
    fetch = partial(_fetch, store.hub, partial(store.fetch, view))
    staging.mkdir(parents=True, exist_ok=True)
    manifest_size = remote[layout.MANIFEST_NAME].size
    fetch(f"{folder}/{layout.MANIFEST_NAME}", staging / layout.MANIFEST_NAME, manifest_size)
    try:
        manifest = layout.read_manifest(staging)
    except layout.CheckpointInvalid as exc:
        shutil.rmtree(staging)
        raise CorruptOnHub(str(exc)) from None
    # The tree already tells sizes (and sha256 of LFS files): a bad Hub copy is caught before downloading it.
    for name, entry in sorted(manifest["files"].items()):
        found = remote.get(name)
        if found is None:
            raise CorruptOnHub(f"{folder}/{name}: listed in the manifest but missing on the Hub")
        if found.size != entry["size"] or found.sha256 not in (None, entry["sha256"]):
            raise CorruptOnHub(
                f"{folder}/{name}: the Hub's copy does not match the manifest (size or sha256)"
            )
    total = sum(entry["size"] for entry in manifest["files"].values())
    log.info(kv(event="restore_start", stage=stage, step=step, files=len(manifest["files"]), bytes=total))
    start = time.monotonic()

    def fetch_file(name: str) -> int:
        return fetch(f"{folder}/{name}", staging / name, manifest["files"][name]["size"])

    # Largest first, several at once, as snapshot_download does: one HTTP stream rarely fills the link.
    names = sorted(manifest["files"], key=lambda name: -manifest["files"][name]["size"])
    with ThreadPoolExecutor(max_workers=DOWNLOAD_WORKERS) as pool:
        fetched = sum(pool.map(fetch_file, names))
    try:
        # Hashed in staging, so that a kill during this (long) check loses no downloaded file.
        layout.check_files(staging, manifest, full_hash=True)
    except layout.CheckpointInvalid as exc:
        shutil.rmtree(staging)
        raise CorruptOnHub(str(exc)) from None
    ckpt = _publish(cfg, stage, staging, manifest)
    seconds = max(time.monotonic() - start, 1e-6)
    log.info(
        kv(
            event="restored",
            stage=stage,
            step=step,
            bytes=total,
            downloaded=fetched,
            seconds=round(seconds, 2),
            mb_s=round(fetched / seconds / 1e6, 1),
        )
    )
    # Leftovers of older attempts at other steps of this stage are useless now.
    shutil.rmtree(staging.parent, ignore_errors=True)
    return ckpt


def _fetch(hub: Hub, fetch: Callable[[str, Path, int], None], path: str, dest: Path, size: int) -> int:
    """Download one file to `dest` (one attempt: `fetch`, retried through `hub`) unless a finished copy is
    there; returns the bytes downloaded.

    Only a file whose every byte arrived is renamed to its final name; a partial one stays
    `<name>.incomplete` and the next call continues it from where it stopped.
    """
    if dest.is_file() and dest.stat().st_size == size:
        return 0
    incomplete = dest.with_name(dest.name + INCOMPLETE_SUFFIX)
    if incomplete.is_file() and incomplete.stat().st_size > size:
        incomplete.unlink()
    before = incomplete.stat().st_size if incomplete.is_file() else 0

    hub.call(f"download {path}", lambda: fetch(path, incomplete, size))
    os.replace(incomplete, dest)
    return size - before


def _publish(cfg: HubConfig, stage: str, staging: Path, manifest: dict) -> layout.Checkpoint:
    """Move the verified staged files into a fresh tmp dir and publish them under the Hub's manifest."""
    directory = layout.stage_dir(cfg.base_dir, stage, cfg.model_tag)
    final = directory / layout.step_dir_name(manifest["step"])
    if final.exists():
        # An incomplete local copy of this step (else we would not be restoring it): keep it for inspection.
        layout.quarantine(final, "incomplete on the volume, replaced by the Hub's copy")
    tmp = layout.new_tmp_dir(directory, manifest["step"])
    for name in manifest["files"]:
        os.replace(staging / name, tmp / name)
    return layout.publish_copy(tmp, manifest, full_hash=False)


def _restore_side_files(store: CheckpointStore, view: StoreView, *, overwrite: bool, run_files: bool) -> None:
    """Tokenizer and (unless a new run starts) `runs/<tag>/` files, in the git repo whatever the store:
    fetched when missing (a damaged run.json is quarantined, so missing), or replaced along with a restored
    checkpoint.

    generation.json is left out: it is the fencing token, owned by `claim_generation`.
    """
    cfg, hub, snapshot = store.cfg, store.hub, view.snapshot
    fetch = partial(RepoStore(cfg, hub).fetch, view)
    run_dir = cfg.run_path("")
    run_paths = [p for p in snapshot.files if p.startswith(run_dir) and p != cfg.run_path(GENERATION_FILE)]
    paths = [TOKENIZER_PATH] + (sorted(run_paths) if run_files else [])
    for path in paths:
        local = cfg.local(path)
        remote = snapshot.files.get(path)
        if path == cfg.run_path(RUN_FILE) and remote is not None:
            layout.read_run_file(local)  # a damaged one goes to quarantine: the Hub's copy replaces it
        if remote is None or (local.exists() and (not overwrite or snapshot.same(path, local))):
            continue
        _fetch_whole(hub, fetch, path, local, remote.size)
        log.info(kv(event="restored_file", path=path, bytes=remote.size))


def _fetch_whole(hub: Hub, fetch: Callable[[str, Path, int], None], path: str, local: Path,
                 size: int) -> None:
    """Download a small file under a name of its own, then rename it into place: a reader, or anyone else
    fetching it (chat and a restore both bring the tokenizer), sees the old file or the new one."""
    local.parent.mkdir(parents=True, exist_ok=True)
    staged = local.with_name(f"{layout.TMP_PREFIX}{local.name}.{uuid.uuid4().hex[:8]}")
    try:
        _fetch(hub, fetch, path, staged, size)
        os.replace(staged, local)
    finally:
        for leftover in (staged, staged.with_name(staged.name + INCOMPLETE_SUFFIX)):
            leftover.unlink(missing_ok=True)


# Inference needs the weights and the model config, never the optimizer or RNG state.
WEIGHT_FILES = ("model.safetensors", layout.META_NAME)
WEIGHTS_DIR = "weights"


def fetch_weights(cfg: HubConfig, hub: Hub | None = None) -> tuple[str, Path] | None:
    """The Hub's newest complete checkpoint's weights for inference (SFT if any, else base): (stage, folder).

    The folder, `$NANOCHAT_BASE_DIR/weights/<stage>_checkpoints/<tag>/step_NNNNNN/`, holds MANIFEST.json,
    meta.json and model.safetensors, each sha256-checked against the manifest. It lies outside the
    checkpoint directories on purpose: without its optimizer it is not a complete checkpoint, and training
    must never resume from it. A rerun resumes a cut download and reuses finished files; two at once (two
    chats) take turns on `weights/<tag>.lock`, the second finding what the first fetched. The tokenizer
    comes along if the volume lacks it. None when the Hub holds no checkpoint (or no repo).
    """
    store = open_store(cfg, hub)
    try:
        view = store.view()
    except RepoMissing:
        return None
    lock = VolumeLock(cfg.base_dir / WEIGHTS_DIR / f"{cfg.model_tag}.lock", command="phoenix chat")
    lock.acquire(wait_for="phoenix chat")
    try:
        return _fetch_newest_weights(store, view)
    finally:
        lock.release()


def _fetch_newest_weights(store: CheckpointStore, view: StoreView) -> tuple[str, Path] | None:
    cfg = store.cfg
    for stage in reversed(layout.STAGES):  # the finished product first: SFT, then base
        for stored in view.checkpoints[stage]:
            try:
                folder = _fetch_weight_files(store, view, stored)
            except CorruptOnHub as exc:
                log.warning(kv(event="hub_checkpoint_corrupt", stage=stage, step=stored.step, error=str(exc),
                               action="trying the previous checkpoint"))
                continue
            tokenizer = cfg.local(TOKENIZER_PATH)
            if not tokenizer.exists() and TOKENIZER_PATH in view.snapshot.files:
                _fetch_whole(store.hub, partial(RepoStore(cfg, store.hub).fetch, view), TOKENIZER_PATH,
                             tokenizer, view.snapshot.files[TOKENIZER_PATH].size)
            return stage, folder
    return None


def _fetch_weight_files(store: CheckpointStore, view: StoreView, stored: StoredCheckpoint) -> Path:
    cfg, folder, remote = store.cfg, stored.folder, stored.files
    local = cfg.base_dir / WEIGHTS_DIR / cfg.checkpoint_path(stored.stage, stored.step)
    fetch = partial(_fetch, store.hub, partial(store.fetch, view))
    local.mkdir(parents=True, exist_ok=True)
    fetch(f"{folder}/{layout.MANIFEST_NAME}", local / layout.MANIFEST_NAME, remote[layout.MANIFEST_NAME].size)
    try:
        manifest = layout.read_manifest(local)
    except layout.CheckpointInvalid as exc:
        shutil.rmtree(local)
        raise CorruptOnHub(str(exc)) from None
    for name in WEIGHT_FILES:
        entry = manifest["files"].get(name)
        if entry is None or name not in remote:
            raise CorruptOnHub(f"{folder}/{name}: missing from the manifest or the Hub")
        fetch(f"{folder}/{name}", local / name, entry["size"])
        if layout.sha256_file(local / name) != entry["sha256"]:
            (local / name).unlink()
            raise CorruptOnHub(f"{folder}/{name}: sha256 does not match the manifest")
    try:
        content.check_meta(local / layout.META_NAME, manifest)  # what the chat reads of it
    except layout.CheckpointInvalid as exc:
        shutil.rmtree(local)
        raise CorruptOnHub(str(exc)) from None
    for older in local.parent.iterdir():  # only the newest weights are worth their disk space
        if older != local:
            shutil.rmtree(older, ignore_errors=True)
    log.info(kv(event="weights_fetched", stage=stored.stage, step=stored.step, path=local))
    return local


@click.command("restore")
def restore_command() -> None:
    """Restore the newest complete checkpoints from HF_REPO_ID (repo or bucket) if the volume lacks them."""
    cfg = HubConfig.from_env_or_exit()
    setup_hub_logging(cfg.base_dir / "logs" / "hf_restore.log")
    if cfg.repo_id is None:
        restore(cfg)
        return
    lock = VolumeLock(lock_path(cfg.base_dir, cfg.model_tag), command=RESTORE_COMMAND)
    try:
        lock.acquire(wait_for=RESTORE_COMMAND)
    except LockHeld as exc:
        click.echo(f"error: {exc.command} ({exc.description}) holds MODEL_TAG={cfg.model_tag} on this volume "
                   "and restores what it needs by itself: stop it first to restore by hand", err=True)
        sys.exit(2)
    try:
        restore(cfg)
    except Unservable as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except HubFatal as exc:
        log.error(kv(event="fatal", error=str(exc)))
        sys.exit(2)
    except HubError as exc:
        log.error(kv(event="restore_failed", error=str(exc)))
        sys.exit(1)
    finally:
        lock.release()
