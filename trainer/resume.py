"""A run's checkpoints as the stage scripts use them: which one to resume from, how a rank's weights,
optimizer share and RNG come back from it (on any world size), and how every rank saves its share.

The files themselves are written by trainer.checkpoint (async, atomic) in trainer.checkpoint_layout's
layout; the refusals here are ConfigErrors, one line each.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer import checkpoint_content as content
from trainer import checkpoint_layout as layout
from trainer import fencing
from trainer.checkpoint import AsyncCheckpointer, load_tensors, tensor_names
from trainer.distributed import Dist, ShardedOptimizer, broadcast, gather
from trainer.optim import OPTIMIZER_RECIPE
from trainer.runtime import ConfigError

log = logging.getLogger("phoenix.train")


def find_resume_checkpoint(directory: Path, allow_fresh_start: bool) -> layout.Checkpoint | None:
    """The latest complete checkpoint (sha256-verified), None for a fresh run; refuses a bad volume."""
    layout.clean_tmp(directory)
    ckpt = layout.latest_or_quarantine(directory, full_hash=True)
    if ckpt is None and layout.step_dirs(directory) and not allow_fresh_start:
        raise ConfigError(f"{directory} has checkpoint directories but none is complete (see warnings "
                          "above): restore from the Hub (phoenix restore) or pass --allow-fresh-start")
    return ckpt


def run_identity(base_dir: str | Path, model_tag: str,
                 resumed: dict[str, Any] | None = None) -> dict[str, str]:
    """The run's ids (run id, W&B run id), created once per MODEL_TAG and kept on the volume. A missing or
    damaged file (quarantined) gets the ids of the checkpoint being resumed (`resumed`: its meta), else new
    ones: a fresh run."""
    path = Path(base_dir) / "runs" / model_tag / "run.json"
    identity = layout.read_run_file(path)
    if identity is not None:
        return identity
    if resumed is not None:
        identity = {"run_id": resumed["run_id"], "wandb_run_id": resumed["wandb_run_id"]}
    else:
        identity = {"run_id": uuid.uuid4().hex, "wandb_run_id": uuid.uuid4().hex[:12]}
    identity["model_tag"] = model_tag
    layout.write_json_atomic(path, identity)
    return identity


def rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    json_part = {"python": [py_version, list(py_state), py_gauss],
                 "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    return json_part, tensors


def set_rng_state(json_part: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    version, state, gauss = json_part["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, *rest = json_part["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_horizon(ckpt: layout.Checkpoint, meta: dict[str, Any], num_iterations: int) -> None:
    """A changed horizon reshapes the lr schedule from here on (allowed), unless it is already past."""
    if meta["num_iterations"] == num_iterations:
        return
    if meta["step"] >= num_iterations:
        raise ConfigError(f"{ckpt.path} is at step {meta['step']}, past the new horizon of "
                          f"{num_iterations} steps: set --num-iterations above {meta['step']}")
    log.warning("horizon changed from %d to %d steps: the schedule follows the new horizon",
                meta["num_iterations"], num_iterations)


def check_optimizer_recipe(ckpt: layout.Checkpoint, meta: dict[str, Any]) -> None:
    """A checkpoint continues only under the update rule that wrote it: another rule (or a checkpoint from
    before rules were recorded: Newton-Schulz Muon without NorMuon state) would change the run silently."""
    written_by = meta.get("optimizer_recipe", "newton-schulz-muon/adamw (unrecorded, before NorMuon)")
    if written_by != OPTIMIZER_RECIPE:
        raise ConfigError(f"{ckpt.path} was written by optimizer {written_by}, this trainer runs "
                          f"{OPTIMIZER_RECIPE}: finish that run with the phoenix version that started it, or "
                          f"start anew under another MODEL_TAG")


def optimizer_state(ckpt: layout.Checkpoint
                    ) -> tuple[list[str], Callable[[list[str]], dict[str, torch.Tensor]]]:
    """(every optimizer state key the checkpoint holds, a reader of any subset of them), whichever files
    and world size hold them: the per-rank shares, or the one gathered `optimizer.safetensors` of
    checkpoints written before shares were saved in parallel."""
    holder: dict[str, str] = {}
    for name in sorted(ckpt.files):
        if name.startswith("optimizer") and name.endswith(".safetensors"):
            for key in tensor_names(ckpt, name):
                if key in holder:
                    raise ConfigError(f"{ckpt.path}: optimizer state {key} is in both {holder[key]} and "
                                      f"{name}")
                holder[key] = name

    def read(keys: list[str]) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for name in sorted({holder[key] for key in keys}):
            tensors.update(load_tensors(ckpt, name, [key for key in keys if holder[key] == name]))
        return tensors

    return list(holder), read


def restore_trajectory(ckpt: layout.Checkpoint, meta: dict[str, Any], model: torch.nn.Module,
                       optimizer: ShardedOptimizer, d: Dist, seed: int) -> None:
    """Weights, this rank's share of the optimizer state and its RNG from a checkpoint, on any world size."""
    model.load_state_dict(load_tensors(ckpt, "model.safetensors"))
    optimizer.load_state(*optimizer_state(ckpt))
    rng_tensors = load_tensors(ckpt, "rng.safetensors")
    if d.rank < meta["world_size"]:
        set_rng_state(meta["rng"][d.rank], {k.split(".", 1)[1]: v for k, v in rng_tensors.items()
                                             if k.startswith(f"rank{d.rank}.")})
    else:  # a rank that did not exist before: its RNG is unused by training, seed it reproducibly
        seed_everything(seed + 1000 * meta["step"] + d.rank)
    log.info("resuming from step=%d path=%s saved_world_size=%d world_size=%d", meta["step"], ckpt.path,
             meta["world_size"], d.world_size)


def save_checkpoint(checkpointer: AsyncCheckpointer, step: int, done: bool, model: torch.nn.Module,
                    optimizer: ShardedOptimizer, d: Dist, meta: Callable[[list[Any]], dict[str, Any]],
                    rank_state: Any = None) -> float:
    """Every rank writes the optimizer state it owns, in parallel, and contributes its RNG (and
    `rank_state`) to rank 0, which also writes the weights (replicated) and the metadata; `meta` turns the
    ranks' states into the stage's metadata. Returns the stall in seconds.

    Raises FencedStop on every rank, once this checkpoint is written, if the sidecar found that a newer
    launch took the run over (see trainer.fencing): training on here would only burn GPUs.
    """
    rng_json, rng_tensors = rng_state()
    start = time.perf_counter()
    contributions = gather({"rng": rng_json, "rng_tensors": rng_tensors, "state": rank_state}, d)
    gather_s = time.perf_counter() - start
    files = {content.optimizer_share_name(d.rank, d.world_size): optimizer.state_share()}
    full_meta = None
    if d.is_main:
        full_meta = {**meta([c["state"] for c in contributions]), "step": step,
                     "world_size": len(contributions), "rng": [c["rng"] for c in contributions],
                     "torch_version": torch.__version__, "optimizer_recipe": OPTIMIZER_RECIPE,
                     "saved_at": time.time()}
        files["model.safetensors"] = model.state_dict()
        files["rng.safetensors"] = {f"rank{r}.{name}": tensor for r, c in enumerate(contributions)
                                    for name, tensor in c["rng_tensors"].items()}
    stall = gather_s + checkpointer.save(step, files, full_meta, done=done)
    if d.is_main:
        log.info("checkpoint step=%d stall_ms=%.1f gather_ms=%.1f", step, stall * 1000, gather_s * 1000)
    # One small read on rank 0 per save, its verdict broadcast; the checkpoint is on disk before we stop.
    stage_dir = checkpointer.directory  # <base_dir>/<stage>_checkpoints/<model_tag>
    fence = broadcast(fencing.fenced_by(stage_dir.parent.parent, stage_dir.name) if d.is_main else None, d)
    if fence is not None:
        checkpointer.wait()
        raise fencing.FencedStop(fencing.fence_message(fence))
    return stall
