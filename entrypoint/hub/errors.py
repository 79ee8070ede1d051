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


class HeadMoved(HubError):
    """Someone committed between our read of the head and our commit (HTTP 412 on parent_commit)."""


class RevisionGone(HubError):
    """The commit we read from is no longer on the Hub (the history was squashed): re-read the head."""


class Fenced(HubError):
    """A newer launch claimed the repo: this process must not push or delete anything."""


class QuotaExceeded(HubError):
    """The account's storage is full (403): not the token's fault, and space may be freed, so retried."""



def bad_repo_id(repo_id: str) -> str:
    return f"HF_REPO_ID={repo_id!r} is not a valid repo id: set it to 'namespace/name', e.g. 'alice/ckpts'"
