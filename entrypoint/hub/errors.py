"""The Hub's faults as phoenix names them: one exception per way a caller answers (retry, stop, re-read).

`calls.to_hub_error` turns the client's exceptions into these; their message is the one line a user reads.
"""

from __future__ import annotations


class HubError(Exception):
    """A Hub problem worth one log line and no stack trace."""


class HubFatal(HubError):
    """Wrong configuration or credentials: retrying cannot help, the user has to change something."""


class RepoMissing(HubFatal):
    """The repo does not exist (or this token cannot see it): fatal for sync, nothing to do for restore."""


class HubUnavailable(HubError):
    """The Hub kept failing with transient errors (down, 5xx, rate limited) after our retries."""


class RateLimited(HubUnavailable):
    """The Hub asked us to wait longer than a call waits (the hourly commit quota): `retry_in` seconds."""

    def __init__(self, message: str, retry_in: float) -> None:
        super().__init__(message)
        self.retry_in = retry_in


class HeadMoved(HubError):
    """Someone committed between our read of the head and our commit (HTTP 412 on parent_commit)."""


class RevisionGone(HubError):
    """The commit we read from is no longer on the Hub (the history was squashed): re-read the head."""


class Fenced(HubError):
    """A newer launch claimed the repo: this process must not push or delete anything."""


class QuotaExceeded(HubError):
    """The account's storage is full (403): not the token's fault, and space may be freed, so retried
    (after an hour: the Hub credits freed storage late)."""


class StorageLocked(HubFatal):
    """The Hub locked the account's uploads ("Your storage patterns tripped our internal systems"): only a
    person at Hugging Face can lift it, so nothing is uploaded until the sidecar is restarted."""


def bad_repo_id(repo_id: str) -> str:
    return f"HF_REPO_ID={repo_id!r} is not a valid repo id: set it to 'namespace/name', e.g. 'alice/ckpts'"
