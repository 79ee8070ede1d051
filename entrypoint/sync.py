"""`phoenix sync`: the sidecar that pushes every complete checkpoint to the Hub, one commit per checkpoint.

A CommitScheduler made safe for checkpoints: every HF_SYNC_INTERVAL seconds, at once when the trainer
stops, and once more on SIGTERM, it pushes, newest first, each local checkpoint that is complete per
`trainer.checkpoint_layout` and not yet complete on the Hub. Each goes up as ONE commit holding every file
plus MANIFEST.json, so the Hub never shows a partial checkpoint as complete, whatever dies when. Commits
carry `parent_commit` and are refused when a newer launch has claimed the repo (see
`hub.claim_generation`). Right after each push, checkpoints beyond HF_KEEP_LAST (beyond the final one, for
a finished stage) are pruned and the history squashed, which is what frees their storage on the Hub: a
stage peaks at HF_KEEP_LAST + 1 checkpoints. Hub outages are retried and caught up on; the trainer never
waits for us.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from huggingface_hub import CommitOperationDelete

from entrypoint.hub import (
    EVAL_DIR,
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
    Pause,
    add_operation,
    generation_of,
    kv,
    local_generation,
    setup_hub_logging,
    short_error,
)
from entrypoint.logs import redact
from trainer import checkpoint_layout as layout
from trainer import fencing

log = logging.getLogger("phoenix.sync")

_PASS_ATTEMPTS = 3  # a pass restarts from a fresh snapshot when someone else committed meanwhile
_FIRST_FAILURE_DELAY = 5.0
PRUNE_TITLE = "prune"  # the title of prune commits starts with it: the history holds pruned files
# compose.yaml gives the sidecar a 15 min stop_grace_period; a minute less leaves time to exit cleanly.
DEFAULT_GRACE_SECONDS = 840.0
_FINAL_PUSH_THREAD = "final-push"


def hub_keeps(cfg: HubConfig, stage: str, steps: set[int]) -> set[int]:
    """Which of these steps of `stage` the Hub keeps: the newest HF_KEEP_LAST, or only the newest once it is
    the stage's final checkpoint (restore needs nothing older, and SFT starts from the base's final one)."""
    newest = sorted(steps, reverse=True)
    if cfg.keep_last is None or not newest:
        return set(newest)
    return set(newest[: 1 if _marked_done(cfg, stage, newest[0]) else cfg.keep_last])


def _marked_done(cfg: HubConfig, stage: str, step: int) -> bool:
    """True if the volume's copy of this step marks its stage done (no copy: not known, so False)."""
    folder = layout.stage_dir(cfg.base_dir, stage, cfg.model_tag) / layout.step_dir_name(step)
    try:
        return bool(layout.read_manifest(folder).get("done", False))
    except layout.CheckpointInvalid:
        return False


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

    def __init__(self, cfg: HubConfig, hub: Hub | None = None, pause: Pause | None = None):
        self.cfg = cfg
        self.hub = hub or Hub(cfg, pause=pause)
        self.pause = self.hub.pause
        self._repo_ready = False
        self._bad_extras: dict[str, tuple[int, int]] = {}  # path -> (size, mtime_ns) already warned about

    def sync_once(self) -> PassResult:
        """One pass. Raises HubFatal (bad token, no access, bad repo id); anything else, whatever raised it
        (the Hub, Xet, a file the trainer pruned meanwhile), is a failed pass: one log line, and the loop
        retries. The sidecar must outlive every fault, or the final push on SIGTERM is lost too."""
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
        except Exception as exc:
            error = redact(str(exc) if isinstance(exc, HubError) else short_error(exc))
            result.errors.append(error)
            log.error(kv(event="sync_failed", error_type=type(exc).__name__, error=error))
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
        claim = self.hub.claim_record(snapshot)
        own, theirs = local_generation(self.cfg), generation_of(claim)
        if theirs > own:
            hint = " (this volume has not claimed one yet: the entrypoint does at launch)" if own == 0 else ""
            if own > 0:  # a launch elsewhere took the run over: the trainer here stops at its next save
                fencing.write_marker(self.cfg.base_dir, self.cfg.model_tag, own, claim)
            raise Fenced(f"fenced: generation {own} < {theirs}{hint}")
        # Every commit below names the head it was planned on: if anyone (a newer launch claiming the repo)
        # commits in between, the Hub answers 412 and the pass starts over from a fresh snapshot.
        head = snapshot.head
        pruning = self.cfg.keep_last is not None
        if pruning and any(c.title.startswith(PRUNE_TITLE) for c in self.hub.commits()):
            head = self._squash(head)  # left by a killed or skipped squash: free it before pushing more
        extras = self._changed_extras(snapshot)
        on_hub = {stage: set(snapshot.complete_steps(self.cfg, stage)) for stage in layout.STAGES}
        for stage in layout.STAGES:
            for ckpt in self._to_push(stage, on_hub[stage]):
                if ckpt.step not in hub_keeps(self.cfg, stage, on_hub[stage] | {ckpt.step}):
                    continue  # the prune would delete it at once (pruned before, or older than the final)
                try:
                    ckpt = layout.verify(ckpt.path, full_hash=True)
                    head = self._push(snapshot, stage, ckpt, extras, head)
                except (HeadMoved, Fenced, HubFatal):
                    raise
                except Exception as exc:
                    # Pruned by the trainer while we hashed or uploaded it (the client then raises
                    # FileNotFoundError, ValueError or RuntimeError): nothing to push.
                    if not ckpt.path.is_dir():
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
                # Now, not at the end of the pass: a pass catching up on several checkpoints would
                # otherwise hold them all on the Hub at once.
                head = self._prune(on_hub, head, result)
        if extras:
            paths = ", ".join(op.path_in_repo for op in extras)
            head = self.hub.commit(extras, f"update {paths} of {self.cfg.model_tag}", parent=head)
            log.info(kv(event="pushed_extras", paths=paths, commit=head[:12]))
        self._prune(on_hub, head, result)  # HF_KEEP_LAST lowered, or a stage finished by an earlier pass

    def _to_push(self, stage: str, on_hub: set[int]) -> list[layout.Checkpoint]:
        """Local complete checkpoints missing on the Hub, newest first: if the instance dies mid-pass, the
        one resume needs is already up."""
        local = layout.complete_checkpoints(layout.stage_dir(self.cfg.base_dir, stage, self.cfg.model_tag))
        return sorted((c for c in local if c.step not in on_hub), key=lambda c: c.step, reverse=True)

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
        """Tokenizer, run identity and evaluation results (`runs/<tag>/eval/*.json`, which restore brings
        back with the other run files), when they differ from the Hub's copy and are sound: a corrupt or
        truncated local file never replaces the Hub's good one (a restore would bring it back)."""
        ops = []
        eval_dir = self.cfg.local(self.cfg.run_path(EVAL_DIR))
        evals = sorted(p.relative_to(self.cfg.base_dir).as_posix() for p in eval_dir.glob("*.json"))
        for path in (TOKENIZER_PATH, self.cfg.run_path(RUN_FILE), *evals):
            local = self.cfg.local(path)
            if not local.is_file() or snapshot.same(path, local):
                continue
            problem = _json_problem(local, "model" if path == TOKENIZER_PATH else None)
            if problem is None:
                ops.append(add_operation(path, local))
                continue
            stat = local.stat()
            if self._bad_extras.get(path) != (stat.st_size, stat.st_mtime_ns):  # once per version of it
                self._bad_extras[path] = (stat.st_size, stat.st_mtime_ns)
                log.warning(kv(event="skip_bad_file", path=path, problem=problem,
                               action="not pushed; the Hub keeps its copy"))
        return ops

    def _prune(self, on_hub: dict[str, set[int]], head: str, result: PassResult) -> str:
        """Delete, in one commit, the complete checkpoints `hub_keeps` leaves out, then squash the history to
        free them; returns the head to commit on next."""
        doomed = [
            (stage, step)
            for stage in layout.STAGES
            for step in sorted(on_hub[stage] - hub_keeps(self.cfg, stage, on_hub[stage]), reverse=True)
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
        return self._squash(head)

    def _squash(self, head: str) -> str:
        """Free what pruning deleted: on the Hub a delete commit frees nothing, the history keeps every file.
        Returns the new head, or `head` if the squash was skipped (the next commit on it then gets a 412).

        A pass first squashes a history that still holds a prune commit, so a squash that was skipped or
        killed is done before anything more is pushed. The Hub's squash takes no parent commit, so we check
        right before it that the head is still ours and no newer generation claimed the repo; a squash keeps
        the head's tree as it is, so even a claim landing in the remaining instant loses no file, and the
        generation is read again on the squashed head before anything is committed on it.
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


def _json_problem(path: Path, required_key: str | None) -> str | None:
    """Why `path` is not a sound JSON object (with `required_key`), or None if it is."""
    try:
        obj = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        return f"not valid JSON ({str(exc).splitlines()[0]})"
    if not isinstance(obj, dict) or (required_key is not None and required_key not in obj):
        return f"not a JSON object with {required_key!r}" if required_key else "not a JSON object"
    return None


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
    grace_seconds: float = DEFAULT_GRACE_SECONDS,
    stop: threading.Event | None = None,
    syncer: Syncer | None = None,
) -> int:
    """Sync every HF_SYNC_INTERVAL seconds and as soon as the trainer stops; returns an exit code.

    A failed pass is retried sooner (5 s, doubling, capped at the interval). A setting only the user can
    fix (HubFatal) is logged once per interval and checked again, never an exit: `restart: unless-stopped`
    would relaunch the sidecar in a loop. With `exit_when_stopped`, returns after the final pass once the
    trainer has stopped. When `stop` is set (SIGTERM), every wait ends at once; it then waits up to
    `stop_wait_seconds` for a running trainer to stop (its emergency checkpoint) and pushes once more, all
    within `grace_seconds` of the stop.
    """
    stop = stop or threading.Event()
    syncer = syncer or Syncer(cfg, pause=Pause(stop))
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
    fatal = False  # the last pass hit a setting only the user can fix
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
            try:
                result = syncer.sync_once()
            except HubFatal as exc:
                _log_fatal(exc, f"pushing nothing; checking again in {cfg.sync_interval:.0f}s")
                fatal = True
                if exit_when_stopped and trainer_stopped:
                    return 2
                next_pass = time.monotonic() + cfg.sync_interval
                continue
            fatal = False
            failures = 0 if result.ok or result.fenced else failures + 1
            delay = cfg.sync_interval if failures == 0 else _FIRST_FAILURE_DELAY * 2 ** (failures - 1)
            next_pass = time.monotonic() + min(delay, cfg.sync_interval)
            if exit_when_stopped and trainer_stopped and (result.ok or result.fenced):
                log.info(kv(event="exit", reason="the trainer stopped and the final sync is done"))
                return 0 if result.ok else 1
        stop.wait(max(0.0, min(poll_seconds, next_pass - time.monotonic())))
    if fatal:  # already said; a final push would only fail the same way
        return 2
    return _final_push(cfg, syncer, poll_seconds, stop_wait_seconds, grace_seconds)


def _log_fatal(exc: HubFatal, action: str) -> None:
    log.error(kv(event="fatal", error=redact(str(exc)), action=action))


def _final_push(
    cfg: HubConfig, syncer: Syncer, poll_seconds: float, stop_wait_seconds: float, grace_seconds: float
) -> int:
    """On SIGTERM: let a running trainer finish its emergency checkpoint (both may be stopped at once),
    then push once more; all of it bounded by `grace_seconds`, after which Docker would SIGKILL us."""
    deadline = time.monotonic() + grace_seconds
    syncer.pause.deadline = deadline  # retry waits that would overrun it are not started
    trainer_deadline = min(time.monotonic() + stop_wait_seconds, deadline)
    while (status := read_trainer_status(cfg)) is not None and status["status"] == "running":
        if time.monotonic() >= trainer_deadline:
            log.warning(
                kv(event="trainer_still_running", waited_s=stop_wait_seconds, action="pushing anyway")
            )
            break
        time.sleep(poll_seconds)
    log.info(kv(event="stopping", action="final sync", seconds_left=round(deadline - time.monotonic(), 1)))
    outcome: dict[str, Any] = {}

    def push() -> None:
        try:
            outcome["result"] = syncer.sync_once()
        except HubFatal as exc:
            outcome["fatal"] = exc

    # An upload cannot be interrupted from outside: the pass runs in a thread we may leave behind (the
    # Hub shows a commit whole or not at all, so nothing half-pushed is left either way).
    pusher = threading.Thread(target=push, name=_FINAL_PUSH_THREAD, daemon=True)
    pusher.start()
    pusher.join(max(0.0, deadline - time.monotonic()))
    if pusher.is_alive():
        log.error(
            kv(
                event="final_push_timeout",
                grace_s=grace_seconds,
                action="exiting within the stop grace period; the next sidecar pushes what is left",
            )
        )
        return 1
    if "fatal" in outcome:
        _log_fatal(outcome["fatal"], "exiting")
        return 2
    return 0 if outcome["result"].ok else 1


def _exit(code: int) -> None:
    """sys.exit, unless a final push was left running: then leave at once rather than wait for it."""
    if any(t.name == _FINAL_PUSH_THREAD and t.is_alive() for t in threading.enumerate()):
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


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
@click.option(
    "--grace-seconds",
    type=float,
    default=DEFAULT_GRACE_SECONDS,
    show_default=True,
    help="On SIGTERM, exit within this many seconds, final push done or not (under the stop grace period).",
)
def sync_command(
    once: bool, exit_when_stopped: bool, poll_seconds: float, stop_wait_seconds: float, grace_seconds: float
) -> None:
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
    if once:
        try:
            sys.exit(0 if Syncer(cfg, pause=Pause(stop)).sync_once().ok else 1)
        except HubFatal as exc:
            _log_fatal(exc, "exiting")
            sys.exit(2)
    code = run_loop(
        cfg,
        exit_when_stopped=exit_when_stopped,
        poll_seconds=poll_seconds,
        stop_wait_seconds=stop_wait_seconds,
        grace_seconds=grace_seconds,
        stop=stop,
    )
    _exit(code)
