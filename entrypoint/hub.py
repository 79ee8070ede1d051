"""The Hugging Face Hub side of phoenix: config from the environment, retries, one-line errors, Hub state.

`phoenix sync` and `phoenix restore` both talk to the Hub only through this module. The repo mirrors the
volume: `<stage>_checkpoints/<tag>/step_NNNNNN/<files>`, `tokenizer/tokenizer.json`, `runs/<tag>/run.json`
and `runs/<tag>/generation.json` (the fencing token, see `claim_generation`). A checkpoint is complete on
the Hub iff its MANIFEST.json is there: sync commits it in the same commit as every file it lists.
"""

from __future__ import annotations

import email.utils
import io
import json
import logging
import os
import random
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

try:  # huggingface_hub 2.x's HTTP client; 1.x (a bare GPU image's) uses httpx, with the same names
    import httpx2
except ImportError:
    import httpx as httpx2
from huggingface_hub import CommitOperationAdd, HfApi, RepoFile, hf_hub_url
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

# `http_get` is the library's own resumable download loop (Range requests from `resume_size`); the
# higher-level hf_hub_download restarts a killed download from byte 0 (see restore.py). `xet_get` is its
# Xet download of one file (hf_xet reconstructs it from CAS chunks).
from huggingface_hub.file_download import get_hf_file_metadata, http_get, xet_get
from huggingface_hub.utils import (
    build_hf_headers,
    disable_progress_bars,
    parse_ratelimit_headers,
    validate_repo_id,
)
from huggingface_hub.utils._runtime import is_xet_available
from huggingface_hub.utils.sha import git_hash

from entrypoint.logs import redact, setup_logging
from trainer import __version__, fencing
from trainer import checkpoint_layout as layout

log = logging.getLogger("phoenix.hub")
T = TypeVar("T")

DEFAULT_MODEL_TAG = "d26-hyperbolic"
DEFAULT_SYNC_INTERVAL = 1200.0
# Checkpoints per stage kept on the Hub: a pass may push this many before pruning, so a stage peaks at
# twice it; with base's last ones kept while SFT runs, a d26 run (~9 GB each) peaks at 6 x 9 = 54 GB,
# inside a free account's 100 GB of private storage (README, "Hub storage").
DEFAULT_HUB_KEEP_LAST = 2
TOKENIZER_PATH = "tokenizer/tokenizer.json"
RUN_FILE = "run.json"
EVAL_DIR = "eval"  # runs/<tag>/eval/<stage>_stepNNNNNN.json: `phoenix eval` results
GENERATION_FILE = fencing.GENERATION_FILE
TRAINER_STATUS_FILE = "trainer_status.json"
_OS_ERROR = re.compile(r"\(os error (\d+)\)")
_TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}
# The Hub's rate limits count over 5-minute windows, so no honest Retry-After is longer; a bigger one (an
# hour was seen) would park the sidecar, and its final push, past any stop grace period.
MAX_RETRY_AFTER_S = 300.0
# How the Hub words a full account (403): "Private repository storage limit reached, please upgrade your
# plan...", "Your storage patterns tripped our internal systems! Please contact us...".
_QUOTA_MESSAGE = re.compile(r"storage limit|storage patterns|quota", re.IGNORECASE)
_URL_QUERY = re.compile(r"\?[^\s'\"]*")
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


class HubError(Exception):
    """A Hub problem worth one log line and no stack trace."""


class HubFatal(HubError):
    """Wrong configuration or credentials: retrying cannot help, the user has to change something."""


class RepoMissing(HubFatal):
    """The repo does not exist (or this token cannot see it): fatal for sync, nothing to do for restore."""


class HubUnavailable(HubError):
    """The Hub kept failing with transient errors (down, 5xx, rate limited) after our retries."""


class HeadMoved(HubError):
    """Someone committed between our read of the head and our commit (HTTP 412 on parent_commit)."""


class RevisionGone(HubError):
    """The commit we read from is no longer on the Hub (the history was squashed): re-read the head."""


class Fenced(HubError):
    """A newer launch claimed the repo: this process must not push or delete anything."""


class QuotaExceeded(HubError):
    """The account's storage is full (403): not the token's fault, and space may be freed, so retried."""


class Pause:
    """How retries wait in one process: SIGTERM (`stop`) ends a wait at once; once stopping, a wait must
    end before `deadline` (the final push has to fit the stop grace period) or it is not started."""

    def __init__(self, stop: threading.Event | None = None) -> None:
        self.stop = stop or threading.Event()
        self.deadline: float | None = None  # time.monotonic() by which the process must be done

    def sleep(self, seconds: float) -> bool:
        """Wait `seconds`; False if the wait was cut short or would overrun the deadline: give up."""
        if self.deadline is None:
            return not self.stop.wait(seconds)
        if time.monotonic() + seconds > self.deadline:
            return False
        time.sleep(seconds)
        return True

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline


def kv(**fields: Any) -> str:
    """One log line in key=value style; values with spaces or quotes are JSON-quoted."""
    parts = []
    for key, value in fields.items():
        text = f"{value:.1f}" if isinstance(value, float) else str(value)
        if not text or any(c in text for c in ' "=\n'):
            text = json.dumps(text)
        parts.append(f"{key}={text}")
    return " ".join(parts)


def setup_hub_logging(log_file: Path) -> logging.Logger:
    """phoenix logging (stdout + `log_file`, secrets masked) that also carries huggingface_hub's warnings."""
    logger = setup_logging(log_file)
    library = logging.getLogger("huggingface_hub")
    for handler in list(library.handlers):
        library.removeHandler(handler)
    for handler in logger.handlers:
        library.addHandler(handler)
    library.setLevel(logging.WARNING)
    library.propagate = False
    disable_progress_bars()  # tqdm bars are noise in `docker compose logs`; we log MB/s per checkpoint
    return logger


# ---------------------------------------------------------------------------------------------- config


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

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> HubConfig:
        """Raise HubFatal (one line: which variable, what to set) on a malformed value."""
        env = os.environ if environ is None else environ
        repo_id = env.get("HF_REPO_ID", "").strip() or None
        if repo_id is not None:
            try:
                validate_repo_id(repo_id)
            except HFValidationError:
                raise HubFatal(_bad_repo_id(repo_id)) from None
            if repo_id.count("/") != 1:  # the bare-name form only works for create_repo, not for reads
                raise HubFatal(_bad_repo_id(repo_id))
        repo_type = env.get("HF_REPO_TYPE", "").strip() or "model"
        if repo_type not in ("model", "dataset"):
            raise HubFatal(f"HF_REPO_TYPE={repo_type!r} is not supported: set it to 'model' or 'dataset'")
        private_text = env.get("HF_PRIVATE", "").strip().lower() or "true"
        if private_text not in _TRUE | _FALSE:
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
        return cls(
            base_dir=Path(env.get("NANOCHAT_BASE_DIR") or Path.home() / ".cache" / "nanochat"),
            model_tag=env.get("MODEL_TAG", "").strip() or DEFAULT_MODEL_TAG,
            repo_id=repo_id,
            repo_type=repo_type,
            private=private_text in _TRUE,
            token=env.get("HF_TOKEN") or None,
            endpoint=(env.get("HF_ENDPOINT") or "").rstrip("/") or None,
            sync_interval=interval,
            keep_last=keep_last,
        )

    @classmethod
    def from_env_or_exit(cls) -> HubConfig:
        """For CLI commands: the config, or one `error:` line (token masked) and exit code 2."""
        try:
            return cls.from_env()
        except HubFatal as exc:
            print(f"error: {redact(str(exc))}", file=sys.stderr)
            sys.exit(2)

    # The repo mirrors the volume, so one relative path names a file in both places.
    def local(self, path_in_repo: str) -> Path:
        return self.base_dir / path_in_repo

    def stage_path(self, stage: str) -> str:
        return layout.stage_dir("", stage, self.model_tag).as_posix()

    def checkpoint_path(self, stage: str, step: int) -> str:
        return f"{self.stage_path(stage)}/{layout.step_dir_name(step)}"

    def run_path(self, name: str) -> str:
        return f"runs/{self.model_tag}/{name}"


def _bad_repo_id(repo_id: str) -> str:
    return f"HF_REPO_ID={repo_id!r} is not a valid repo id: set it to 'namespace/name', e.g. 'alice/ckpts'"


# ---------------------------------------------------------------------------------------------- errors


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and its causes: the LFS upload wraps the HTTP error in a RuntimeError."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _response(exc: BaseException) -> httpx2.Response | None:
    for err in _chain(exc):
        if isinstance(err, HfHubHTTPError) and err.response is not None:
            return err.response
    return None


def _status(exc: BaseException) -> int | None:
    response = _response(exc)
    return response.status_code if response is not None else None


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: connection refused/reset/timeouts, 5xx, 408, 429, a download cut short."""
    status = _status(exc)
    if status is not None:
        return status in _TRANSIENT_STATUS
    return any(
        isinstance(err, httpx2.TransportError | ConnectionError | TimeoutError)
        or (isinstance(err, OSError) and "Consistency check failed" in str(err))
        for err in _chain(exc)
    )


def retry_after(exc: BaseException) -> float | None:
    """Seconds the server asked us to wait, if it did: Retry-After (seconds or HTTP date), else on a 429
    the Hub's RateLimit header (seconds until the window resets)."""
    response = _response(exc)
    if response is None:
        return None
    value = response.headers.get("Retry-After", "").strip()
    if value.isdigit():
        return float(value)
    if value:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None
    limit = parse_ratelimit_headers(response.headers)
    if response.status_code == 429 and limit is not None and limit.remaining == 0:
        return float(limit.reset_in_seconds)
    return None


def _server_message(exc: BaseException) -> str:
    response = _response(exc)
    header = response.headers.get("X-Error-Message", "") if response is not None else ""
    return " ".join([header, *(str(err) for err in _chain(exc))])


def _is_hub_api(exc: BaseException) -> bool:
    """Whether the failed request went to the Hub's API (token checked there), not to file storage."""
    response = _response(exc)
    try:
        path = response.request.url.path if response is not None else ""
    except RuntimeError:  # a response built without its request
        return True
    return path.startswith("/api/") and "/xet-" not in path


def short_error(exc: BaseException) -> str:
    """First line of the error (the server's, under a client wrapper), prefixed by its status if it has
    one, without URL queries (upload URLs carry signatures): enough for a log line."""
    status = _status(exc)
    source = next((err for err in _chain(exc) if isinstance(err, HfHubHTTPError)), exc)
    line = (str(source).strip().splitlines() or [type(exc).__name__])[0]
    line = _URL_QUERY.sub("", line)
    return f"{status} {line}" if status is not None and str(status) not in line else line


def to_hub_error(exc: BaseException, cfg: HubConfig) -> HubError | None:
    """Translate a client exception into a one-line HubError, or None if it looks like a bug."""
    if isinstance(exc, HubError):
        return exc
    repo = f"{cfg.repo_type} repo HF_REPO_ID={cfg.repo_id}"
    if any(isinstance(err, OfflineModeIsEnabled) for err in _chain(exc)):
        return HubFatal("HF_HUB_OFFLINE is set, so the Hub cannot be reached: unset it to sync or restore")
    if any(isinstance(err, HFValidationError) for err in _chain(exc)):
        return HubFatal(_bad_repo_id(cfg.repo_id or ""))
    if is_transient(exc):
        return HubUnavailable(f"Hub unreachable or overloaded: {short_error(exc)}")
    status = _status(exc)
    not_found = any(isinstance(err, RepositoryNotFoundError) for err in _chain(exc))
    if status == 412:
        return HeadMoved("the repo moved on while we were committing (412)")
    if any(isinstance(err, RevisionNotFoundError) for err in _chain(exc)):
        return RevisionGone("the commit being read is gone from the Hub (history squashed)")
    if status == 403 and _QUOTA_MESSAGE.search(_server_message(exc)):
        return QuotaExceeded(
            f"the Hub account's storage is full ({short_error(exc)}): nothing new is backed up until space "
            "is freed; lower HF_KEEP_LAST, delete old checkpoints with their history, or get a bigger plan "
            "(retried every pass)"
        )
    if status in (401, 403) and not _is_hub_api(exc):
        # The API accepted the token (every pass starts with repo_info), so a refusal from the storage
        # side (an expired upload URL, a Xet token refresh) is not a settings problem: try again later.
        return HubError(f"the Hub's storage refused an upload: {short_error(exc)}")
    if status == 401 and not cfg.token:  # anonymous callers get 401 for any private or missing repo
        return HubFatal("HF_TOKEN is not set (401 unauthenticated): set it to a token with write access")
    if status == 401 and not not_found:
        return HubFatal(
            "the Hub rejected HF_TOKEN (401 invalid credentials): set HF_TOKEN to a valid access token"
        )
    if status == 401 or not_found:
        return (RepoMissing if status == 404 else HubFatal)(
            f"{repo} does not exist or HF_TOKEN cannot see it: check HF_REPO_ID and HF_REPO_TYPE, and that "
            "HF_TOKEN is set and has access to that repo"
        )
    if status == 403:
        return HubFatal(
            f"HF_TOKEN may not write to {repo} (403 forbidden): use a token with write access, or a repo "
            "in a namespace the token owns"
        )
    if status is not None:
        return HubError(f"the Hub refused the request: {short_error(exc)}")
    return None


def call(
    what: str,
    fn: Callable[[], T],
    cfg: HubConfig,
    *,
    attempts: int = 4,
    max_wait: float = 30.0,
    pause: Pause | None = None,
) -> T:
    """Run `fn`, retrying transient Hub errors with exponential backoff; Retry-After is honoured up to
    MAX_RETRY_AFTER_S, and `pause` ends the waits at SIGTERM.

    Raises a HubError subclass (HubFatal, HubUnavailable, HeadMoved, ...) instead of library exceptions,
    and lets anything unrecognised through (a sync pass reports it as a failed pass).
    """
    pause = pause or Pause()
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            err = to_hub_error(exc, cfg)
            if err is None:
                raise
            if not isinstance(err, HubUnavailable) or attempt == attempts:
                raise err from exc
            asked = retry_after(exc)
            wait = (
                min(asked, MAX_RETRY_AFTER_S)
                if asked is not None
                else min(max_wait, 2 ** (attempt - 1)) * random.uniform(0.8, 1.2)
            )
            log.warning(
                kv(
                    event="hub_retry",
                    what=what,
                    attempt=f"{attempt}/{attempts}",
                    wait_s=round(wait, 2),
                    retry_after=asked if asked is not None else "-",
                    error=short_error(exc),
                )
            )
            if not pause.sleep(wait):
                raise HubUnavailable(f"{err} (stopping: no time left to retry)") from exc
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------- the Hub


@dataclass(frozen=True)
class HubSnapshot:
    """The repo at one commit: every file with its size and hashes."""

    head: str
    files: dict[str, RepoFile]

    def complete_steps(self, cfg: HubConfig, stage: str) -> list[int]:
        """Steps whose MANIFEST.json is on the Hub, highest first: the Hub's definition of complete."""
        prefix = cfg.stage_path(stage) + "/"
        steps = set()
        for path in self.files:
            step_name, _, name = path.removeprefix(prefix).partition("/")
            step = layout.parse_step(step_name)
            if path.startswith(prefix) and name == layout.MANIFEST_NAME and step is not None:
                steps.add(step)
        return sorted(steps, reverse=True)

    def checkpoint_files(self, cfg: HubConfig, stage: str, step: int) -> dict[str, RepoFile]:
        prefix = cfg.checkpoint_path(stage, step) + "/"
        return {p[len(prefix) :]: f for p, f in self.files.items() if p.startswith(prefix)}

    def same(self, path_in_repo: str, local: Path, sha256: str | None = None) -> bool:
        """True if the Hub already holds exactly this content at this path (LFS sha256 or git blob id)."""
        remote = self.files.get(path_in_repo)
        if remote is None or remote.size != local.stat().st_size:
            return False
        if remote.lfs is not None:
            return remote.lfs.sha256 == (sha256 or layout.sha256_file(local))
        return remote.blob_id == git_hash(local.read_bytes())


class Hub:
    """A Hub repo seen through huggingface_hub's HfApi, with phoenix's retries and error lines."""

    def __init__(self, cfg: HubConfig, api: HfApi | None = None, pause: Pause | None = None):
        if cfg.repo_id is None:
            raise ValueError("Hub needs HF_REPO_ID")
        self.cfg = cfg
        self.pause = pause or Pause()
        self.repo_id: str = cfg.repo_id
        self.api = api or HfApi(
            endpoint=cfg.endpoint, token=cfg.token, library_name="phoenix", library_version=__version__
        )

    def call(self, what: str, fn: Callable[[], T], **kw: Any) -> T:
        return call(what, fn, self.cfg, pause=self.pause, **kw)

    def ensure_repo(self) -> None:
        """Create the repo if missing (private unless HF_PRIVATE=false); an existing one is left as it is.

        Looked up first: create_repo is rate limited, and on the Hub it needs the right to create repos in
        the namespace even when the repo exists (exist_ok), which a token scoped to one repo lacks.
        """
        try:
            self.head()
            return
        except RepoMissing:
            pass
        self.call(
            "create_repo",
            lambda: self.api.create_repo(
                self.repo_id, repo_type=self.cfg.repo_type, private=self.cfg.private, exist_ok=True
            ),
        )

    def head(self) -> str:
        info = self.call("repo_info", lambda: self.api.repo_info(self.repo_id, repo_type=self.cfg.repo_type))
        assert info.sha is not None
        return info.sha

    def snapshot(self) -> HubSnapshot:
        """Head commit and the full file listing at exactly that commit."""
        head = self.head()
        entries = self.call(
            "list_repo_tree",
            lambda: list(
                self.api.list_repo_tree(
                    self.repo_id, recursive=True, revision=head, repo_type=self.cfg.repo_type
                )
            ),
        )
        return HubSnapshot(head=head, files={e.path: e for e in entries if isinstance(e, RepoFile)})

    def commits(self) -> list[Any]:
        return self.call("list_repo_commits", lambda: self.api.list_repo_commits(
            self.repo_id, repo_type=self.cfg.repo_type))

    def used_storage(self) -> int | None:
        """Bytes of large files the repo's history holds, as the Hub counts them (None if not reported)."""
        info = self.call("repo_info", lambda: self.api.repo_info(
            self.repo_id, repo_type=self.cfg.repo_type, expand=["usedStorage"]))
        return info.used_storage

    def squash(self, message: str) -> None:
        """Squash the history of `main` into one commit with the same tree: frees what nothing keeps."""
        self.call("super_squash_history", lambda: self.api.super_squash_history(
            self.repo_id, repo_type=self.cfg.repo_type, commit_message=message))

    def url(self, path_in_repo: str, revision: str) -> str:
        return hf_hub_url(
            self.repo_id,
            path_in_repo,
            repo_type=self.cfg.repo_type,
            revision=revision,
            endpoint=self.cfg.endpoint,
        )

    def fetch(
        self, path_in_repo: str, dest: BinaryIO, *, revision: str, size: int, resume_size: int = 0
    ) -> None:
        """Stream one file into `dest` (positioned after `resume_size` bytes already there) via Range."""
        http_get(
            self.url(path_in_repo, revision),
            dest,
            resume_size=resume_size,
            headers=build_hf_headers(
                token=self.cfg.token, library_name="phoenix", library_version=__version__
            ),
            expected_size=size,
            displayed_filename=path_in_repo,
        )

    def fetch_xet(self, path_in_repo: str, dest: Path, *, revision: str, size: int) -> bool:
        """Download a Xet-backed file into `dest` through hf_xet; False (nothing done) for other files,
        or when Xet is off (HF_HUB_DISABLE_XET=1, no hf_xet)."""
        if not is_xet_available():
            return False
        headers = build_hf_headers(token=self.cfg.token, library_name="phoenix", library_version=__version__)
        url = self.url(path_in_repo, revision)
        meta = get_hf_file_metadata(url, token=self.cfg.token, headers=headers, endpoint=self.cfg.endpoint)
        if meta.xet_file_data is None:
            return False
        try:
            xet_get(incomplete_path=dest, xet_file_data=meta.xet_file_data, headers=headers,
                    expected_size=size, displayed_filename=path_in_repo)
        except RuntimeError as exc:
            # hf_xet reports a local I/O failure (full disk, read-only volume) as a RuntimeError ending in
            # "(os error N)": give it back its errno, so it is the same one-line volume error as over HTTP.
            if (found := _OS_ERROR.search(str(exc))) is None:
                raise
            code = int(found.group(1))
            raise OSError(code, os.strerror(code), str(dest)) from exc
        return True

    def read_json(self, snapshot: HubSnapshot, path_in_repo: str) -> Any:
        """A small JSON file at the snapshot's commit, or None if it is not in the repo."""
        remote = snapshot.files.get(path_in_repo)
        if remote is None:
            return None

        def download() -> bytes:
            buf = io.BytesIO()
            self.fetch(path_in_repo, buf, revision=snapshot.head, size=remote.size)
            return buf.getvalue()

        data = self.call(f"download {path_in_repo}", download)
        try:
            return json.loads(data)
        except ValueError:
            log.warning(kv(event="bad_json", path=path_in_repo))
            return None

    def claim_record(self, snapshot: HubSnapshot) -> dict[str, Any]:
        """The Hub's generation.json (generation, claimed_at, host), {} if absent or unreadable."""
        record = self.read_json(snapshot, self.cfg.run_path(GENERATION_FILE))
        return record if isinstance(record, dict) else {}

    def generation(self, snapshot: HubSnapshot) -> int:
        return generation_of(self.claim_record(snapshot))

    def commit(self, operations: list[Any], message: str, parent: str) -> str:
        """One commit on top of `parent` (412: HeadMoved); returns the new head; LFS uploads are parallel."""

        def attempt() -> str:
            # Operation objects are mutated by create_commit, so every attempt gets fresh copies.
            ops = [_fresh(op) for op in operations]
            info = self.api.create_commit(
                self.repo_id,
                ops,
                commit_message=message,
                repo_type=self.cfg.repo_type,
                parent_commit=parent,
            )
            return info.oid

        return self.call(f"commit {message!r}", attempt)


def add_operation(path_in_repo: str, local: Path, sha256: str | None = None) -> CommitOperationAdd:
    """An upload of `local`; a known sha256 (from the manifest) saves create_commit from hashing it again."""
    op = CommitOperationAdd(path_in_repo=path_in_repo, path_or_fileobj=str(local))
    if sha256 is not None:
        op.upload_info.sha256 = bytes.fromhex(sha256)
    return op


def _fresh(op: Any) -> Any:
    if not isinstance(op, CommitOperationAdd):
        return op
    sha = op.upload_info.sha256.hex() if op.upload_info.is_hashed else None
    if isinstance(op.path_or_fileobj, bytes):
        return CommitOperationAdd(path_in_repo=op.path_in_repo, path_or_fileobj=op.path_or_fileobj)
    return add_operation(op.path_in_repo, Path(str(op.path_or_fileobj)), sha)


# ---------------------------------------------------------------------------------------------- fencing


def generation_of(obj: Any) -> int:
    value = obj.get("generation") if isinstance(obj, dict) else None
    return value if isinstance(value, int) and value >= 0 else 0


def local_generation(cfg: HubConfig) -> int:
    """This volume's launch generation (0 before the first claim)."""
    return fencing.local_generation(cfg.base_dir, cfg.model_tag)


def claim_generation(cfg: HubConfig, hub: Hub | None = None, *, attempts: int = 5) -> int:
    """Fence off every older launch: commit generation max(Hub, volume) + 1, then write it to the volume.

    Called by the entrypoint at launch. The commit carries parent_commit, so two launches racing for the
    same number cannot both win: the loser re-reads and takes the next one. Raises HubError if the Hub
    cannot be reached; the volume is then left unchanged.
    """
    hub = hub or Hub(cfg)
    hub.ensure_repo()
    path = cfg.run_path(GENERATION_FILE)
    for _ in range(attempts):
        snapshot = hub.snapshot()
        generation = max(hub.generation(snapshot), local_generation(cfg)) + 1
        # When and where, for the one line a fenced instance prints (trainer.fencing).
        claim = {"generation": generation, "claimed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "host": socket.gethostname()}
        body = json.dumps(claim, indent=1, sort_keys=True).encode() + b"\n"
        try:
            hub.commit(
                [CommitOperationAdd(path_in_repo=path, path_or_fileobj=body)],
                f"claim generation {generation} of {cfg.model_tag}",
                parent=snapshot.head,
            )
        except HeadMoved:
            continue
        layout.write_json_atomic(cfg.local(path), {"generation": generation})
        log.info(kv(event="generation_claimed", generation=generation, repo=cfg.repo_id))
        return generation
    raise HubError(f"could not claim a generation on {cfg.repo_id}: the repo kept changing under us")
