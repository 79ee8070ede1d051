"""Test hooks of the local Hub: injected failures, cut downloads, a bandwidth cap, counters, a request log."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from entrypoint.demo.localhub.common import CHUNK, LoggedRequest


@dataclass
class Fault:
    remaining: int
    path_contains: str | None
    method: str | None
    status: int = 500
    retry_after: int | None = None
    cut_after: int = 0
    message: str | None = None

    def matches(self, method: str, path: str) -> bool:
        return self.method in (None, method) and (self.path_contains is None or self.path_contains in path)


@dataclass
class Pause:
    """A request held before it is handled: `reached` is set when it arrives, `release()` lets it go on."""

    path_contains: str
    method: str | None
    reached: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)

    def release(self) -> None:
        self.released.set()


class FaultHooks:
    """Mixed into LocalHub; everything here is guarded by `_obs_lock`, never by the repo lock."""

    def __init__(self) -> None:
        self.throttle_bps: int | None = None  # caps resolve GET and LFS PUT body speed, bytes per second
        self.bytes_uploaded = 0  # LFS PUT body bytes, plus new content committed from Xet uploads
        self.bytes_downloaded = 0  # resolve GET body bytes sent
        self._obs_lock = threading.Lock()  # counters, request log, faults, tickets, connections
        self._log: list[LoggedRequest] = []
        self._in_flight = 0  # requests whose handler has not returned (a body may still be going out)
        self._faults: list[Fault] = []
        self._cuts: list[Fault] = []
        self._pauses: list[Pause] = []
        self._bucket_op_faults: list[Fault] = []

    def fail_next(
        self,
        n: int = 1,
        status: int = 500,
        path_contains: str | None = None,
        method: str | None = None,
        retry_after: int | None = None,
        message: str | None = None,
    ) -> None:
        """Answer the next `n` matching requests with `status` (plus `Retry-After` when given) and the error
        `message` (the Hub's wording, e.g. "Private repository storage limit reached, ...")."""
        fault = Fault(n, path_contains, method, status=status, retry_after=retry_after, message=message)
        with self._obs_lock:
            self._faults.append(fault)

    def fail_bucket_op(self, path_contains: str, n: int = 1, message: str = "Injected failure") -> None:
        """Report the next `n` bucket batch operations on a path containing `path_contains` in the batch's
        `failed` list, unapplied (the client raises BucketBatchError). Other bucket faults use the generic
        hooks on the bucket's URLs: `fail_next(503, path_contains="/api/buckets/ns/b/batch")`, a refused
        token with `fail_next(403, path_contains="/api/buckets/ns/b/xet-write-token")`, and
        `pause_next("/api/buckets/ns/b/batch")` to hold a batch after its Xet upload."""
        with self._obs_lock:
            self._bucket_op_faults.append(Fault(n, path_contains, None, status=422, message=message))

    def cut_next(self, after_bytes: int, n: int = 1, path_contains: str | None = None) -> None:
        """Close the connection of the next `n` matching resolve GETs after `after_bytes` body bytes."""
        with self._obs_lock:
            self._cuts.append(Fault(n, path_contains, "GET", cut_after=after_bytes))

    def pause_next(self, path_contains: str, method: str | None = None) -> Pause:
        """Hold the next matching request until `release()` (or 60 s): a client can be killed while it waits,
        e.g. between its Xet upload and its commit, or a squash can land while a restore is paused."""
        pause = Pause(path_contains, method)
        with self._obs_lock:
            self._pauses.append(pause)
        return pause

    def _hold(self, method: str, path: str) -> None:
        with self._obs_lock:
            matching = (p for p in self._pauses if p.method in (None, method) and p.path_contains in path)
            pause = next(matching, None)
            if pause is not None:
                self._pauses.remove(pause)
        if pause is not None:
            pause.reached.set()
            pause.released.wait(60)

    @property
    def request_log(self) -> list[LoggedRequest]:
        """Every request, logged as its status line goes out: a client that read a response finds it here."""
        with self._obs_lock:
            return list(self._log)

    @property
    def requests_in_flight(self) -> int:
        """Requests still being handled: 0 once every body has gone out and every byte is counted."""
        with self._obs_lock:
            return self._in_flight

    def _record(self, entry: LoggedRequest) -> None:
        with self._obs_lock:
            self._log.append(entry)

    def _count_in_flight(self, delta: int) -> None:
        with self._obs_lock:
            self._in_flight += delta

    def _count(self, uploaded: int = 0, downloaded: int = 0) -> None:
        with self._obs_lock:
            self.bytes_uploaded += uploaded
            self.bytes_downloaded += downloaded

    def _take(self, faults: list[Fault], method: str, path: str) -> Fault | None:
        with self._obs_lock:
            for fault in faults:
                if fault.matches(method, path):
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        faults.remove(fault)
                    return fault
        return None

    def _throttle(self, nbytes: int) -> None:
        if self.throttle_bps:
            time.sleep(nbytes / self.throttle_bps)

    def _chunk_size(self) -> int:
        return min(CHUNK, max(1024, self.throttle_bps // 20)) if self.throttle_bps else CHUNK
