"""The volume's JSONL logs (step metrics, interruptions) read back: torch-free, so the trainer, `phoenix
status` and `phoenix report` read them alike."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a .jsonl log, one a line; a line cut short (a kill, a full disk) or anything but
    an object is skipped, so a torn log never stops a reader. No file: none."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
