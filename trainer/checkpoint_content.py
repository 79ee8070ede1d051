"""What a complete checkpoint holds: the files a resume reads, the optimizer state in one file or one per
rank, meta.json's schema, and only formats that cannot execute code when loaded.

Torch-free, with no file system layout of its own: `trainer.checkpoint_layout` applies these rules when it
verifies or publishes a checkpoint, so every reader of a checkpoint asks the same questions.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

META_NAME = "meta.json"
STAGES = ("base", "sft")
# Only these suffixes may hold checkpoint data: neither format can execute code when loaded.
_SAFE_SUFFIXES = (".safetensors", ".json")
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
# What a resume reads (trainer.resume, trainer.train, trainer.sft): without any of them it could only crash.
REQUIRED_FILES = ("model.safetensors", "rng.safetensors", META_NAME)
# The optimizer state: one gathered file (checkpoints before per-rank writes), or each rank's share.
GATHERED_OPTIMIZER = "optimizer.safetensors"
_OPTIMIZER_SHARE = re.compile(r"^optimizer-(\d{5})-of-(\d{5})\.safetensors$")
META_KEYS: dict[str, type] = {
    "stage": str, "step": int, "world_size": int, "rng": list, "num_iterations": int, "model_config": dict,
    "config": dict, "loop_state": dict, "loader": dict, "run_id": str, "wandb_run_id": str}
STAGE_META_KEYS: dict[str, dict[str, type]] = {"base": {"total_batch_size": int, "max_seq_len": int},
                                               "sft": {"base": dict, "data": dict}}
RUN_KEYS = ("run_id", "wandb_run_id")  # what runs/<tag>/run.json must hold


class CheckpointInvalid(Exception):
    """A checkpoint directory that must not be loaded; the message names the offending file."""


def check_format(path: Path) -> None:
    """Refuse anything but a well-formed safetensors header or JSON: a pickle never gets near a loader."""
    name = path.name
    if not name.endswith(_SAFE_SUFFIXES):
        raise CheckpointInvalid(f"{path}: only .safetensors and .json files are allowed in a checkpoint")
    with open(path, "rb") as f:
        if name.endswith(".json"):
            try:
                json.loads(f.read())
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise CheckpointInvalid(f"{path}: not valid JSON ({exc.__class__.__name__})") from None
            return
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointInvalid(f"{path}: too short to be safetensors")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > _MAX_SAFETENSORS_HEADER:
            raise CheckpointInvalid(f"{path}: not a safetensors file (pickle payloads are refused)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointInvalid(f"{path}: not a safetensors file (pickle payloads are refused)") from None
        if not isinstance(header, dict):
            raise CheckpointInvalid(f"{path}: safetensors header is not a JSON object")


def optimizer_share_name(rank: int, world_size: int) -> str:
    """The file of one rank's optimizer share: each rank writes its own, in parallel."""
    return f"optimizer-{rank:05d}-of-{world_size:05d}.safetensors"


def optimizer_state_problem(names: Iterable[str]) -> str | None:
    """What optimizer state the file names lack (None when there is one gathered file or every share)."""
    names = set(names)
    shares = [match for name in names if (match := _OPTIMIZER_SHARE.match(name))]
    if GATHERED_OPTIMIZER in names and not shares:
        return None
    world_sizes = {int(match.group(2)) for match in shares}
    if len(world_sizes) == 1 and GATHERED_OPTIMIZER not in names:
        (world_size,) = world_sizes
        absent = sorted(set(range(world_size)) - {int(match.group(1)) for match in shares})
        return f"{optimizer_share_name(absent[0], world_size)} (optimizer share)" if absent else None
    return "optimizer state (one gathered file or every rank's share)"


def blank_meta(step: int, stage: str = "base") -> dict[str, Any]:
    """A meta.json this contract accepts, every key blank: for benches and tests that write checkpoints
    without a run behind them."""
    blank = {key: kind() for key, kind in {**META_KEYS, **STAGE_META_KEYS[stage]}.items()}
    return {**blank, "stage": stage, "step": step, "world_size": 1, "rng": [{}]}


def check_meta(path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """meta.json, or CheckpointInvalid unless it holds every key a resume reads, typed as written, for the
    manifest's step and stage."""
    try:
        meta = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointInvalid(f"{path}: not valid JSON") from None
    if not isinstance(meta, dict):
        raise CheckpointInvalid(f"{path}: not a JSON object")
    for key, kind in {**META_KEYS, **STAGE_META_KEYS.get(meta.get("stage"), {})}.items():
        value = meta.get(key)
        if key not in meta:
            raise CheckpointInvalid(f"{path}: {key!r} is missing")
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise CheckpointInvalid(f"{path}: {key!r} is {type(value).__name__}, not {kind.__name__}")
    if (stage := meta["stage"]) not in STAGES or manifest.get("stage", stage) != stage:
        raise CheckpointInvalid(f"{path}: stage {stage!r}, the manifest's is {manifest.get('stage')!r}")
    if meta["step"] != manifest["step"]:
        raise CheckpointInvalid(f"{path}: written for step {meta['step']}, not {manifest['step']}")
    if meta["world_size"] < 1 or len(meta["rng"]) != meta["world_size"]:
        raise CheckpointInvalid(f"{path}: {len(meta['rng'])} RNG states for world size {meta['world_size']}")
    return meta
