"""`phoenix sync`: the sidecar process: a sync pass every HF_SYNC_INTERVAL s, at once when the trainer
stops or a preemption notice comes (then each new checkpoint as it appears), and a final one on SIGTERM
within the stop grace period; it outlives every fault.

The pass itself (what is pushed and pruned, how) is `sync.Syncer`. A failed pass is retried sooner, except
when the Hub asked for a wait (its hourly commit quota: up to an hour) or the account is full (an hour:
freed storage is credited late). A setting only the user can fix is logged once per interval, never an
exit, since `restart: unless-stopped` would relaunch the sidecar in a loop; an account the Hub locked is
too, and nothing more is uploaded.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

import click

from entrypoint.hub.calls import Pause
from entrypoint.hub.config import TRAINER_STATUS_FILE, HubConfig, local_generation
from entrypoint.hub.errors import HubFatal, StorageLocked
from entrypoint.launch.clouds import PREEMPTION, Notice
from entrypoint.launch.preemption import describe, read_notice
from entrypoint.logs import kv, redact, setup_hub_logging
from entrypoint.sidecar.sync import PassResult, Syncer
from trainer import checkpoint_layout as layout

log = logging.getLogger("phoenix.sync")

_FIRST_FAILURE_DELAY = 5.0
# compose.yaml gives the sidecar a 15 min stop_grace_period; a minute less leaves time to exit cleanly.
DEFAULT_GRACE_SECONDS = 840.0
_PASS_THREAD = "sync-pass"
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
    # A time in the future (a clock set back, a bad file) is no sign of life either.
    stale = not isinstance(updated, int | float) or abs(time.time() - updated) > STALE_S
    if status["status"] == "running" and stale:
        # The entrypoint refreshes the file every 30 s while alive: silence means it was killed outright.
        return {**status, "status": "lost"}
    return status


class _Pass:
    """One sync pass in a thread the process may leave behind: an upload cannot be interrupted from outside,
    and a SIGTERM must not wait for one (the Hub shows a checkpoint whole or not at all either way)."""

    def __init__(self, syncer: Syncer) -> None:
        self.syncer = syncer
        self.thread: threading.Thread | None = None
        self.outcome: PassResult | HubFatal | None = None

    def start(self) -> None:
        self.outcome = None
        self.thread = threading.Thread(target=self._run, name=_PASS_THREAD, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.outcome = self.syncer.sync_once()
        except HubFatal as exc:
            self.outcome = exc

    def wait(self, until: float | None = None, stop: threading.Event | None = None) -> bool:
        """True once no pass is running; False at `until` (time.monotonic()) or once `stop` is set."""
        while self.thread is not None and self.thread.is_alive():
            if (stop is not None and stop.is_set()) or (until is not None and time.monotonic() >= until):
                return False
            self.thread.join(0.05)
        return True


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

    A failed pass is retried sooner (5 s, doubling, capped at the interval), but never before the wait a
    pass was asked for (`PassResult.backoff_s`). A setting only the user can fix (HubFatal) is logged once
    per interval and checked again (a locked account is not: each check would upload), never an exit:
    `restart: unless-stopped` would relaunch the sidecar in a loop. With `exit_when_stopped`, returns after
    the final pass once the trainer has stopped. When `stop` is set (SIGTERM), every wait ends at once; it
    then waits up to `stop_wait_seconds` for a running trainer to stop (its emergency checkpoint) and pushes
    once more, all within `grace_seconds` of the stop.
    """
    stop = stop or threading.Event()
    syncer = syncer or Syncer(cfg, pause=Pause(stop))
    log.info(
        kv(
            event="start",
            repo=cfg.repo_id,
            repo_type=cfg.repo_type,
            checkpoints=cfg.checkpoint_store,
            model_tag=cfg.model_tag,
            interval_s=cfg.sync_interval,
            keep_last=cfg.keep_last if cfg.keep_last is not None else "all",
            generation=local_generation(cfg),
        )
    )
    failures = 0
    fatal: HubFatal | None = None  # the last pass hit a setting only the user can fix
    next_pass = not_before = time.monotonic()  # not_before: no pass sooner, whatever happens (the Hub asked)
    running = _Pass(syncer)
    seen, generation = read_trainer_status(cfg), local_generation(cfg)
    notices = NoticeFollower(cfg)
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
        now, noticed = time.monotonic(), notices.push_now()
        if isinstance(fatal, StorageLocked):  # nothing is tried again: every try would upload a checkpoint
            if now >= next_pass:
                _log_fatal(fatal, "uploading nothing until the sidecar is restarted")
                next_pass = now + cfg.sync_interval
        elif (noticed or just_stopped or claimed or now >= next_pass) and now >= not_before:
            started = now  # passes start every interval, however long one takes: a push never waits longer
            notices.passed()
            running.start()
            if not running.wait(stop=stop):
                break  # stopped mid-pass: the final push waits for it, within the grace period
            result = running.outcome
            if isinstance(result, HubFatal):
                fatal = result
                _log_fatal(fatal, "uploading nothing until the sidecar is restarted" if isinstance(
                    fatal, StorageLocked) else f"pushing nothing; checking again in {cfg.sync_interval:.0f}s")
                if exit_when_stopped and trainer_stopped:
                    return 2
                next_pass = time.monotonic() + cfg.sync_interval
                continue
            assert result is not None
            fatal = None
            failures = 0 if result.ok or result.fenced else failures + 1
            delay = cfg.sync_interval if failures == 0 else _FIRST_FAILURE_DELAY * 2 ** (failures - 1)
            not_before = time.monotonic() + result.backoff_s
            next_pass = max(started + min(delay, cfg.sync_interval), not_before)
            if exit_when_stopped and trainer_stopped and (result.ok or result.fenced):
                log.info(kv(event="exit", reason="the trainer stopped and the final sync is done"))
                return 0 if result.ok else 1
        stop.wait(max(0.0, min(notices.poll_seconds(poll_seconds), next_pass - time.monotonic())))
    if fatal is not None:  # already said; a final push would only fail the same way
        return 2
    return _final_push(cfg, running, poll_seconds, stop_wait_seconds, grace_seconds, not_before)


class NoticeFollower:
    """The preemption notice `phoenix run` writes (launch.preemption): push ahead of the schedule.

    A warning asks for one pass now. A notice puts the loop on a fast poll until its deadline (two
    minutes at least): each new checkpoint on the volume (the emergency one, published at the trainer's
    next step boundary) is pushed the moment it appears, before `phoenix run` has even exited.
    """

    NOTICE_POLL_S = 1.0  # the notice file is read every second: a small read, against a 30 s window
    FAST_POLL_S = 0.2
    FAST_AT_LEAST_S = 120.0  # AWS's two minutes; the VM may outlive a short deadline (GCP's 30 s) a little

    def __init__(self, cfg: HubConfig) -> None:
        self.cfg = cfg
        self.seen: Notice | None = None
        self.fast_until = 0.0
        self.pushed_newest: tuple[int | None, ...] | None = None

    def _newest(self) -> tuple[int | None, ...]:
        """Each stage's newest published step: a step folder appears whole (atomic rename)."""
        stages = (layout.stage_dir(self.cfg.base_dir, stage, self.cfg.model_tag) for stage in layout.STAGES)
        return tuple(found[0][0] if (found := layout.step_dirs(folder)) else None for folder in stages)

    def push_now(self) -> bool:
        notice = read_notice(self.cfg.base_dir, self.cfg.model_tag)
        left = notice.seconds_left() if notice is not None else None
        stale = left is not None and left < -60  # an earlier instance's, before this launch replaced it
        if notice is not None and notice != self.seen and not stale:
            self.seen = notice
            if notice.kind == PREEMPTION:
                self.fast_until = time.monotonic() + max(left or 0.0, self.FAST_AT_LEAST_S)
            log.info(kv(event="preemption_notice_seen", **describe(notice),
                        action="pushing the newest checkpoint at once"))
            return True
        return time.monotonic() < self.fast_until and self._newest() != self.pushed_newest

    def passed(self) -> None:
        """A pass starts now: what is on the volume at this moment is what it pushes."""
        if time.monotonic() < self.fast_until:
            self.pushed_newest = self._newest()

    def poll_seconds(self, usual: float) -> float:
        fast = time.monotonic() < self.fast_until
        return min(usual, self.FAST_POLL_S if fast else self.NOTICE_POLL_S)


def _log_fatal(exc: HubFatal, action: str) -> None:
    log.error(kv(event="fatal", error=redact(str(exc)), action=action))


def _final_push(cfg: HubConfig, running: _Pass, poll_seconds: float, stop_wait_seconds: float,
                grace_seconds: float, not_before: float) -> int:
    """On SIGTERM: let a running trainer finish its emergency checkpoint (both may be stopped at once), say
    in one line whether the newest checkpoint can go up in the time left (at the last push's speed), let a
    pass under way finish, and push once more; all of it within `grace_seconds`, after which Docker would
    SIGKILL us."""
    deadline = time.monotonic() + grace_seconds
    syncer = running.syncer
    syncer.pause.deadline = deadline  # retry waits that would overrun it are not started
    trainer_deadline = min(time.monotonic() + stop_wait_seconds, deadline)
    while (status := read_trainer_status(cfg)) is not None and status["status"] == "running":
        if time.monotonic() >= trainer_deadline:
            log.warning(
                kv(event="trainer_still_running", waited_s=stop_wait_seconds, action="pushing anyway")
            )
            break
        time.sleep(poll_seconds)
    left = deadline - time.monotonic()
    if not_before >= deadline:  # the Hub asked for a longer wait (commit quota), or the account is full
        return _skipped(left, not_before)
    estimate = _estimate(cfg, syncer, left)
    log.info(kv(event="stopping", action="final sync", seconds_left=round(left, 1), **estimate))
    if not running.wait(until=deadline):  # the pass under way at the stop
        return _timed_out(grace_seconds)
    if not syncer.pause.sleep(max(0.0, not_before - time.monotonic())):  # what is left of the Hub's wait
        return _skipped(deadline - time.monotonic(), not_before)
    running.start()
    if not running.wait(until=deadline):
        return _timed_out(grace_seconds)
    if isinstance(running.outcome, HubFatal):
        _log_fatal(running.outcome, "exiting")
        return 2
    assert running.outcome is not None
    return 0 if running.outcome.ok else 1


def _skipped(seconds_left: float, not_before: float) -> int:
    log.error(kv(event="final_push_skipped", seconds_left=round(seconds_left, 1),
                 hub_wait_s=round(not_before - time.monotonic()),
                 action="exiting; the next sidecar pushes what is left"))
    return 1


def _timed_out(grace_seconds: float) -> int:
    log.error(kv(event="final_push_timeout", grace_s=grace_seconds,
                 action="exiting within the stop grace period; the next sidecar pushes what is left"))
    return 1


def _estimate(cfg: HubConfig, syncer: Syncer, seconds_left: float) -> dict[str, Any]:
    """Whether the newest local checkpoint can go up in `seconds_left` at the last push's speed (a fresh
    sidecar has none: unknown); a checkpoint is complete on the Hub only once whole, so a push that runs
    out of time leaves the one before it the newest there."""
    for stage in reversed(layout.STAGES):
        if (newest := layout.latest(layout.stage_dir(cfg.base_dir, stage, cfg.model_tag))) is not None:
            break
    else:
        return {"newest": "-"}
    fields: dict[str, Any] = {"newest": f"{stage}:{newest.step}", "bytes": newest.total_bytes}
    if newest.step in syncer.on_hub.get(stage, set()):
        return fields | {"fits": "on_hub"}
    if syncer.speed is None:
        return fields | {"mb_s": "-", "fits": "unknown"}
    needs = newest.total_bytes / syncer.speed
    return fields | {"mb_s": round(syncer.speed / 1e6, 1), "needs_s": round(needs, 1),
                     "fits": "yes" if needs < seconds_left else "no"}


def _exit(code: int) -> None:
    """sys.exit, unless a final push was left running: then leave at once rather than wait for it."""
    if any(t.name == _PASS_THREAD and t.is_alive() for t in threading.enumerate()):
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
    """Push every complete checkpoint to HF_REPO_ID (a Hub repo or bucket) as it appears (the sidecar)."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    # What the user must fix is one line; the sidecar then idles (or waits for the volume) rather than
    # exit, since `restart: unless-stopped` would relaunch it in a loop. --once exits 2.
    idle = not (once or exit_when_stopped)
    try:
        cfg = HubConfig.from_env()
    except HubFatal as exc:
        click.echo(f"error: {redact(str(exc))}" + (" (idle until stopped)" if idle else ""), err=True)
        if idle:
            stop.wait()
        sys.exit(2)
    if not cfg.base_dir.is_dir():
        # Never created here: a folder made on an unmounted path would pass the trainer's preflight.
        click.echo(f"error: NANOCHAT_BASE_DIR={cfg.base_dir} does not exist: mount the volume there"
                   + (" (waiting for it)" if idle else ""), err=True)
        while not cfg.base_dir.is_dir():
            if not idle or stop.wait(poll_seconds):
                sys.exit(2)
    setup_hub_logging(cfg.base_dir / "logs" / "hf_sync.log")
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
