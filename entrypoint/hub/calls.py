"""Calling the Hub: client errors turned into one-line HubErrors, retries with backoff, SIGTERM-aware waits.

Every Hub call of phoenix (the git repo, a Storage Bucket, Xet transfers) goes through `call`, so a fault is
either retried (5xx, 429, network, a refused Xet token) or one line naming what to do (`errors`). A wait the
Hub asks for that is longer than a call should block (the hourly commit quota) is handed to the caller as
`RateLimited`: the sidecar's loop waits it out between passes, so the pass after it pushes the newest.
"""

from __future__ import annotations

import email.utils
import logging
import random
import re
import threading
import time
from collections.abc import Callable
from typing import TypeVar

try:  # huggingface_hub 2.x's HTTP client; 1.x (a bare GPU image's) uses httpx, with the same names
    import httpx2
except ImportError:
    import httpx as httpx2
import hf_xet
from huggingface_hub.errors import (
    BucketBatchError,
    BucketNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import parse_ratelimit_headers

from entrypoint.hub.config import HubConfig
from entrypoint.hub.errors import (
    HeadMoved,
    HubError,
    HubFatal,
    HubUnavailable,
    QuotaExceeded,
    RateLimited,
    RepoMissing,
    RevisionGone,
    StorageLocked,
    bad_repo_id,
)
from entrypoint.logs import kv

log = logging.getLogger("phoenix.hub")
T = TypeVar("T")

_TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}
# The Hub's API limits count over 5-minute windows, but its commit quota is hourly ("You have exceeded our
# hourly quotas for action: commit"), with Retry-After or `RateLimit: "api";r=0;t=N` up to an hour.
MAX_RETRY_AFTER_S = 3600.0
# Longer waits are not slept inside a call: `RateLimited` lets the caller wait (and a SIGTERM end it).
MAX_INLINE_WAIT_S = 60.0
# How the Hub words a full account (403): "Private repository storage limit reached, please upgrade your
# plan..."; a locked one: "Your storage patterns tripped our internal systems! Please contact us at
# website@huggingface.co" (huggingface_hub#3366), which only a person can lift.
_QUOTA_MESSAGE = re.compile(r"storage limit|quota", re.IGNORECASE)
_LOCKED_MESSAGE = re.compile(r"storage patterns", re.IGNORECASE)
HUB_CONTACT = "website@huggingface.co"
# hf_xet's faults: a refused token (XetAuthenticationError, a PermissionError) and a CAS object gone
# (XetObjectNotFoundError, a FileNotFoundError). hf_xet 1.8 defines both, yet through huggingface_hub an
# upload raises ConnectionError("... Auth error: Token refresh failed ...", then "... (401 Unauthorized),
# domain: .../xet-write-token") and a download RuntimeError ("Task error: ... Auth error ..." / "... CAS
# object not found ..."): both the classes and the words count.
_XET_AUTH = (getattr(hf_xet, "XetAuthenticationError", None),
             re.compile(r"Auth error|401 Unauthorized\).*/xet-(read|write)-token", re.I))
_XET_GONE = (getattr(hf_xet, "XetObjectNotFoundError", None), re.compile(r"object not found", re.I))
_URL_QUERY = re.compile(r"\?[^\s'\"]*")


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


def _is_xet(exc: BaseException, kind: type[BaseException] | None, words: re.Pattern[str]) -> bool:
    """Whether hf_xet raised this fault: its own exception class (hf_xet >= 1.8), or its words under a
    generic one (the HTTP client's errors carry no such text)."""
    return any((kind is not None and isinstance(err, kind))
               or (isinstance(err, RuntimeError | ConnectionError) and bool(words.search(str(err))))
               for err in _chain(exc))


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


def _batch_failures(exc: BaseException) -> list[dict[str, str]]:
    """The operations a bucket batch reported as failed (the others were applied: not transactional)."""
    return next((err.failures for err in _chain(exc) if isinstance(err, BucketBatchError)), [])


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
    one, followed by the Hub's own message if that line lacks it (a 429's names the quota), without URL
    queries (upload URLs carry signatures): enough for a log line."""
    status, response = _status(exc), _response(exc)
    source = next((err for err in _chain(exc) if isinstance(err, HfHubHTTPError)), exc)
    line = (str(source).strip().splitlines() or [type(exc).__name__])[0]
    server = response.headers.get("X-Error-Message", "").strip() if response is not None else ""
    line = _URL_QUERY.sub("", line if server in line else f"{line.rstrip('.')}: {server}")
    return f"{status} {line}" if status is not None and str(status) not in line else line


def to_hub_error(exc: BaseException, cfg: HubConfig) -> HubError | None:
    """Translate a client exception into a one-line HubError, or None if it looks like a bug."""
    if isinstance(exc, HubError):
        return exc
    repo = f"{cfg.git_repo_type} repo HF_REPO_ID={cfg.repo_id}"
    if cfg.in_bucket:
        repo += f" (or the bucket {' or '.join(cfg.bucket_ids)}, which holds its checkpoints)"
    if any(isinstance(err, OfflineModeIsEnabled) for err in _chain(exc)):
        return HubFatal("HF_HUB_OFFLINE is set, so the Hub cannot be reached: unset it to sync or restore")
    if any(isinstance(err, HFValidationError) for err in _chain(exc)):
        return HubFatal(bad_repo_id(cfg.repo_id or ""))
    if _is_xet(exc, *_XET_GONE):
        return RevisionGone(f"a Xet object of the file being read is gone from the Hub (pruned meanwhile): "
                            f"{short_error(exc)}")
    if _is_xet(exc, *_XET_AUTH):
        return HubUnavailable(f"Xet storage refused its access token ({short_error(exc)}): retried; if it "
                              "persists, check that HF_TOKEN may still read and write HF_REPO_ID")
    if any(isinstance(err, GatedRepoError) for err in _chain(exc)):
        return HubFatal(f"cannot read a gated repo ({short_error(exc)}): accept its conditions on its Hub "
                        "page with the account of HF_TOKEN, or use a token whose account has")
    if is_transient(exc):
        return HubUnavailable(f"Hub unreachable or overloaded: {short_error(exc)}")
    status = _status(exc)
    failures = _batch_failures(exc)
    not_found = any(isinstance(err, RepositoryNotFoundError | BucketNotFoundError) for err in _chain(exc))
    if status == 412:
        return HeadMoved("the repo moved on while we were committing (412)")
    if any(isinstance(err, RevisionNotFoundError) for err in _chain(exc)):
        return RevisionGone("the commit being read is gone from the Hub (history squashed)")
    if (status == 403 or failures) and _LOCKED_MESSAGE.search(_server_message(exc)):
        return StorageLocked(
            f"the Hub locked this account's uploads ({short_error(exc)}): write to {HUB_CONTACT} to have it "
            "lifted; nothing is uploaded until then (restart the sidecar once it is)"
        )
    if (status == 403 or failures) and _QUOTA_MESSAGE.search(_server_message(exc)):
        free = ("delete other private files of the account" if cfg.in_bucket
                else "unset HF_CHECKPOINT_STORE (a bucket frees a delete at once)")
        return QuotaExceeded(
            f"the Hub account's storage is full ({short_error(exc)}): nothing new is backed up until space "
            f"is freed; lower HF_KEEP_LAST or HF_STORAGE_LIMIT_GB, {free}, or get a bigger plan (retried in "
            "an hour)"
        )
    if failures:
        first = failures[0]
        return HubError(f"the bucket refused {len(failures)} file operation(s), e.g. {first.get('path')}: "
                        f"{first.get('error')}")
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
    """Run `fn`, retrying transient Hub errors with exponential backoff; a Retry-After up to
    MAX_INLINE_WAIT_S is waited here (`pause` ends the wait at SIGTERM), a longer one raises RateLimited.

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
            if asked is not None and asked > MAX_INLINE_WAIT_S:
                wait = min(asked, MAX_RETRY_AFTER_S)
                raise RateLimited(f"the Hub asks to wait {wait:.0f}s before {what} ({short_error(exc)})",
                                  wait) from exc
            backoff = min(max_wait, 2 ** (attempt - 1)) * random.uniform(0.8, 1.2)
            wait = asked if asked is not None else backoff
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
