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
or partial on the Hub is skipped, with a warning naming the file, for the one before it.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import click

from entrypoint.hub.client import Hub
from entrypoint.hub.config import GENERATION_FILE, TOKENIZER_PATH, HubConfig
from entrypoint.hub.errors import HubError, HubFatal, RepoMissing, RevisionGone
from entrypoint.hub.repo_store import RepoStore
from entrypoint.hub.store import CheckpointStore, StoredCheckpoint, StoreView
from entrypoint.hub.stores import open_store
from entrypoint.logs import kv, setup_hub_logging
from trainer import checkpoint_layout as layout

log = logging.getLogger("phoenix.restore")

INCOMPLETE_SUFFIX = ".incomplete"
STAGING_DIR = ".restore"
DOWNLOAD_WORKERS = 8
SNAPSHOT_ATTEMPTS = 3


class CorruptOnHub(HubError):
    """The Hub's copy of a checkpoint cannot be restored; the message names the file."""


def restore(cfg: HubConfig | None = None, hub: Hub | None = None) -> dict[str, int | None]:
    """Restore from the Hub what the volume lacks; return the latest complete local step per stage.

    Nothing is downloaded for a stage whose volume checkpoint is as new as the Hub's. Raises HubFatal
    (credentials, repo id) and HubUnavailable (Hub unreachable after retries); the entrypoint decides
    whether to start from the volume anyway.
    """
    cfg = cfg or HubConfig.from_env()
    if cfg.repo_id is None:
        log.info("HF_REPO_ID not set: Hub sync and restore are off")
        return _local_steps(cfg)
    store = open_store(cfg, hub)
    for attempt in range(1, SNAPSHOT_ATTEMPTS + 1):
        try:
            return _restore_from_head(cfg, store)
        except RevisionGone as exc:
            if attempt == SNAPSHOT_ATTEMPTS:
                raise
            # The sidecar freed pruned checkpoints under us (a squash, a bucket delete): files already
            # downloaded stay in staging, so reading the new head costs only what is still missing.
            log.warning(kv(event="restore_retry", reason=str(exc), action="re-reading the Hub"))
    raise AssertionError("unreachable")


def _restore_from_head(cfg: HubConfig, store: CheckpointStore) -> dict[str, int | None]:
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
    restored = False
    for stage in layout.STAGES:
        local = layout.latest(layout.stage_dir(cfg.base_dir, stage, cfg.model_tag))
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
                log.warning(
                    kv(
                        event="hub_checkpoint_corrupt",
                        stage=stage,
                        step=step,
                        error=str(exc),
                        action="trying the previous checkpoint",
                    )
                )
    _restore_side_files(store, view, overwrite=restored)
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


def _restore_side_files(store: CheckpointStore, view: StoreView, *, overwrite: bool) -> None:
    """Tokenizer and `runs/<tag>/` files (in the git repo, whatever the store): fetched when missing, or
    replaced along with a restored checkpoint.

    generation.json is left out: it is the fencing token, owned by `claim_generation`.
    """
    cfg, hub, snapshot = store.cfg, store.hub, view.snapshot
    fetch = partial(_fetch, hub, partial(RepoStore(cfg, hub).fetch, view))
    run_dir = cfg.run_path("")
    paths = [TOKENIZER_PATH] + sorted(
        p for p in snapshot.files if p.startswith(run_dir) and p != cfg.run_path(GENERATION_FILE)
    )
    for path in paths:
        local = cfg.local(path)
        remote = snapshot.files.get(path)
        if remote is None or (local.exists() and (not overwrite or snapshot.same(path, local))):
            continue
        local.parent.mkdir(parents=True, exist_ok=True)
        staged = local.with_name(f"{layout.TMP_PREFIX}{local.name}")
        staged.unlink(missing_ok=True)
        fetch(path, staged, remote.size)
        os.replace(staged, local)
        log.info(kv(event="restored_file", path=path, bytes=remote.size))


# Inference needs the weights and the model config, never the optimizer or RNG state.
WEIGHT_FILES = ("model.safetensors", layout.META_NAME)
WEIGHTS_DIR = "weights"


def fetch_weights(cfg: HubConfig, hub: Hub | None = None) -> tuple[str, Path] | None:
    """The Hub's newest complete checkpoint's weights for inference (SFT if any, else base): (stage, folder).

    The folder, `$NANOCHAT_BASE_DIR/weights/<stage>_checkpoints/<tag>/step_NNNNNN/`, holds MANIFEST.json,
    meta.json and model.safetensors, each sha256-checked against the manifest. It lies outside the
    checkpoint directories on purpose: without its optimizer it is not a complete checkpoint, and training
    must never resume from it. A rerun resumes a cut download and reuses finished files. The tokenizer
    comes along if the volume lacks it. None when the Hub holds no checkpoint (or no repo).
    """
    store = open_store(cfg, hub)
    try:
        view = store.view()
    except RepoMissing:
        return None
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
                tokenizer.parent.mkdir(parents=True, exist_ok=True)
                staged = tokenizer.with_name(f"{layout.TMP_PREFIX}{tokenizer.name}")
                _fetch(store.hub, partial(RepoStore(cfg, store.hub).fetch, view), TOKENIZER_PATH, staged,
                       view.snapshot.files[TOKENIZER_PATH].size)
                os.replace(staged, tokenizer)
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
    try:
        restore(cfg)
    except HubFatal as exc:
        log.error(kv(event="fatal", error=str(exc)))
        sys.exit(2)
    except HubError as exc:
        log.error(kv(event="restore_failed", error=str(exc)))
        sys.exit(1)
