"""The fence marker: how the sidecar tells this volume's trainer that a newer launch took the run over.

Every launch claims a generation on the Hub (`entrypoint.hub.claim_generation`) and keeps it in
runs/<tag>/generation.json on the volume. When the sidecar finds a newer generation on the Hub, it may
not push anymore, so training on here only burns GPUs: it writes runs/<tag>/fenced.json, and the trainer,
which reads it at every checkpoint, stops right after that checkpoint with FENCED_EXIT_CODE. A marker
left by an older generation of this volume is ignored: a relaunch here claims a newer one.

Torch-free: the sidecar writes the marker, `phoenix run` reads it after a stage exits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainer.checkpoint_layout import write_json_atomic

# Exit code of a trainer stopped because it was fenced: not a crash, and a relaunch would take the run
# back from the newer instance, so `phoenix run` must not loop on it (2 is a config error, 1 a crash).
FENCED_EXIT_CODE = 3
MARKER_FILE = "fenced.json"
GENERATION_FILE = "generation.json"


class FencedStop(Exception):
    """This instance was taken over: the message is the one `error:` line to print."""


def run_dir(base_dir: str | Path, model_tag: str) -> Path:
    return Path(base_dir) / "runs" / model_tag


def local_generation(base_dir: str | Path, model_tag: str) -> int:
    """This volume's launch generation (0 before the first claim)."""
    try:
        value = json.loads((run_dir(base_dir, model_tag) / GENERATION_FILE).read_text()).get("generation")
    except (FileNotFoundError, ValueError, AttributeError):
        return 0
    return value if isinstance(value, int) and value >= 0 else 0


def write_marker(base_dir: str | Path, model_tag: str, generation: int, claim: dict[str, Any]) -> None:
    """Record that `generation` (this volume's) was fenced by the Hub's `claim` (its generation.json)."""
    record = {"generation": generation, "newer_generation": claim.get("generation"),
              "claimed_at": claim.get("claimed_at"), "host": claim.get("host")}
    write_json_atomic(run_dir(base_dir, model_tag) / MARKER_FILE, record)


def fenced_by(base_dir: str | Path, model_tag: str) -> dict[str, Any] | None:
    """The marker if it fences this volume's current generation, else None (absent, stale, unreadable)."""
    try:
        record = json.loads((run_dir(base_dir, model_tag) / MARKER_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    own, newer = record.get("generation"), record.get("newer_generation")
    if not isinstance(own, int) or not isinstance(newer, int) or own < 1 or newer <= own:
        return None
    return record if own == local_generation(base_dir, model_tag) else None


def fence_message(record: dict[str, Any]) -> str:
    """The one line a fenced instance stops with."""
    where = " ".join(part for part in (f"at {record['claimed_at']}" if record.get("claimed_at") else "",
                                       f"on {record['host']}" if record.get("host") else "") if part)
    return (f"fenced: generation {record['generation']} was taken over by generation "
            f"{record['newer_generation']} (launched elsewhere{' ' + where if where else ''}): this instance "
            "stops; the run goes on there. Shut this one down, or relaunch it to take the run back here")
