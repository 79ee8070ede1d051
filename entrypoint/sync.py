"""`phoenix sync`: the sidecar that pushes every complete checkpoint to the Hub, one commit per checkpoint.

A CommitScheduler made safe for checkpoints: every HF_SYNC_INTERVAL seconds, at once when the trainer
stops, and once more on SIGTERM, it pushes, oldest first, each local checkpoint that is complete per
`trainer.checkpoint_layout` and not yet complete on the Hub. Each goes up as ONE commit holding every file
plus MANIFEST.json, so the Hub never shows a partial checkpoint as complete, whatever dies when. Commits
carry `parent_commit` and are refused when a newer launch has claimed the repo (see
`hub.claim_generation`). Hub outages are retried and caught up on; the trainer never waits for us.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import click
from huggingface_hub import CommitOperationDelete

from entrypoint.hub import (
    RUN_FILE,
    TOKENIZER_PATH,
    TRAINER_STATUS_FILE,
    Fenced,
    HeadMoved,
    Hub,
    HubConfig,
    HubError,
    HubFatal,
    HubSnapshot,
    add_operation,
    kv,
    local_generation,
    setup_hub_logging,
)
from trainer import checkpoint_layout as layout

log = logging.getLogger("phoenix.sync")

_PASS_ATTEMPTS = 3  # a pass restarts from a fresh snapshot when someone else committed meanwhile
_FIRST_FAILURE_DELAY = 5.0
PRUNE_TITLE = "prune"  # the title of prune commits starts with it: the history holds pruned files


@dataclass
class PassResult:
    """What one sync pass did; `ok` is False if anything was left undone."""

    pushed: list[tuple[str, int]] = field(default_factory=list)
    pruned: list[tuple[str, int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    fenced: bool = False

    @property
    def ok(self) -> bool:
        return not self.errors and not self.fenced


class Syncer:
    """Pushes what is complete locally and missing on the Hub; one instance per sidecar process."""

    def __init__(self, cfg: HubConfig, hub: Hub | None = None):
        self.cfg = cfg
        self.hub = hub or Hub(cfg)
        self._repo_ready = False

    def sync_once(self) -> PassResult:
        """One pass. Raises HubFatal (bad token, no access, bad repo id); every other problem is reported."""
        result = PassResult()
        try:
            if not self._repo_ready:
                self.hub.ensure_repo()
                self._repo_ready = True
            for _ in range(_PASS_ATTEMPTS):
                try:
                    self._pass(result)
                    break
                except HeadMoved:
                    log.info(kv(event="head_moved", action="re-reading the Hub"))
            else:
                result.errors.append("the Hub repo kept changing during the pass")
        except HubFatal:
            raise
        except Fenced as exc:
            result.fenced = True
            log.error(kv(event="fenced", detail=str(exc), action="not pushing or deleting anything"))
        except HubError as exc:
            result.errors.append(str(exc))
            log.error(kv(event="sync_failed", error=str(exc)))
        log.info(
            kv(
                event="pass_done",
                ok=result.ok,
                pushed=len(result.pushed),
                pruned=len(result.pruned),
                errors=len(result.errors),
            )
        )
        return result

    def _pass(self, result: PassResult) -> None:
        snapshot = self.hub.snapshot()
        own, theirs = local_generation(self.cfg), self.hub.generation(snapshot)
        if theirs > own:
            hint = " (this volume has not claimed one yet: the entrypoint does at launch)" if own == 0 else ""
            raise Fenced(f"fenced: generation {own} < {theirs}{hint}")
        # Every commit below names the head it was planned on: if anyone (a newer launch claiming the repo)
        # commits in between, the Hub answers 412 and the pass starts over from a fresh snapshot.
        head = snapshot.head
        extras = self._changed_extras(snapshot)
        on_hub = {stage: set(snapshot.complete_steps(self.cfg, stage)) for stage in layout.STAGES}
        for stage in layout.STAGES:
            for ckpt in self._to_push(stage, on_hub[stage]):
                try:
                    ckpt = layout.verify(ckpt.path, full_hash=True)
                    head = self._push(snapshot, stage, ckpt, extras, head)
                except (layout.CheckpointInvalid, OSError, ValueError) as exc:
                    if not ckpt.path.is_dir():  # pruned by the trainer meanwhile: nothing to push
                        log.warning(kv(event="skip_vanished", stage=stage, step=ckpt.step))
                        continue
                    if not isinstance(exc, layout.CheckpointInvalid):
                        raise
                    result.errors.append(str(exc))
                    log.error(kv(event="skip_corrupt", stage=stage, step=ckpt.step, error=str(exc)))
                    continue
                extras = []  # rode along with this checkpoint
                on_hub[stage].add(ckpt.step)
                result.pushed.append((stage, ckpt.step))
        if extras:
            paths = ", ".join(op.path_in_repo for op in extras)
            head = self.hub.commit(extras, f"update {paths} of {self.cfg.model_tag}", parent=head)
            log.info(kv(event="pushed_extras", paths=paths, commit=head[:12]))
        if self.cfg.keep_last is not None:
            head = self._prune(on_hub, head, result)
            self._squash(head)

    def _to_push(self, stage: str, on_hub: set[int]) -> list[layout.Checkpoint]:
        """Local complete checkpoints missing on the Hub, newest first (if the instance dies mid-pass, the
        one resume needs is already up); never one HF_KEEP_LAST would prune."""
        local = layout.complete_checkpoints(layout.stage_dir(self.cfg.base_dir, stage, self.cfg.model_tag))
        missing = sorted((c for c in local if c.step not in on_hub), key=lambda c: c.step, reverse=True)
        if self.cfg.keep_last is not None:
            # Else a checkpoint pruned from the Hub but still on the volume would be re-pushed forever.
            kept = sorted(on_hub | {c.step for c in missing}, reverse=True)[: self.cfg.keep_last]
            missing = [c for c in missing if c.step in kept]
        return missing

    def _push(
        self, snapshot: HubSnapshot, stage: str, ckpt: layout.Checkpoint, extras: list[Any], head: str
    ) -> str:
        folder = self.cfg.checkpoint_path(stage, ckpt.step)
        ops = [
            add_operation(f"{folder}/{name}", ckpt.path / name, entry["sha256"])
            for name, entry in sorted(ckpt.files.items())
            if not snapshot.same(f"{folder}/{name}", ckpt.path / name, entry["sha256"])
        ]
        nbytes = sum(ckpt.files[op.path_in_repo.rsplit("/", 1)[1]]["size"] for op in ops)
        ops.append(add_operation(f"{folder}/{layout.MANIFEST_NAME}", ckpt.path / layout.MANIFEST_NAME))
        title = f"step {ckpt.step} of {self.cfg.model_tag} ({stage})"
        log.info(kv(event="push_start", stage=stage, step=ckpt.step, files=len(ops), bytes=nbytes))
        start = time.monotonic()
        head = self.hub.commit(ops + extras, title, parent=head)
        seconds = max(time.monotonic() - start, 1e-6)
        log.info(
            kv(
                event="push_done",
                stage=stage,
                step=ckpt.step,
                bytes=nbytes,
                seconds=round(seconds, 2),
                mb_s=round(nbytes / seconds / 1e6, 1),
                extras=len(extras),
                commit=head[:12],
            )
        )
        return head

    def _changed_extras(self, snapshot: HubSnapshot) -> list[Any]:
        """Tokenizer and run identity, when they differ from the Hub's copy."""
        paths = [TOKENIZER_PATH, self.cfg.run_path(RUN_FILE)]
        return [
            add_operation(path, self.cfg.local(path))
            for path in paths
            if self.cfg.local(path).is_file() and not snapshot.same(path, self.cfg.local(path))
        ]

    def _prune(self, on_hub: dict[str, set[int]], head: str, result: PassResult) -> str:
        """Delete, in one commit, complete checkpoints older than the newest HF_KEEP_LAST of each stage."""
        assert self.cfg.keep_last is not None
        doomed = [
            (stage, step)
            for stage in layout.STAGES
            for step in sorted(on_hub[stage], reverse=True)[max(1, self.cfg.keep_last) :]
        ]
        if not doomed:
            return head
        ops = [CommitOperationDelete(self.cfg.checkpoint_path(s, n) + "/", is_folder=True) for s, n in doomed]
        head = self.hub.commit(
            ops, f"{PRUNE_TITLE} {self.cfg.model_tag}: keep last {self.cfg.keep_last}", parent=head
        )
        for stage, step in doomed:
            on_hub[stage].discard(step)
            result.pruned.append((stage, step))
            log.info(kv(event="pruned", stage=stage, step=step, commit=head[:12]))
        return head

    def _squash(self, head: str) -> None:
        """Free what pruning deleted: on the Hub a delete commit frees nothing, the history keeps every file.

        Squashes whenever the history holds a prune commit, so a squash that was skipped or killed is done
        by the next pass. The Hub's squash takes no parent commit, so we check right before it that the head
        is still ours and no newer generation claimed the repo; a squash keeps the head's tree as it is,
        so even a claim landing in the remaining instant loses no file (its next commit re-plans on a 412).
        """
        if not any(c.title.startswith(PRUNE_TITLE) for c in self.hub.commits()):
            return
        snapshot = self.hub.snapshot()
        if snapshot.head != head or self.hub.generation(snapshot) > local_generation(self.cfg):
            log.info(kv(event="squash_skipped", reason="the repo moved on since our prune"))
            return
        used = self.hub.used_storage()
        self.hub.squash(f"squash the history of {self.cfg.model_tag} to free pruned checkpoints")
        log.info(kv(event="squashed", before_bytes=used if used is not None else "-",
                    after_bytes=self.hub.used_storage() or "-"))


# ---------------------------------------------------------------------------------------------- the loop


STALE_S = 120  # a "running" status older than this was left by a killed entrypoint


def read_trainer_status(cfg: HubConfig) -> dict[str, Any] | None:
    """The trainer's status file, or None if absent, unreadable or left by an older launch."""
    try:
        status = json.loads(cfg.local(cfg.run_path(TRAINER_STATUS_FILE)).read_text())
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(status, dict) or not isinstance(status.get("status"), str):
        return None
    generation = status.get("generation")
    if isinstance(generation, int) and generation < local_generation(cfg):
        return None
    updated = status.get("updated")
    stale = isinstance(updated, (int, float)) and time.time() - updated > STALE_S
    if status["status"] == "running" and stale:
        # The entrypoint refreshes the file every 30 s while alive: silence means it was killed outright.
        return {**status, "status": "lost"}
    return status


def run_loop(
    cfg: HubConfig,
    *,
    exit_when_stopped: bool = False,
    poll_seconds: float = 5.0,
    stop_wait_seconds: float = 600.0,
    stop: threading.Event | None = None,
    syncer: Syncer | None = None,
) -> int:
    """Sync every HF_SYNC_INTERVAL seconds and as soon as the trainer stops; returns an exit code.

    A failed pass is retried sooner (5 s, doubling, capped at the interval). With `exit_when_stopped`,
    returns after the final pass once the trainer has stopped. When `stop` is set (SIGTERM), waits up to
    `stop_wait_seconds` for a running trainer to stop (its emergency checkpoint), pushes once more, returns.
    """
    stop = stop or threading.Event()
    syncer = syncer or Syncer(cfg)
    log.info(
        kv(
            event="start",
            repo=cfg.repo_id,
            repo_type=cfg.repo_type,
            model_tag=cfg.model_tag,
            interval_s=cfg.sync_interval,
            keep_last=cfg.keep_last if cfg.keep_last is not None else "all",
            generation=local_generation(cfg),
        )
    )
    failures = 0
    next_pass = time.monotonic()
    seen, generation = read_trainer_status(cfg), local_generation(cfg)
    while not stop.is_set():
        status = read_trainer_status(cfg)
        trainer_stopped = status is not None and status["status"] != "running"
        just_stopped = trainer_stopped and status != seen
        seen = status
        if just_stopped:
            log.info(kv(event="trainer_stopped", status=status["status"], action="final sync"))
        # A launch on this volume just claimed a generation: what was fenced may be pushed now.
        current = local_generation(cfg)
        claimed, generation = current != generation, current
        if just_stopped or claimed or time.monotonic() >= next_pass:
            result = syncer.sync_once()
            failures = 0 if result.ok or result.fenced else failures + 1
            delay = cfg.sync_interval if failures == 0 else _FIRST_FAILURE_DELAY * 2 ** (failures - 1)
            next_pass = time.monotonic() + min(delay, cfg.sync_interval)
            if exit_when_stopped and trainer_stopped and (result.ok or result.fenced):
                log.info(kv(event="exit", reason="the trainer stopped and the final sync is done"))
                return 0 if result.ok else 1
        stop.wait(max(0.0, min(poll_seconds, next_pass - time.monotonic())))
    return _final_push(cfg, syncer, poll_seconds, stop_wait_seconds)


def _final_push(cfg: HubConfig, syncer: Syncer, poll_seconds: float, stop_wait_seconds: float) -> int:
    """On SIGTERM: let a running trainer finish its emergency checkpoint (both may be stopped at once)."""
    deadline = time.monotonic() + stop_wait_seconds
    while (status := read_trainer_status(cfg)) is not None and status["status"] == "running":
        if time.monotonic() >= deadline:
            log.warning(
                kv(event="trainer_still_running", waited_s=stop_wait_seconds, action="pushing anyway")
            )
            break
        time.sleep(poll_seconds)
    log.info(kv(event="stopping", action="final sync"))
    return 0 if syncer.sync_once().ok else 1


@click.command("sync")
@click.option("--once", is_flag=True, help="Do one pass and exit (non-zero if anything failed).")
@click.option("--exit-when-stopped", is_flag=True, help="Exit after the final sync once the trainer stops.")
@click.option(
    "--poll-seconds", type=float, default=5.0, show_default=True, help="How often to check the trainer."
)
@click.option(
    "--stop-wait-seconds",
    type=float,
    default=600.0,
    show_default=True,
    help="On SIGTERM, how long to wait for a running trainer to stop before the final push.",
)
def sync_command(once: bool, exit_when_stopped: bool, poll_seconds: float, stop_wait_seconds: float) -> None:
    """Push every complete checkpoint to the Hub repo HF_REPO_ID, one commit each (the sidecar)."""
    cfg = HubConfig.from_env_or_exit()
    setup_hub_logging(cfg.base_dir / "logs" / "hf_sync.log")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if cfg.repo_id is None:
        log.info("HF_REPO_ID not set: Hub sync and restore are off")
        if not (once or exit_when_stopped):
            stop.wait()  # idle rather than exit, so a restart policy does not loop on us
        sys.exit(0)
    try:
        if once:
            sys.exit(0 if Syncer(cfg).sync_once().ok else 1)
        code = run_loop(
            cfg,
            exit_when_stopped=exit_when_stopped,
            poll_seconds=poll_seconds,
            stop_wait_seconds=stop_wait_seconds,
            stop=stop,
        )
        sys.exit(code)
    except HubFatal as exc:
        log.error(kv(event="fatal", error=str(exc)))
        sys.exit(2)
