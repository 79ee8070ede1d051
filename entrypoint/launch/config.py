"""What `phoenix run` is asked to do: RunConfig, read once from the environment and the command line.

Its fingerprint names the settings a user may change to fix a failed launch (the crash-loop guard's "same
configuration"); PreflightError is the one-line-per-problem refusal every launch step may raise.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from entrypoint.hub.config import HubConfig

# What a user may edit to fix a failed launch.
FINGERPRINTED = ("MODEL_TAG", "PRESET", "DEVICE", "NPROC_PER_NODE", "NNODES", "NODE_RANK", "RUN_SFT",
                 "SAVE_EVERY", "KEEP_LAST", "DATASET_REPO", "FP8", "SFT_DATASET", "SFT_ARGS", "HF_REPO_ID",
                 "HF_REPO_TYPE", "HF_CHECKPOINT_STORE", "HF_BUCKET_ID", "HF_ENDPOINT", "HF_TOKEN",
                 "WANDB_RUN", "WANDB_MODE", "WANDB_PROJECT", "WANDB_API_KEY")


class PreflightError(Exception):
    """One or more set-up problems, one line each; nothing has been downloaded or launched."""


@dataclass
class RunConfig:
    base_dir: Path
    model_tag: str
    preset: str
    nproc_per_node: int | None  # None: all visible GPUs
    run_sft: bool
    device: str  # auto | cuda | cpu
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int
    wandb_run: str
    hub: HubConfig
    preemption_watch: str = "auto"  # PREEMPTION_WATCH: auto | off | aws | gcp | azure (launch.preemption)
    train_args: list[str] = field(default_factory=list)  # base trainer flags (after `--`)
    sft_args: list[str] = field(default_factory=list)  # SFT flags (SFT_ARGS), e.g. "--num-epochs 2"
    fingerprint: str = ""  # of every setting a fix may change: the crash-loop guard's "same configuration"

    @classmethod
    def from_env(cls, train_args: list[str], environ: Mapping[str, str] | None = None) -> RunConfig:
        env = os.environ if environ is None else environ
        nproc = env.get("NPROC_PER_NODE", "").strip()
        try:
            return cls(
                base_dir=Path(env.get("NANOCHAT_BASE_DIR", "~/.cache/nanochat")).expanduser(),
                model_tag=env.get("MODEL_TAG", "d26-hyperbolic"),
                preset=env.get("PRESET", "d26"),
                nproc_per_node=int(nproc) if nproc else None,
                run_sft=env.get("RUN_SFT", "1").strip().lower() not in ("0", "false", "no", ""),
                device=env.get("DEVICE", "auto"),
                nnodes=int(env.get("NNODES", "1")),
                node_rank=int(env.get("NODE_RANK", "0")),
                master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                master_port=int(env.get("MASTER_PORT", "29500")),
                wandb_run=env.get("WANDB_RUN", ""),
                hub=HubConfig.from_env(env),
                preemption_watch=env.get("PREEMPTION_WATCH", "").strip().lower() or "auto",
                train_args=list(train_args),
                sft_args=shlex.split(env.get("SFT_ARGS", "")),
                fingerprint=config_fingerprint(env, train_args),
            )
        except ValueError as exc:
            raise PreflightError(f"bad number in the environment ({exc}): fix NPROC_PER_NODE, NNODES, "
                                 "NODE_RANK or MASTER_PORT") from None


def config_fingerprint(env: Mapping[str, str], train_args: list[str]) -> str:
    """A short hash of the settings and flags; secrets enter only the hash (a new W&B key is a change)."""
    settings = {name: env.get(name, "") for name in FINGERPRINTED}
    blob = json.dumps([settings, list(train_args)], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def nproc_for(cfg: RunConfig, gpus: int) -> int:
    if cfg.nproc_per_node is not None:
        return cfg.nproc_per_node
    return gpus if gpus and cfg.device != "cpu" else 1


