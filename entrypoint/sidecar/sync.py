"""One sync pass: push each stage's newest complete local checkpoint the Hub lacks, then prune.

A CommitScheduler made safe for checkpoints (the process around it is `loop`). A pass pushes, per stage,
the newest local checkpoint that is complete per `trainer.checkpoint_layout` and not yet complete in the
store (HF_KEEP_LAST=all: every one missing, newest first): an older one would only delay the next pass and
count against the account, and the checkpoint the previous pass pushed is the fallback already. The store
shows a checkpoint complete only once it is whole (`repo_store`: one commit with its
MANIFEST.json; `bucket_store`: the manifest uploaded after every file). Nothing is written once a newer
launch has claimed the run (see `stores.claim_generation`). Each push also prunes the checkpoints beyond
HF_KEEP_LAST it makes redundant (beyond the final one, for a finished stage), in a way that frees their
storage (in a repo, in the push's own commit: two history writes per checkpoint with the squash): a stage
peaks at HF_KEEP_LAST + 1 checkpoints. A push that would take what the Hub counts past HF_STORAGE_LIMIT_GB
waits (`budget`). Hub outages are retried and caught up on; the trainer never waits for us.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from entrypoint.hub.budget import Budget
from entrypoint.hub.calls import Pause, short_error
from entrypoint.hub.client import Hub, HubSnapshot, add_operation, generation_of
from entrypoint.hub.config import EVAL_DIR, RUN_FILE, TOKENIZER_PATH, HubConfig, local_generation
from entrypoint.hub.errors import Fenced, HeadMoved, HubError, HubFatal, QuotaExceeded, RateLimited
from entrypoint.hub.store import CheckpointStore, StoredCheckpoint, StoreView, counted_bytes, counted_size
from entrypoint.hub.stores import open_store
from entrypoint.logs import kv, redact
from trainer import checkpoint_layout as layout
from trainer import fencing

log = logging.getLogger("phoenix.sync")

_PASS_ATTEMPTS = 3  # a pass restarts from a fresh snapshot when someone else committed meanwhile
# After the Hub refused for a full account: it credits freed storage hours late, so sooner is pointless.
QUOTA_BACKOFF_S = 3600.0


def hub_keeps(cfg: HubConfig, stage: str, steps: set[int]) -> set[int]:
    """Which of these steps of `stage` the Hub keeps: the newest HF_KEEP_LAST, or only the newest once it is
    the stage's final checkpoint (restore needs nothing older, and SFT starts from the base's final one)."""
    newest = sorted(steps, reverse=True)
    if cfg.keep_last is None or not newest:
        return set(newest)
    return set(newest[: 1 if _marked_done(cfg, stage, newest[0]) else cfg.keep_last])


def due(cfg: HubConfig, stage: str, local: list[int], on_hub: set[int]) -> list[int]:
    """The local steps of `stage` the sidecar pushes, newest first: missing on the Hub, and not one its prune
    would delete at once (older than the Hub's newest kept, or than a final one). With HF_KEEP_LAST a pass
    pushes the first of them that it can (a vanished or corrupt one is skipped); with `all`, every one."""
    return [step for step in sorted((s for s in local if s not in on_hub), reverse=True)
            if step in hub_keeps(cfg, stage, on_hub | {step})]


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
    deferred: list[tuple[str, int]] = field(default_factory=list)  # waiting for the Hub to credit storage
    errors: list[str] = field(default_factory=list)
    fenced: bool = False
    backoff_s: float = 0.0  # the next pass no sooner than this: the Hub asked for it, or storage is full
    budget: Budget | None = None  # what the Hub counts, as of the pass's end

    @property
    def ok(self) -> bool:
        return not self.errors and not self.fenced


class Syncer:
    """Pushes what is complete locally and missing in the store; one instance per sidecar process."""

    def __init__(self, cfg: HubConfig, hub: Hub | None = None, pause: Pause | None = None,
                 store: CheckpointStore | None = None):
        self.cfg = cfg
        self.store = store or open_store(cfg, hub or Hub(cfg, pause=pause))
        self.hub = self.store.hub
        self.pause = self.hub.pause
        self._repo_ready = False
        self._bad_extras: dict[str, tuple[int, int]] = {}  # path -> (size, mtime_ns) already warned about
        self._hashed: dict[Path, tuple[Any, ...]] = {}  # checkpoints sha256-verified once, as they were then
        self.speed: float | None = None  # bytes/s of the last push: how long the next one may take
        self.on_hub: dict[str, set[int]] = {}  # steps per stage complete in the store, as of the last pass

    def sync_once(self) -> PassResult:
        """One pass. Raises HubFatal (bad token, no access, bad repo id); anything else, whatever raised it
        (the Hub, Xet, a file the trainer pruned meanwhile), is a failed pass: one log line, and the loop
        retries. The sidecar must outlive every fault, or the final push on SIGTERM is lost too."""
        result = PassResult()
        try:
            if not self._repo_ready:
                self.store.ensure()
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
        except (RateLimited, QuotaExceeded) as exc:
            result.backoff_s = exc.retry_in if isinstance(exc, RateLimited) else QUOTA_BACKOFF_S
            result.errors.append(redact(str(exc)))
            log.error(kv(event="sync_failed", error_type=type(exc).__name__, error=redact(str(exc)),
                         retry_in_s=round(result.backoff_s)))
        except Fenced as exc:
            result.fenced = True
            if local_generation(self.cfg) == 0:  # the usual start: the sidecar is up before the trainer
                log.info(kv(event="waiting_for_claim", detail=str(exc), action="pushing once it is claimed"))
            else:
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
                deferred=len(result.deferred),
                errors=len(result.errors),
                **({"counted_bytes": result.budget.counted, "settled_bytes": result.budget.settled}
                   if result.budget is not None else {}),
            )
        )
        return result

    def _pass(self, result: PassResult) -> None:
        view = self.store.view()
        own, theirs = local_generation(self.cfg), generation_of(view.claim)
        if theirs > own:
            hint = " (this volume has not claimed one yet: the entrypoint does at launch)" if own == 0 else ""
            if own > 0:  # a launch elsewhere took the run over: the trainer here stops at its next save
                fencing.write_marker(self.cfg.base_dir, self.cfg.model_tag, own, view.claim)
            raise Fenced(f"fenced: generation {own} < {theirs}{hint}")
        # Every commit below names the head it was planned on (`view.head`): if anyone (a newer launch
        # claiming the repo) commits in between, the Hub answers 412 and the pass starts over.
        self.store.tidy(view)
        result.budget = budget = Budget.of(self.cfg, *self.store.storage(view))
        extras = self._changed_extras(view.snapshot)
        for stage in layout.STAGES:
            for ckpt in self._to_push(stage, set(view.steps(stage))):
                cost = counted_size({name: e["size"] for name, e in ckpt.files.items()}, self.cfg.in_bucket)
                if not budget.fits(cost):
                    _log_deferred(stage, ckpt, cost, budget)
                    result.deferred.append((stage, ckpt.step))
                    break  # an older one is as large
                if not self._push(view, stage, ckpt, cost, extras, result, budget):
                    continue
                extras = []  # rode along with this checkpoint
                if self.cfg.keep_last is not None:
                    break  # the newest is up: older ones are not worth an upload (the module's first lines)
        self.on_hub = {stage: set(view.steps(stage)) for stage in layout.STAGES}
        if extras:
            self.store.push_side_files(view, extras)
        if doomed := self._doomed(view):  # HF_KEEP_LAST lowered, or a stage finished by an earlier pass
            try:
                self.store.prune(view, doomed)
            finally:  # what is deleted counts even when freeing it failed (a squash), to be done next pass
                self._count_pruned(view, doomed, result, budget)

    def _push(self, view: StoreView, stage: str, ckpt: layout.Checkpoint, cost: int, extras: list[Any],
              result: PassResult, budget: Budget) -> bool:
        """Push one checkpoint (`cost`: what the Hub will count for it) with the prune it makes possible;
        False if there was nothing to push."""
        doomed = self._doomed(view, (stage, ckpt.step))
        start = time.monotonic()
        try:
            ckpt = self._verified(ckpt)
            nbytes = self.store.push(view, stage, ckpt, extras, doomed)
        except Exception as exc:
            if landed := ckpt.step in view.steps(stage):  # what failed came after: the prune, the squash
                self._pushed(view, stage, ckpt.step, cost, doomed, result, budget)
            if landed or isinstance(exc, HeadMoved | Fenced | HubFatal):
                raise
            # Pruned by the trainer while we hashed or uploaded it (the client then raises
            # FileNotFoundError, ValueError or RuntimeError): nothing to push.
            if not ckpt.path.is_dir():
                log.warning(kv(event="skip_vanished", stage=stage, step=ckpt.step))
                return False
            if not isinstance(exc, layout.CheckpointInvalid):
                raise
            result.errors.append(str(exc))
            log.error(kv(event="skip_corrupt", stage=stage, step=ckpt.step, error=str(exc)))
            return False
        self.speed = nbytes / max(time.monotonic() - start, 1e-6) if nbytes else self.speed
        self._pushed(view, stage, ckpt.step, cost, doomed, result, budget)
        return True

    def _pushed(self, view: StoreView, stage: str, step: int, nbytes: int, doomed: list[StoredCheckpoint],
                result: PassResult, budget: Budget) -> None:
        result.pushed.append((stage, step))
        budget.added(nbytes)
        self._count_pruned(view, doomed, result, budget)

    def _verified(self, ckpt: layout.Checkpoint) -> layout.Checkpoint:
        """The checkpoint, its sha256 checked against its manifest once: a retry of an unchanged one (same
        files, sizes, mtimes) checks sizes and formats only, rather than reading every byte again (the push
        passes the manifest's sha256 on, so the client hashes nothing either)."""
        seen = tuple((p.name, st.st_size, st.st_mtime_ns, st.st_ino)
                     for p in sorted(ckpt.path.iterdir()) for st in [p.stat()])
        if self._hashed.get(ckpt.path) == seen:
            return layout.verify(ckpt.path)
        verified = layout.verify(ckpt.path, full_hash=True)
        self._hashed[ckpt.path] = seen
        return verified

    def _doomed(self, view: StoreView, adding: tuple[str, int] | None = None) -> list[StoredCheckpoint]:
        """The complete checkpoints `hub_keeps` leaves out (once `adding`, a (stage, step), is in too)."""
        doomed = []
        for stage in layout.STAGES:
            steps = {*view.steps(stage), *([adding[1]] if adding and adding[0] == stage else [])}
            kept = hub_keeps(self.cfg, stage, steps)
            doomed += [c for c in view.checkpoints[stage] if c.step not in kept]
        return doomed

    @staticmethod
    def _count_pruned(view: StoreView, doomed: list[StoredCheckpoint], result: PassResult,
                      budget: Budget) -> None:
        for ckpt in doomed:
            if ckpt not in view.checkpoints[ckpt.stage]:
                result.pruned.append((ckpt.stage, ckpt.step))
                budget.deleted(counted_bytes(ckpt), at_once=ckpt.in_bucket)

    def _to_push(self, stage: str, on_hub: set[int]) -> list[layout.Checkpoint]:
        """The local complete checkpoints `due` names, newest first."""
        local = layout.complete_checkpoints(layout.stage_dir(self.cfg.base_dir, stage, self.cfg.model_tag))
        steps = due(self.cfg, stage, [c.step for c in local], on_hub)
        return sorted((c for c in local if c.step in steps), key=lambda c: c.step, reverse=True)

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

def _log_deferred(stage: str, ckpt: layout.Checkpoint, cost: int, budget: Budget) -> None:
    """One line: why the newest checkpoint waits, and until when (the Hub credits freed storage late)."""
    at = budget.fits_at(cost)
    log.warning(kv(event="push_deferred", stage=stage, step=ckpt.step, bytes=cost,
                   counted_bytes=budget.counted, limit_bytes=round(budget.limit),
                   fits_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at)) if at else "unknown",
                   action="waiting for the Hub to credit freed storage (HF_STORAGE_LIMIT_GB)"))


def _json_problem(path: Path, required_key: str | None) -> str | None:
    """Why `path` is not a sound JSON object (with `required_key`), or None if it is."""
    try:
        obj = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        return f"not valid JSON ({str(exc).splitlines()[0]})"
    if not isinstance(obj, dict) or (required_key is not None and required_key not in obj):
        return f"not a JSON object with {required_key!r}" if required_key else "not a JSON object"
    return None
