"""HubConfig: everything phoenix needs to talk to the Hub, read once from the environment, and the paths that
the Hub repo and the volume share (the repo mirrors the volume: one relative path names a file in both).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from entrypoint.hub.errors import HubFatal, bad_repo_id
from entrypoint.logs import fail
from trainer import checkpoint_layout as layout
from trainer import fencing

DEFAULT_MODEL_TAG = "d26-hyperbolic"
DEFAULT_SYNC_INTERVAL = 1200.0
# Checkpoints per stage kept on the Hub: a stage peaks at one more while the next one goes up; with base's
# final one kept while SFT runs, a d26 run (16.7 GB each) peaks at 4 x 16.7 = 67 GB in a bucket, inside a
# free account's 100 GB of private storage (README, "Hub storage").
DEFAULT_HUB_KEEP_LAST = 2
# A free account's private storage: what the sidecar's storage budget allows by default.
DEFAULT_STORAGE_LIMIT_GB = 100.0
# The Hub credits a squash (or a permanent deletion) "within 36 hours": freed files count until then.
DEFAULT_CREDIT_HOURS = 36.0
CHECKPOINT_STORES = ("bucket", "repo")
# The bucket's name when the Hub refuses a bucket of the same id as the repo (HF_BUCKET_ID unset).
SECOND_BUCKET_SUFFIX = "-checkpoints"
TOKENIZER_PATH = "tokenizer/tokenizer.json"
RUN_FILE = "run.json"
EVAL_DIR = "eval"  # runs/<tag>/eval/<stage>_stepNNNNNN.json: `phoenix eval` results
GENERATION_FILE = fencing.GENERATION_FILE
TRAINER_STATUS_FILE = "trainer_status.json"
REPO_TYPES = ("model", "dataset", "bucket")
TRUE_WORDS, FALSE_WORDS = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}
# MODEL_TAG names folders on the volume and paths in the Hub repo: one plain name, never a path.
_MODEL_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def model_tag_problem(tag: str) -> str | None:
    """One line when `tag` could name anything but one folder of its own ('../x', 'a/b', ' '), else None."""
    if _MODEL_TAG.fullmatch(tag) and ".." not in tag:
        return None
    return (f"MODEL_TAG={tag!r} is not a safe name: use 1-64 letters, digits, '.', '_' or '-', starting "
            "with a letter or digit (no '/', no '..')")


@dataclass(frozen=True)
class HubConfig:
    """Everything phoenix needs to talk to the Hub, read once from the environment."""

    base_dir: Path
    model_tag: str
    repo_id: str | None
    repo_type: str = "model"
    private: bool = True
    token: str | None = None
    endpoint: str | None = None
    sync_interval: float = DEFAULT_SYNC_INTERVAL
    keep_last: int | None = DEFAULT_HUB_KEEP_LAST  # None keeps every checkpoint (HF_KEEP_LAST=all)
    checkpoint_store: str = "bucket"  # HF_CHECKPOINT_STORE: the Storage Bucket, or the git repo itself
    bucket_id: str | None = None  # HF_BUCKET_ID; None: HF_REPO_ID, else its second name (`bucket_ids`)
    storage_limit: float = DEFAULT_STORAGE_LIMIT_GB * 1e9  # bytes the run may hold on the Hub
    credit_delay: float = DEFAULT_CREDIT_HOURS * 3600  # seconds until the Hub credits a squash

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> HubConfig:
        """Raise HubFatal (one line: which variable, what to set) on a malformed value."""
        env = os.environ if environ is None else environ
        model_tag = env.get("MODEL_TAG", "").strip() or DEFAULT_MODEL_TAG
        if problem := model_tag_problem(model_tag):
            raise HubFatal(problem)
        repo_id = env.get("HF_REPO_ID", "").strip() or None
        # The bare-name form only works for create_repo, not for reads.
        if repo_id is not None and (not _valid_id(repo_id) or repo_id.count("/") != 1):
            raise HubFatal(bad_repo_id(repo_id))
        repo_type = env.get("HF_REPO_TYPE", "").strip() or "model"
        if repo_type not in REPO_TYPES:
            raise HubFatal(f"HF_REPO_TYPE={repo_type!r} is not supported: set it to 'model', 'dataset' or "
                           "'bucket' (checkpoints in a Storage Bucket)")
        private_text = env.get("HF_PRIVATE", "").strip().lower() or "true"
        if private_text not in TRUE_WORDS | FALSE_WORDS:
            raise HubFatal(f"HF_PRIVATE={private_text!r} is not a boolean: set it to 'true' or 'false'")
        interval_text = env.get("HF_SYNC_INTERVAL", "").strip() or str(DEFAULT_SYNC_INTERVAL)
        try:
            interval = float(interval_text)
            if interval <= 0:
                raise ValueError
        except ValueError:
            raise HubFatal(
                f"HF_SYNC_INTERVAL={interval_text!r} is not a positive number of seconds: set it to e.g. 1200"
            ) from None
        keep_text = env.get("HF_KEEP_LAST", "").strip()
        try:
            keep_last = None if keep_text == "all" else int(keep_text or DEFAULT_HUB_KEEP_LAST)
            if keep_last is not None and keep_last < 1:
                raise ValueError
        except ValueError:
            raise HubFatal(
                f"HF_KEEP_LAST={keep_text!r} is not a positive integer: set it to e.g. 2, or to 'all' to "
                "keep every checkpoint on the Hub"
            ) from None
        store = env.get("HF_CHECKPOINT_STORE", "").strip() or "bucket"
        if store not in CHECKPOINT_STORES or (repo_type == "bucket" and store == "repo"):
            raise HubFatal(f"HF_CHECKPOINT_STORE={store!r} is not supported: set it to 'bucket' (the "
                           "default) or 'repo' (checkpoints in the git repo HF_REPO_ID; not with "
                           "HF_REPO_TYPE=bucket)")
        bucket_id = env.get("HF_BUCKET_ID", "").strip() or None
        if bucket_id is not None and (bucket_id.count("/") != 1 or not _valid_id(bucket_id)):
            raise HubFatal(f"HF_BUCKET_ID={bucket_id!r} is not a valid bucket id: set it to "
                           "'namespace/name', or unset it to use HF_REPO_ID's")
        limit = _positive(env, "HF_STORAGE_LIMIT_GB", DEFAULT_STORAGE_LIMIT_GB, "100 (a free account)")
        credit = _positive(env, "HF_SQUASH_CREDIT_HOURS", DEFAULT_CREDIT_HOURS, "36", zero_ok=True)
        return cls(
            base_dir=Path(env.get("NANOCHAT_BASE_DIR") or Path.home() / ".cache" / "nanochat"),
            model_tag=model_tag,
            repo_id=repo_id,
            repo_type=repo_type,
            private=private_text in TRUE_WORDS,
            token=env.get("HF_TOKEN") or None,
            endpoint=(env.get("HF_ENDPOINT") or "").rstrip("/") or None,
            sync_interval=interval,
            keep_last=keep_last,
            checkpoint_store="bucket" if repo_type == "bucket" else store,
            bucket_id=bucket_id,
            storage_limit=limit * 1e9,
            credit_delay=credit * 3600,
        )

    @classmethod
    def from_env_or_exit(cls) -> HubConfig:
        """For CLI commands: the config, or one `error:` line (token masked) and exit code 2."""
        try:
            return cls.from_env()
        except HubFatal as exc:
            fail(str(exc))

    # The repo mirrors the volume, so one relative path names a file in both places.
    def local(self, path_in_repo: str) -> Path:
        return self.base_dir / path_in_repo

    def stage_path(self, stage: str) -> str:
        return layout.stage_dir("", stage, self.model_tag).as_posix()

    def checkpoint_path(self, stage: str, step: int) -> str:
        return f"{self.stage_path(stage)}/{layout.step_dir_name(step)}"

    def run_path(self, name: str) -> str:
        return f"runs/{self.model_tag}/{name}"

    @property
    def in_bucket(self) -> bool:
        """Checkpoints go to a Storage Bucket (the default), not into the git repo's history."""
        return self.checkpoint_store == "bucket"

    @property
    def bucket_ids(self) -> list[str]:
        """Where the bucket may be, in order: HF_BUCKET_ID, else HF_REPO_ID's id, then its second name (for a
        Hub that refuses a bucket and a repo of one id)."""
        if self.bucket_id is not None:
            return [self.bucket_id]
        assert self.repo_id is not None
        return [self.repo_id, self.repo_id + SECOND_BUCKET_SUFFIX]

    @property
    def git_repo_type(self) -> str:
        """The type of the git repo that holds the claim and run files (and the checkpoints, unless they go
        to a bucket: then it is the model repo of the same id, see `bucket_store`)."""
        return "model" if self.repo_type == "bucket" else self.repo_type


def _valid_id(repo_id: str) -> bool:
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return False
    return True


def _positive(env: Mapping[str, str], name: str, default: float, example: str, zero_ok: bool = False
              ) -> float:
    text = env.get(name, "").strip() or str(default)
    try:
        value = float(text)
        if value < 0 or (value == 0 and not zero_ok):
            raise ValueError
    except ValueError:
        raise HubFatal(f"{name}={text!r} is not a positive number: set it to e.g. {example}") from None
    return value


def local_generation(cfg: HubConfig) -> int:
    """This volume's launch generation (0 before the first claim)."""
    return fencing.local_generation(cfg.base_dir, cfg.model_tag)
