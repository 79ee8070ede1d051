"""Whether this machine can run what RunConfig asks: preflight before a launch, and `phoenix doctor`.

Every problem is one line saying what to do, found before anything is downloaded or launched.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from entrypoint.hub.budget import plan_problem
from entrypoint.hub.calls import retry_after
from entrypoint.hub.config import HubConfig
from entrypoint.hub.errors import HubFatal
from entrypoint.launch.config import PreflightError, RunConfig
from entrypoint.launch.preemption import watch_problem
from entrypoint.logs import redact
from trainer import checkpoint_layout as layout

log = logging.getLogger("phoenix.run")

# Presets' model geometry, for the disk-space estimate without importing torch.
_PRESET_GEOMETRY = {"tiny": (2, 32, 2048), "d20": (20, 64, 32768), "d24": (24, 64, 32768),
                    "d26": (26, 64, 32768)}
DEVICES = ("auto", "cuda", "cpu")


def visible_gpus() -> int:
    """GPUs this container can use, without initialising CUDA (nvidia-smi, else torch)."""
    if (visible := os.environ.get("CUDA_VISIBLE_DEVICES")) is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    if shutil.which("nvidia-smi"):
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
        return sum(line.startswith("GPU ") for line in listing.stdout.splitlines())
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def gpu_inventory(device: str) -> str:
    """The GPUs a launch trains on, as a device batch record's key: each distinct name and memory with its
    count (nvidia-smi, without initialising CUDA), e.g. "8 x NVIDIA H100 80GB HBM3, 81559 MiB"; "cpu"."""
    if device == "cpu" or not shutil.which("nvidia-smi"):
        return "cpu" if device == "cpu" else "unknown"
    query = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True)
    cards = [line.strip() for line in query.stdout.splitlines() if line.strip()]
    return "; ".join(f"{cards.count(card)} x {card}" for card in sorted(set(cards))) or "unknown"


def checkpoint_bytes_estimate(cfg: RunConfig) -> int:
    """Bytes of one checkpoint: from the volume if it has one, else from the preset's geometry."""
    for stage in layout.STAGES:
        if ckpt := layout.latest(layout.stage_dir(cfg.base_dir, stage, cfg.model_tag)):
            return ckpt.total_bytes
    depth, aspect, vocab = _PRESET_GEOMETRY.get(cfg.preset, _PRESET_GEOMETRY["d26"])
    width = depth * aspect
    value_embeddings = (depth + 1) // 2 * vocab * width  # on every other layer
    matrices, embeddings = 12 * depth * width**2, 2 * vocab * width + value_embeddings
    # fp32 weights + Muon momentum (matrices) + AdamW's two moments (embeddings and head).
    return 4 * (matrices + embeddings) + 4 * matrices + 8 * embeddings


def preflight(cfg: RunConfig, check_hub: bool = True) -> list[str]:
    """Every set-up problem, one line each saying what to do; empty when the run can start."""
    problems = list(cfg.problems)  # malformed settings
    base = cfg.base_dir
    if not base.is_dir():
        problems.append(f"NANOCHAT_BASE_DIR={base} does not exist: mount the persistent volume there "
                        "(or create the folder)")
    elif not os.access(base, os.W_OK | os.X_OK):
        problems.append(f"NANOCHAT_BASE_DIR={base} is not writable by uid {os.getuid()}: fix its ownership "
                        "or permissions")
    elif bad := unwritable_folders(cfg):
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        problems.append(f"{bad[0]}{more} is not writable by uid {os.getuid()}, and the run writes there: "
                        f"chown -R {os.getuid()} {bad[0]} (or fix its permissions)")
    else:
        need = 2 * checkpoint_bytes_estimate(cfg)
        free = shutil.disk_usage(base).free
        if free < need:
            problems.append(f"{base} has {free / 2**30:.1f} GiB free, two checkpoints need "
                            f"{need / 2**30:.1f} GiB: free space, lower KEEP_LAST or grow the volume")
    if cfg.preset not in _PRESET_GEOMETRY:
        problems.append(f"PRESET={cfg.preset} is unknown: use one of {', '.join(_PRESET_GEOMETRY)}")
    if cfg.device not in DEVICES:
        problems.append(f"DEVICE={cfg.device!r} is unknown: use one of {', '.join(DEVICES)}")
    gpus = visible_gpus()
    if cfg.device == "cuda" and not gpus:
        problems.append("DEVICE=cuda but no GPU is visible: check the NVIDIA runtime / GPU reservation")
    if cfg.device != "cpu" and cfg.nproc_per_node is not None and gpus and cfg.nproc_per_node > gpus:
        problems.append(f"NPROC_PER_NODE={cfg.nproc_per_node} but only {gpus} GPUs are visible: unset it "
                        "to use all of them (resume works on any GPU count)")
    if cfg.device == "auto" and not gpus and cfg.preset != "tiny":
        problems.append(f"no GPU visible for PRESET={cfg.preset}: check the NVIDIA runtime, or set "
                        "DEVICE=cpu to train on the CPU anyway")
    if problem := watch_problem(cfg.preemption_watch, os.environ.get("PREEMPTION_POLL_S", "").strip()):
        problems.append(problem)
    if cfg.nnodes > 1 and not 0 <= cfg.node_rank < cfg.nnodes:
        problems.append(f"NODE_RANK={cfg.node_rank} is outside 0..{cfg.nnodes - 1}: set it per node")
    mode = os.environ.get("WANDB_MODE", "")
    wants_wandb = cfg.wandb_run and cfg.wandb_run != "dummy"
    wandb_key = os.environ.get("WANDB_API_KEY", "")
    if wants_wandb and mode == "online" and not wandb_key:
        problems.append("WANDB_MODE=online but WANDB_API_KEY is not set: add it to .env, or unset WANDB_MODE "
                        "to log offline")
    elif wants_wandb and mode != "offline" and wandb_key and len(wandb_key) < 40:
        # wandb's own first check, made here so a mistyped key is one line, not a crash per relaunch.
        problems.append(f"WANDB_API_KEY is not a W&B API key ({len(wandb_key)} characters, W&B keys have 40 "
                        "or more): copy yours from wandb.ai/authorize")
    if check_hub and cfg.hub.repo_id:
        on_volume = base.is_dir() and any(layout.latest(layout.stage_dir(base, stage, cfg.model_tag))
                                          for stage in layout.STAGES)
        problems.extend(hub_problems(cfg.hub, volume_has_checkpoint=on_volume))
    return problems


def hub_problems(hub: HubConfig, volume_has_checkpoint: bool) -> list[str]:
    """Token present and valid, and allowed to write HF_REPO_ID's namespace.

    An unreachable Hub only stops a launch whose volume is empty: then the Hub may hold the run's
    progress and starting over would waste the GPUs. With a checkpoint on the volume training goes on
    and the sidecar catches up later.
    """
    if not hub.token:
        return [f"HF_REPO_ID={hub.repo_id} is set but HF_TOKEN is not: add a write token to .env "
                "(or unset HF_REPO_ID to run without the Hub)"]
    from huggingface_hub import HfApi

    try:
        me = whoami(HfApi(endpoint=hub.endpoint, token=hub.token))
    except Exception as exc:  # one line, whatever the client raised
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            return ["the Hub rejected HF_TOKEN (401): create a write token at huggingface.co/settings/tokens"]
        if status == 429:  # whoami is rate-limited hard; the Hub itself answers, and restore and sync retry
            log.warning("warning: the Hub rate-limited whoami (429): HF_TOKEN not checked; going on")
            return []
        if volume_has_checkpoint:
            log.warning("cannot reach the Hub (%s): training from the volume; the sidecar pushes later",
                        redact(exc.__class__.__name__))
            return []
        return [f"cannot reach the Hub ({redact(exc.__class__.__name__)}) and the volume has no checkpoint "
                "to resume from: check the network or HF_ENDPOINT (or unset HF_REPO_ID to start without it)"]
    owned = {me.get("name"), *(org.get("name") for org in me.get("orgs", []))}
    if hub.repo_id.split("/")[0] not in owned:
        return [f"HF_TOKEN belongs to {me.get('name')!r}, which cannot write to {hub.repo_id}: use that "
                "namespace or a token of its owner"]
    if hub.in_bucket and hub.bucket_id is not None and hub.bucket_id.split("/")[0] not in owned:
        return [f"HF_TOKEN belongs to {me.get('name')!r}, which cannot write the bucket HF_BUCKET_ID="
                f"{hub.bucket_id}: use a namespace of that account, or unset HF_BUCKET_ID"]
    role = me.get("auth", {}).get("accessToken", {}).get("role")
    if role == "read":
        return ["HF_TOKEN is read-only: create a token with write access"]
    return []


def whoami(api: Any, attempts: int = 5, max_wait: float = 60.0) -> dict[str, Any]:
    """`api.whoami()`, retried on 429 and 5xx: the Hub rate-limits it heavily, and a launch (or a Docker
    restart of one) must not fail on a busy minute. Waits follow Retry-After, capped at `max_wait`."""
    for attempt in range(1, attempts + 1):
        try:
            return api.whoami()
        except Exception as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if attempt == attempts or not (status == 429 or (status or 0) >= 500):
                raise
            wait = min(max_wait, retry_after(exc) or 2.0**attempt)
            log.warning("whoami answered %s: retry %d/%d in %.0fs", status, attempt, attempts - 1, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


def storage_problems(cfg: RunConfig) -> list[str]:
    """Whether the preset's checkpoints at HF_KEEP_LAST and HF_SYNC_INTERVAL fit HF_STORAGE_LIMIT_GB as the
    Hub counts them (`budget`): not a launch problem (the sidecar waits rather than being refused), but a
    backup that falls behind, which `phoenix doctor` says in one line."""
    if not cfg.hub.repo_id:
        return []
    problem = plan_problem(cfg.hub, cfg.preset, checkpoint_bytes_estimate(cfg), cfg.run_sft)
    return [problem] if problem else []


def unwritable_folders(cfg: RunConfig) -> list[Path]:
    """Existing folders the run will write into where this uid cannot: a root-owned checkpoint folder
    would otherwise surface only at the first save, SAVE_EVERY steps into the run."""
    base, tag = cfg.base_dir, cfg.model_tag
    folders = [base / name for name in ("logs", "runs", "tokenizer", "base_data", "sft_data", ".restore",
                                        "cache", layout.QUARANTINE_DIR)] + [base / "runs" / tag]
    step_folders = []
    for stage in layout.STAGES:
        directory = layout.stage_dir(base, stage, tag)
        folders += [directory.parent, directory]
        step_folders += [path for _, path in layout.step_dirs(directory)]  # pruning deletes their files
    bad = [folder for folder in folders if folder.is_dir() and not _can_create_file(folder)]
    return bad + [folder for folder in step_folders if not os.access(folder, os.W_OK | os.X_OK)]


def _can_create_file(folder: Path) -> bool:
    """A real probe (access() misses read-only mounts and immutable folders); the name is a tmp name,
    which the sidecar and the checkpoint scans ignore."""
    try:
        fd, probe = tempfile.mkstemp(prefix=f"{layout.TMP_PREFIX}probe-", dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


@click.command("doctor")
def doctor_command() -> None:
    """Check the set-up (volume, GPUs, Hub token, W&B; the Docker engine when run on the host)."""
    from entrypoint.launch.host import docker_problems

    try:
        cfg = RunConfig.from_env([])
        problems = preflight(cfg) + docker_problems(cfg.base_dir) + storage_problems(cfg)
    except (PreflightError, HubFatal) as exc:
        problems = str(exc).splitlines()
    for line in problems:
        click.echo(f"error: {redact(line)}", err=True)
    if problems:
        sys.exit(2)
    click.echo("ok: volume, GPUs, Hub and W&B settings look right")
