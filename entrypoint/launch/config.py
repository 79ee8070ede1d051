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
from typing import Any

from entrypoint.hub.config import DEFAULT_MODEL_TAG, FALSE_WORDS, TRUE_WORDS, HubConfig, model_tag_problem
from entrypoint.hub.errors import HubFatal
from trainer.save_policy import AUTO, parse_save_every

# What a user may edit to fix a failed launch.
FINGERPRINTED = ("MODEL_TAG", "PRESET", "DEVICE", "NPROC_PER_NODE", "NNODES", "NODE_RANK", "RUN_SFT",
                 "SAVE_EVERY", "KEEP_LAST", "DATASET_REPO", "FP8", "SFT_DATASET", "SFT_ARGS", "HF_REPO_ID",
                 "HF_REPO_TYPE", "HF_CHECKPOINT_STORE", "HF_BUCKET_ID", "HF_ENDPOINT", "HF_TOKEN",
                 "WANDB_RUN", "WANDB_MODE", "WANDB_PROJECT", "WANDB_API_KEY", "HF_PRIVATE",
                 "HF_SYNC_INTERVAL", "HF_KEEP_LAST", "PHOENIX_MAX_FAILURES", "MASTER_PORT")


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
    max_failures: int = 3  # PHOENIX_MAX_FAILURES: identical failed launches before the guard holds
    # Malformed settings, one line each (their defaults stand in meanwhile): preflight reports them, so
    # the crash-loop guard counts them like any other set-up problem.
    problems: list[str] = field(default_factory=list)

    @classmethod
    def from_env(cls, train_args: list[str], environ: Mapping[str, str] | None = None) -> RunConfig:
        """Raises PreflightError only for a MODEL_TAG that is not a safe name: the run's files (the
        failure record among them) are found by it, so nothing may be written before it is checked."""
        env = os.environ if environ is None else environ
        model_tag = env.get("MODEL_TAG", "").strip() or DEFAULT_MODEL_TAG
        if problem := model_tag_problem(model_tag):
            raise PreflightError(problem)
        problems: list[str] = []
        base_dir = Path(env.get("NANOCHAT_BASE_DIR") or "~/.cache/nanochat").expanduser()
        try:
            hub = HubConfig.from_env(env)
        except HubFatal as exc:
            problems.append(str(exc))
            hub = HubConfig(base_dir, model_tag, repo_id=None)
        try:
            sft_args = shlex.split(env.get("SFT_ARGS", ""))
        except ValueError as exc:  # an unclosed quote
            problems.append(f"SFT_ARGS cannot be split into flags ({exc}): fix its quoting")
            sft_args = []
        number = _Numbers(env, problems)
        return cls(
            base_dir=base_dir,
            model_tag=model_tag,
            preset=env.get("PRESET", "").strip() or "d26",
            nproc_per_node=number("NPROC_PER_NODE", None, 1, "unset it to use every visible GPU"),
            run_sft=_switch(env, "RUN_SFT", True, problems),
            device=env.get("DEVICE", "").strip() or "auto",
            nnodes=number("NNODES", 1, 1, "it counts the nodes of the run"),
            node_rank=number("NODE_RANK", 0, 0, "0 on the first node, 1 on the next..."),
            master_addr=env.get("MASTER_ADDR", "").strip() or "127.0.0.1",
            master_port=number("MASTER_PORT", 29500, 1, "e.g. 29500"),
            wandb_run=env.get("WANDB_RUN", ""),
            hub=hub,
            preemption_watch=env.get("PREEMPTION_WATCH", "").strip().lower() or "auto",
            train_args=list(train_args),
            sft_args=sft_args,
            fingerprint=config_fingerprint(env, train_args),
            max_failures=number("PHOENIX_MAX_FAILURES", 3, 1, "e.g. 3"),
            problems=problems + trainer_setting_problems(env),
        )


class _Numbers:
    """Integer settings: a malformed one is a line in `problems`, and its default stands in."""

    def __init__(self, env: Mapping[str, str], problems: list[str]) -> None:
        self.env, self.problems = env, problems

    def __call__(self, name: str, default: int | None, minimum: int, hint: str) -> Any:
        text = self.env.get(name, "").strip()
        if not text:
            return default
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            self.problems.append(f"{name}={text!r} is not an integer of at least {minimum}: {hint}")
            return default
        return value


def _switch(env: Mapping[str, str], name: str, default: bool, problems: list[str]) -> bool:
    text = env.get(name, "").strip().lower()
    if not text:
        return default
    if text not in TRUE_WORDS | FALSE_WORDS:
        problems.append(f"{name}={text!r} is not a switch: set it to 1 or 0")
        return default
    return text in TRUE_WORDS


def trainer_setting_problems(env: Mapping[str, str]) -> list[str]:
    """The variables the stage scripts read themselves, checked before any of them starts."""
    problems = []
    save_every = env.get("SAVE_EVERY", "").strip()
    try:
        parse_save_every(save_every or AUTO)
    except ValueError:
        problems.append(f"SAVE_EVERY={save_every!r} is neither a positive number of steps nor 'auto': set it "
                        "to e.g. 250")
    keep_last = env.get("KEEP_LAST", "").strip()
    if keep_last and not (keep_last.isdigit() and int(keep_last) > 0):
        problems.append(f"KEEP_LAST={keep_last!r} is not a positive number of checkpoints: set it to e.g. 3")
    return problems


def config_fingerprint(env: Mapping[str, str], train_args: list[str]) -> str:
    """A short hash of the settings and flags; secrets enter only the hash (a new W&B key is a change)."""
    settings = {name: env.get(name, "") for name in FINGERPRINTED}
    blob = json.dumps([settings, list(train_args)], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def nproc_for(cfg: RunConfig, gpus: int) -> int:
    if cfg.nproc_per_node is not None:
        return cfg.nproc_per_node
    return gpus if gpus and cfg.device != "cpu" else 1
