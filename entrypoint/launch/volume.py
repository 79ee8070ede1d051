"""The run's footprint on the volume: per-node lock and status file, the failure record, the device batch
record, `phoenix health`.

The failure record (runs/<tag>/failures.json) is the crash-loop guard's memory: the last launch's error
line and how many launches in a row ended in it with the same configuration and no new checkpoint. The
device batch record (runs/<tag>/device_batch.json) is what out-of-memory halvings left each stage with.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import sys
import threading
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import click

from entrypoint.hub.config import DEFAULT_MODEL_TAG, TRAINER_STATUS_FILE, model_tag_problem
from entrypoint.launch.config import RunConfig
from entrypoint.logs import is_number, kv, read_json
from trainer import checkpoint_layout as layout
from trainer.out_of_memory import OutOfMemory

log = logging.getLogger("phoenix.run")

FAILURES_FILE = "failures.json"
DEVICE_BATCH_FILE = "device_batch.json"


RESTORE_COMMAND = "phoenix restore"


def lock_path(base_dir: Path, model_tag: str, node_rank: int = 0) -> Path:
    """The run's lock: whoever writes the checkpoints of MODEL_TAG on this node's volume holds it."""
    return base_dir / "runs" / model_tag / f"trainer.node{node_rank}.lock"


class LockHeld(Exception):
    """Someone else holds the lock: `command` (e.g. "phoenix run") and `description` (pid, host, since)."""

    def __init__(self, command: str, description: str) -> None:
        super().__init__(f"{command} ({description})")
        self.command, self.description = command, description


class VolumeLock:
    """flock on the volume: the kernel drops it when its holder dies, so a stale lock is never a problem.

    The file names its holder: the command on the first line, pid, host and start on the second.
    """

    WAIT_LOG_S = 30.0

    def __init__(self, path: Path, command: str = "phoenix run") -> None:
        self.path = path
        self.command = command
        self._file: Any = None

    def acquire(self, wait_for: str = RESTORE_COMMAND) -> None:
        """Take the lock. While `wait_for` holds it (a restore, which ends by itself), wait, saying so every
        30 s; any other holder raises LockHeld."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held for the life of the run
        said = -self.WAIT_LOG_S
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                handle.seek(0)
                command, _, description = handle.read().strip().partition("\n")
                if command and command != wait_for:  # (no command yet: its holder is writing it)
                    handle.close()
                    raise LockHeld(command, description or "unknown holder") from None
                if time.monotonic() - said >= self.WAIT_LOG_S:
                    said = time.monotonic()
                    log.info(kv(event="lock_wait", holder=command or "-", holder_is=description or "-",
                                path=self.path))
                time.sleep(0.5)
        handle.seek(0)
        handle.truncate()
        since = time.strftime("%Y-%m-%dT%H:%M:%S")
        handle.write(f"{self.command}\npid {os.getpid()} on {socket.gethostname()} since {since}")
        handle.flush()
        self._file = handle

    def fileno(self) -> int:
        return self._file.fileno()

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def status_path(base_dir: Path, model_tag: str, node_rank: int = 0) -> Path:
    """Node 0's status is the one the sidecar follows; other nodes of a multi-node run write their own."""
    name = TRAINER_STATUS_FILE if node_rank == 0 else f"trainer_status.node{node_rank}.json"
    return base_dir / "runs" / model_tag / name


def node0_is_live(base_dir: Path, model_tag: str, max_age_s: float = 120.0) -> bool:
    """Node 0's status file is fresh on this volume: node 0 refreshes it every 30 s while it runs, so
    another node seeing it knows the folder is shared (clocks may differ by a minute)."""
    status = read_json(status_path(base_dir, model_tag, 0)) or {}
    age = abs(time.time() - _timestamp(status.get("updated")))
    return status.get("status") == "running" and age < max_age_s


class FailureLog:
    """runs/<tag>/failures.json: the last failed launch, and how many launches in a row failed the same way.

    "The same way" is the same error line, the same configuration (a fingerprint of the settings) and the
    same checkpoints on the volume: a crash after progress starts the count again. A launch that ends
    well (finished or stopped) removes the file.
    """

    def __init__(self, base_dir: Path, model_tag: str, limit: int, node_rank: int = 0) -> None:
        name = FAILURES_FILE if node_rank == 0 else f"failures.node{node_rank}.json"
        self.base_dir = base_dir
        self.path = base_dir / "runs" / model_tag / name
        self.limit = limit

    def read(self) -> dict[str, Any] | None:
        """The record, or None: absent, torn or malformed (a torn record starts the count again)."""
        record = read_json(self.path)
        if record is None or not isinstance(record.get("error"), str) or type(record.get("count")) is not int:
            return None
        return record

    def record(self, error: str, kind: str, fingerprint: str, progress: str) -> dict[str, Any]:
        """Count this failure; returns the record (with `held`: the guard stops relaunching now)."""
        previous = self.read() or {}
        same = all(previous.get(k) == v for k, v in
                   (("error", error), ("fingerprint", fingerprint), ("progress", progress)))
        now = time.time()
        record = {"error": error, "kind": kind, "fingerprint": fingerprint, "progress": progress,
                  "count": previous.get("count", 0) + 1 if same else 1,
                  "first": previous.get("first", now) if same else now, "last": now, "limit": self.limit}
        record["held"] = record["count"] >= self.limit
        # A missing volume is the error being reported: creating its folder here would hide it next launch.
        if self.base_dir.is_dir():
            with suppress(OSError):  # a volume we cannot write is the error being reported, not a new one
                layout.write_json_atomic(self.path, record)
        return record

    def clear(self) -> None:
        with suppress(OSError):
            self.path.unlink(missing_ok=True)


class DeviceBatchRecord:
    """runs/<tag>/device_batch.json: per stage, the device batch that out-of-memory halvings left it with,
    and the `key` it holds for (the GPUs and the stage's settings). A launch with the same key trains at
    it; other GPUs or settings start from the stage's own setting (`auto`) again. One file for all nodes
    (a multi-node volume is shared): every node's stage must run at the same size.
    """

    def __init__(self, base_dir: Path, model_tag: str) -> None:
        self.path = base_dir / "runs" / model_tag / DEVICE_BATCH_FILE

    def _read(self) -> dict[str, Any]:
        return read_json(self.path) or {}

    def get(self, stage: str, key: dict[str, Any]) -> int | None:
        entry = self._read().get(stage)
        if not isinstance(entry, dict) or entry.get("key") != key:
            return None
        size = entry.get("device_batch_size")
        return size if isinstance(size, int) and size > 0 else None

    def keep(self, stage: str, key: dict[str, Any], size: int, oom: OutOfMemory) -> None:
        """Record `size` for the stage after `oom`; a volume that cannot take it costs the next launches
        (they run out again and halve again), not this one."""
        entry = {"device_batch_size": size, "key": key, "out_of_memory": {
            "step": oom.step, "device_batch_size": oom.device_batch_size, "card_gib": oom.card_gib,
            "time": time.time()}}
        try:
            layout.write_json_atomic(self.path, {**self._read(), stage: entry})
        except OSError as exc:
            log.warning("cannot write %s: %s", self.path, exc.strerror or exc)


class StatusFile:
    """runs/<tag>/trainer_status.json: what the sidecar and `phoenix health` read; refreshed while alive."""

    def __init__(self, cfg: RunConfig, generation: int) -> None:
        self.path = status_path(cfg.base_dir, cfg.model_tag, cfg.node_rank)
        self.generation = generation
        self.state = {"status": "running", "phase": "preflight"}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh, daemon=True, name="status")

    def set(self, **fields: Any) -> None:
        new_phase = fields.get("phase", self.state["phase"]) != self.state["phase"]
        if new_phase or "phase_started" not in self.state:
            self.state["phase_started"] = time.time()
        self.state.update(fields)
        try:
            layout.write_json_atomic(self.path, {**self.state, "generation": self.generation,
                                                 "updated": time.time(), "pid": os.getpid()})
        except OSError as exc:  # a full volume: the run's own error says so; the status waits for room
            log.warning("cannot write %s: %s", self.path, exc.strerror or exc)

    def _refresh(self) -> None:
        while not self._stop.wait(30):
            self.set()

    def start(self) -> None:
        self.set()
        self._thread.start()

    def close(self, status: str) -> None:
        self._stop.set()
        self.set(status=status)


def _timestamp(value: Any) -> float:
    """A file's time field as seconds since the epoch; anything else counts as news from long ago."""
    return float(value) if is_number(value) else 0.0


@click.command("health")
@click.option("--max-age", default=900, show_default=True, help="Seconds without news before unhealthy.")
def health_command(max_age: int) -> None:
    """Container HEALTHCHECK: the entrypoint is alive and, while training, steps keep coming."""
    base = Path(os.environ.get("NANOCHAT_BASE_DIR") or "~/.cache/nanochat").expanduser()
    tag = os.environ.get("MODEL_TAG", "").strip() or DEFAULT_MODEL_TAG
    node_rank = os.environ.get("NODE_RANK", "").strip() or "0"
    if (problem := model_tag_problem(tag)) or not node_rank.isdigit():
        click.echo(f"unhealthy: {problem or f'NODE_RANK={node_rank!r} is not a node number'}")
        sys.exit(1)
    failure = FailureLog(base, tag, limit=0, node_rank=int(node_rank)).read()
    if failure and failure.get("held"):
        click.echo(f"unhealthy: not relaunching after {failure['count']} identical failures: "
                   f"{failure['error']}")
        sys.exit(1)
    status = read_json(status_path(base, tag, int(node_rank)))
    if status is None:
        click.echo("unhealthy: no (readable) trainer status yet")
        sys.exit(1)
    now = time.time()
    news = _timestamp(status.get("updated"))
    if status.get("phase") in ("base", "sft"):
        # A stage's first step can take a while (compile, shards): count from the phase start.
        beat = _timestamp((read_json(base / "logs" / f"heartbeat_{tag}.json") or {}).get("time"))
        news = max(beat, _timestamp(status.get("phase_started")))
    # News from the future is no news: a clock set back (or a bad file) must not keep it healthy for ever.
    if status.get("status") == "running" and abs(now - news) > max_age:
        silence = f"silent for {now - news:.0f}s" if news <= now else f"dated {news - now:.0f}s in the future"
        click.echo(f"unhealthy: phase {status.get('phase')} {silence}")
        sys.exit(1)
    click.echo(f"healthy: {status.get('status')} phase={status.get('phase')}")
