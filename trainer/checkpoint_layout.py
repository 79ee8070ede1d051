"""The checkpoint contract: where checkpoints live, what makes one complete, which one is latest.

Torch-free on purpose: the trainer publishes with it, `phoenix restore` verifies what came from the Hub
with it, and the sidecar decides what to push with it. It is the one place that answers "is this
checkpoint complete?", so the three can never disagree.

Layout: $NANOCHAT_BASE_DIR/<stage>_checkpoints/<model_tag>/step_NNNNNN/ holding tensors as *.safetensors,
everything else as *.json, and MANIFEST.json (size + sha256 of every other file), written last. Complete
means: each file is there as the manifest lists it, and what it holds meets `trainer.checkpoint_content`
(every file a resume reads, meta.json's schema: matching hashes cannot vouch for content that was wrong
when it was hashed). A directory is published by renaming a fully written, fsynced temporary sibling into
place, so a crash leaves either the old set of checkpoints or the new one. Several processes may write
into one temporary directory: each fsyncs and hashes its own files and reports their entries (size,
sha256) to the one that publishes, which does so only once every report is in. A damaged step directory
newer than the latest good one is moved to $NANOCHAT_BASE_DIR/quarantine/ (kept for inspection), so the
run can save that step again instead of failing on the name forever.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.checkpoint_content import (
    META_NAME,
    REQUIRED_FILES,
    RUN_KEYS,
    STAGES,
    CheckpointInvalid,
    check_format,
    check_meta,
    optimizer_state_problem,
)

log = logging.getLogger("phoenix.checkpoint")

FORMAT = "phoenix-checkpoint/1"
MANIFEST_NAME = "MANIFEST.json"
TMP_PREFIX = ".tmp-"
QUARANTINE_DIR = "quarantine"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def stage_dir(base_dir: str | os.PathLike, stage: str, model_tag: str) -> Path:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    return Path(base_dir) / f"{stage}_checkpoints" / model_tag


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def parse_step(name: str) -> int | None:
    match = _STEP_DIR.match(name)
    return int(match.group(1)) if match else None


def sha256_file(path: Path, chunk_size: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON so that readers see the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


@dataclass(frozen=True)
class Checkpoint:
    """A verified, complete checkpoint directory."""

    step: int
    path: Path
    manifest: dict[str, Any]

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.manifest["files"]

    @property
    def total_bytes(self) -> int:
        return sum(entry["size"] for entry in self.files.values())

    @property
    def done(self) -> bool:
        """True for the final checkpoint of a finished stage: relaunching must not rerun the stage."""
        return bool(self.manifest.get("done", False))

    def meta(self) -> dict[str, Any]:
        return json.loads((self.path / META_NAME).read_text())


def write_manifest(ckpt_dir: Path, step: int, finished: dict[str, dict[str, Any]] | None = None,
                   **fields: Any) -> dict[str, Any]:
    """Hash every file in `ckpt_dir` and write MANIFEST.json last: from then on the directory is complete.

    `finished`: entries their writers already computed (fsynced, then hashed), taken as they are once the
    size on disk agrees; every other file is hashed here. `fields` (stage, model_tag, run_id, done, ...) are
    stored alongside, so torch-free readers such as the sidecar learn what they need without opening
    meta.json.
    """
    finished = finished or {}
    files = {}
    for path in sorted(ckpt_dir.iterdir()):
        if path.name == MANIFEST_NAME:
            continue
        if not path.is_file():
            raise CheckpointInvalid(f"{path}: checkpoints hold plain files only")
        check_format(path)
        entry = finished.get(path.name) or {"size": path.stat().st_size, "sha256": sha256_file(path)}
        if entry["size"] != path.stat().st_size:
            raise CheckpointInvalid(f"{path}: {path.stat().st_size} bytes, its writer reported "
                                    f"{entry['size']}")
        files[path.name] = entry
    if missing := sorted(finished.keys() - files.keys()):
        raise CheckpointInvalid(f"{ckpt_dir / missing[0]}: reported finished by its writer but missing")
    manifest = {"format": FORMAT, "step": step, **fields, "files": files}
    with open(ckpt_dir / MANIFEST_NAME, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    return manifest


def read_manifest(ckpt_dir: Path) -> dict[str, Any]:
    """Parse and sanity-check MANIFEST.json against the directory name; does not look at the files."""
    manifest_path = ckpt_dir / MANIFEST_NAME
    step = parse_step(ckpt_dir.name)
    if step is None:
        raise CheckpointInvalid(f"{ckpt_dir}: not a step_NNNNNN directory")
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise CheckpointInvalid(f"{manifest_path}: missing (the checkpoint was never finished)") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointInvalid(f"{manifest_path}: not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointInvalid(f"{manifest_path}: unknown format {manifest.get('format')!r}")
    if manifest.get("step") != step:
        raise CheckpointInvalid(f"{manifest_path}: written for step {manifest.get('step')}, not {step}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise CheckpointInvalid(f"{manifest_path}: lists no files")
    for name, entry in files.items():
        if "/" in name or name.startswith(".") or name == MANIFEST_NAME:
            raise CheckpointInvalid(f"{manifest_path}: bad file name {name!r}")
        if not isinstance(entry, dict) or not isinstance(entry.get("size"), int) or "sha256" not in entry:
            raise CheckpointInvalid(f"{manifest_path}: bad entry for {name!r}")
    return manifest


def verify(ckpt_dir: Path, *, full_hash: bool = False) -> Checkpoint:
    """Return the checkpoint if it is complete, else raise CheckpointInvalid naming the file.

    Sizes and formats are always checked (cheap); sha256 only with `full_hash` (restore, `--verify`),
    since hashing a multi-GB checkpoint on every scan would stall start-up.
    """
    manifest = read_manifest(ckpt_dir)
    check_files(ckpt_dir, manifest, full_hash=full_hash)
    return Checkpoint(step=manifest["step"], path=ckpt_dir, manifest=manifest)


def check_files(directory: Path, manifest: dict[str, Any], *, full_hash: bool = False) -> None:
    """Raise CheckpointInvalid unless `directory` holds exactly the files `manifest` lists, as listed, among
    them every required one, and a sound meta.json.

    The file half of `verify`, for a manifest that came from elsewhere (the Hub) or a directory not yet
    published under its step name.
    """
    missing = [name for name in REQUIRED_FILES if name not in manifest["files"]]
    if problem := optimizer_state_problem(manifest["files"]):
        missing.append(problem)
    if missing:
        raise CheckpointInvalid(f"{directory / MANIFEST_NAME}: lists no {', '.join(missing)}")
    present = {p.name for p in directory.iterdir()} - {MANIFEST_NAME}
    if unlisted := sorted(present - set(manifest["files"])):
        raise CheckpointInvalid(f"{directory / unlisted[0]}: not listed in the manifest")
    for name, entry in manifest["files"].items():
        path = directory / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise CheckpointInvalid(f"{path}: listed in the manifest but missing") from None
        if size != entry["size"]:
            raise CheckpointInvalid(f"{path}: {size} bytes, manifest says {entry['size']} (truncated?)")
        check_format(path)
        if full_hash and sha256_file(path) != entry["sha256"]:
            raise CheckpointInvalid(f"{path}: sha256 does not match the manifest (corrupted or tampered)")
    check_meta(directory / META_NAME, manifest)


def step_dirs(directory: Path) -> list[tuple[int, Path]]:
    """Published step directories (complete or not), highest step first."""
    if not directory.is_dir():
        return []
    found = [(parse_step(p.name), p) for p in directory.iterdir() if p.is_dir()]
    return sorted(((s, p) for s, p in found if s is not None), reverse=True)


def complete_checkpoints(directory: Path, *, full_hash: bool = False) -> list[Checkpoint]:
    """Every complete checkpoint under a stage directory, highest step first; warns about the rest."""
    complete = []
    for _, path in step_dirs(directory):
        try:
            complete.append(verify(path, full_hash=full_hash))
        except CheckpointInvalid as exc:
            log.warning("skipping incomplete checkpoint: %s", exc)
    return complete


def latest(directory: Path, *, full_hash: bool = False) -> Checkpoint | None:
    """The highest step whose manifest verifies: the only definition of "latest" in phoenix."""
    for _, path in step_dirs(directory):
        try:
            return verify(path, full_hash=full_hash)
        except CheckpointInvalid as exc:
            log.warning("skipping incomplete checkpoint: %s", exc)
    return None


def quarantine(path: Path, reason: str) -> Path:
    """Move a damaged step directory (or run file) of $NANOCHAT_BASE_DIR/<folder>/<tag>/ to
    $NANOCHAT_BASE_DIR/quarantine/<folder>/<tag>/.

    Kept, never deleted: it may be the only copy of that step. One warning line names where it went.
    """
    tag_dir = path.parent
    base_dir = tag_dir.parent.parent
    aside_dir = base_dir / QUARANTINE_DIR / tag_dir.parent.name / tag_dir.name
    aside_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    aside = aside_dir / f"{path.name}.{stamp}-{uuid.uuid4().hex[:6]}"
    os.rename(path, aside)
    fsync_dir(tag_dir)
    what = "checkpoint" if parse_step(path.name) is not None else "file"
    log.warning("%s quarantined path=%s to=%s reason=%s", what, path, aside, reason)
    return aside


def read_run_file(path: Path) -> dict[str, Any] | None:
    """runs/<tag>/run.json (the run's ids, the SFT dataset's pin), or None if there is none.

    A damaged one (torn, not an object, ids missing) is quarantined like a damaged checkpoint and None
    returned: restore brings the Hub's copy back, the trainer rebuilds the ids from the checkpoint it resumes.
    """
    try:
        record = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, json.JSONDecodeError):
        record = None
    if isinstance(record, dict) and all(isinstance(record.get(key), str) for key in RUN_KEYS):
        return record
    quarantine(path, "not a JSON object with the run's ids")
    return None


def latest_or_quarantine(directory: Path, *, full_hash: bool = True) -> Checkpoint | None:
    """`latest`, after moving aside every damaged step directory newer than it.

    A damaged directory at a step the run will save again would otherwise block that save forever
    (published checkpoints are never overwritten). With no good checkpoint at all nothing is moved:
    whether to start over is not this function's call.
    """
    damaged: list[tuple[Path, str]] = []
    for _, path in step_dirs(directory):
        try:
            ckpt = verify(path, full_hash=full_hash)
        except CheckpointInvalid as exc:
            damaged.append((path, str(exc)))
            continue
        for bad_path, reason in damaged:
            quarantine(bad_path, reason)
        return ckpt
    for _, reason in damaged:
        log.warning("skipping incomplete checkpoint: %s", reason)
    return None


def new_tmp_dir(directory: Path, step: int) -> Path:
    """A private, not-yet-visible directory to write a checkpoint into before publishing it."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{TMP_PREFIX}{step_dir_name(step)}-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    return path


def publish(tmp_dir: Path, step: int, finished: dict[str, dict[str, Any]] | None = None,
            **manifest_fields: Any) -> Checkpoint:
    """fsync the files, write the manifest last, rename into place and fsync the parent.

    `finished`: the entries (size, sha256) of files their writers already fsynced and hashed; call
    this only once every writer has reported. Raises FileExistsError if a directory for this step already
    exists: a published checkpoint is immutable, so two writers can never interleave files of one step.
    """
    for path in tmp_dir.iterdir():
        if path.name not in (finished or {}):
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    manifest = write_manifest(tmp_dir, step, finished, **manifest_fields)
    check_files(tmp_dir, manifest)  # what is published must be complete: refused before it is visible
    return _rename_into_place(tmp_dir, step)


def publish_copy(tmp_dir: Path, manifest: dict[str, Any], *, full_hash: bool = True) -> Checkpoint:
    """Publish a copy of a checkpoint (e.g. restored from the Hub) under its original manifest.

    Same atomic rule as `publish`, but the manifest is the one the checkpoint was published with, and the
    files are checked against it (sha256 too, unless the caller just did that) before anything is visible.
    """
    for path in tmp_dir.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    check_files(tmp_dir, manifest, full_hash=full_hash)
    with open(tmp_dir / MANIFEST_NAME, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    return _rename_into_place(tmp_dir, manifest["step"])


def _rename_into_place(tmp_dir: Path, step: int) -> Checkpoint:
    fsync_dir(tmp_dir)
    final = tmp_dir.parent / step_dir_name(step)
    if final.exists():
        raise FileExistsError(f"{final} already exists; published checkpoints are never overwritten")
    os.rename(tmp_dir, final)
    fsync_dir(final.parent)
    return verify(final)


def clean_tmp(directory: Path) -> list[Path]:
    """Remove temporary directories left by a crash mid-save. Call only when no writer is running."""
    if not directory.is_dir():
        return []
    removed = [p for p in directory.iterdir() if p.name.startswith(TMP_PREFIX)]
    for path in removed:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return removed


def prune(directory: Path, keep_last: int, protect: Iterable[int] = ()) -> list[Path]:
    """Delete complete checkpoints older than the newest `keep_last`; never the only complete one.

    Incomplete directories are left alone for inspection. `protect` names steps to keep regardless
    (e.g. not yet on the Hub).
    """
    keep_last = max(1, keep_last)
    protected = set(protect)
    removed = []
    for ckpt in complete_checkpoints(directory)[keep_last:]:
        if ckpt.step in protected:
            continue
        # Rename first so a crash mid-delete never leaves a half-deleted dir that looks like a step.
        doomed = ckpt.path.with_name(f"{TMP_PREFIX}deleting-{ckpt.path.name}")
        os.rename(ckpt.path, doomed)
        shutil.rmtree(doomed)
        removed.append(ckpt.path)
    if removed:
        fsync_dir(directory)
    return removed
