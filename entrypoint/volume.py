"""The run's footprint on the volume while it runs: the per-node lock, the status file, `phoenix health`."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import click

from entrypoint.hub import TRAINER_STATUS_FILE
from entrypoint.preflight import PreflightError, RunConfig
from trainer import checkpoint_layout as layout


class VolumeLock:
    """flock on the volume: the kernel drops it when its holder dies, so a stale lock is never a problem."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: Any = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held for the life of the run
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown holder"
            handle.close()
            raise PreflightError(f"another phoenix run is training this MODEL_TAG on this volume ({holder}): "
                                 "stop it first, or use another MODEL_TAG") from None
        handle.seek(0)
        handle.truncate()
        since = time.strftime("%Y-%m-%dT%H:%M:%S")
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {since}")
        handle.flush()
        self._file = handle

    def fileno(self) -> int:
        return self._file.fileno()

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class StatusFile:
    """runs/<tag>/trainer_status.json: what the sidecar and `phoenix health` read; refreshed while alive."""

    def __init__(self, cfg: RunConfig, generation: int) -> None:
        self.path = cfg.base_dir / "runs" / cfg.model_tag / TRAINER_STATUS_FILE
        self.generation = generation
        self.state = {"status": "running", "phase": "preflight"}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh, daemon=True, name="status")

    def set(self, **fields: Any) -> None:
        new_phase = fields.get("phase", self.state["phase"]) != self.state["phase"]
        if new_phase or "phase_started" not in self.state:
            self.state["phase_started"] = time.time()
        self.state.update(fields)
        layout.write_json_atomic(self.path, {**self.state, "generation": self.generation,
                                             "updated": time.time(), "pid": os.getpid()})

    def _refresh(self) -> None:
        while not self._stop.wait(30):
            self.set()

    def start(self) -> None:
        self.set()
        self._thread.start()

    def close(self, status: str) -> None:
        self._stop.set()
        self.set(status=status)


@click.command("health")
@click.option("--max-age", default=900, show_default=True, help="Seconds without news before unhealthy.")
def health_command(max_age: int) -> None:
    """Container HEALTHCHECK: the entrypoint is alive and, while training, steps keep coming."""
    base = Path(os.environ.get("NANOCHAT_BASE_DIR", "~/.cache/nanochat")).expanduser()
    tag = os.environ.get("MODEL_TAG", "d26-hyperbolic")
    try:
        status = json.loads((base / "runs" / tag / TRAINER_STATUS_FILE).read_text())
    except (FileNotFoundError, ValueError):
        click.echo("unhealthy: no trainer status yet")
        sys.exit(1)
    now = time.time()
    news = status.get("updated", 0)
    if status.get("phase") in ("base", "sft"):
        # A stage's first step can take a while (compile, shards): count from the phase start.
        heartbeat = base / "logs" / f"heartbeat_{tag}.json"
        beat = json.loads(heartbeat.read_text()).get("time", 0) if heartbeat.exists() else 0
        news = max(beat, status.get("phase_started", 0))
    if status.get("status") == "running" and now - news > max_age:
        click.echo(f"unhealthy: phase {status.get('phase')} silent for {now - news:.0f}s")
        sys.exit(1)
    click.echo(f"healthy: {status.get('status')} phase={status.get('phase')}")
