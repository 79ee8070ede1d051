"""A cloud metadata server on loopback for the tests and bench/preemption.py: AWS IMDSv2, GCP or Azure.

It answers as each cloud documents (see `entrypoint.launch.clouds`) and enforces what they enforce: AWS
refuses a GET without a live session token (401) and a token PUT without its TTL header (400), GCP and
Azure refuse requests without their Metadata header. Nothing is announced until `announce()`; `warn()`
raises the earlier risk signal; every request is logged for the tests to inspect.

    with FakeMetadata("aws") as cloud:       # PREEMPTION_WATCH=aws PREEMPTION_METADATA_URL=cloud.url
        cloud.announce(seconds=120)           # spot/instance-action now answers the notice
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
import urllib.parse
from datetime import datetime, timezone
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

VM_NAME = "phoenix-vm"


class FakeMetadata:
    def __init__(self, cloud: str, vm_name: str = VM_NAME) -> None:
        assert cloud in ("aws", "gcp", "azure"), cloud
        self.cloud, self.vm_name = cloud, vm_name
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # (method, path with query, headers)
        self._state = threading.Condition()
        self._notice: dict[str, Any] | None = None  # {"deadline": epoch, "event": str}
        self._warning = False
        self._other_vm_event = False
        self._tokens: set[str] = set()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-metadata", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeMetadata:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.announce_nothing()
        self._server.shutdown()
        self._server.server_close()

    # --- what the cloud says ---------------------------------------------------------------------------

    def announce(self, seconds: float = 120.0, event: str | None = None) -> None:
        """The interruption notice, `seconds` ahead: AWS instance-action, GCP preempted, Azure Preempt."""
        default = {"aws": "terminate", "gcp": "preempted", "azure": "Preempt"}[self.cloud]
        self._set(notice={"deadline": time.time() + seconds, "event": event or default})

    def warn(self) -> None:
        """The earlier risk signal: AWS rebalance, GCP TERMINATE_ON_HOST_MAINTENANCE, Azure Reboot."""
        self._set(warning=True)

    def announce_for_another_vm(self) -> None:
        """Azure: a Preempt event for another VM of the same scale set, which lists it too."""
        self._set(other_vm_event=True)

    def announce_nothing(self) -> None:
        self._set(notice=None, warning=False, other_vm_event=False)

    def expire_tokens(self) -> None:
        """AWS: every session token issued so far stops working (as after its TTL)."""
        with self._state:
            self._tokens.clear()

    def _set(self, **changes: Any) -> None:
        with self._state:
            for name, value in changes.items():
                setattr(self, f"_{name}", value)
            self._state.notify_all()

    # --- the three wordings ----------------------------------------------------------------------------

    def answer(self, method: str, path: str, query: dict[str, str], headers: dict[str, str]
               ) -> tuple[int, str, dict[str, str]]:
        self.requests.append((method, path + ("?" + urllib.parse.urlencode(query) if query else ""), headers))
        return getattr(self, f"_{self.cloud}")(method, path, query, headers)

    def _aws(self, method: str, path: str, _query: dict[str, str], headers: dict[str, str]
             ) -> tuple[int, str, dict[str, str]]:
        if method == "PUT" and path == "/latest/api/token":
            ttl = headers.get("x-aws-ec2-metadata-token-ttl-seconds", "")
            if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                return 400, "", {}
            token = secrets.token_urlsafe(32)
            with self._state:
                self._tokens.add(token)
            return 200, token, {"X-aws-ec2-metadata-token-ttl-seconds": ttl}
        with self._state:
            if headers.get("x-aws-ec2-metadata-token") not in self._tokens:
                return 401, "", {}
            notice, warning = self._notice, self._warning
        if path == "/latest/meta-data/spot/instance-action" and notice:
            when = datetime.fromtimestamp(notice["deadline"], timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            return 200, json.dumps({"action": notice["event"], "time": when}), {}
        if path == "/latest/meta-data/events/recommendations/rebalance" and warning:
            now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            return 200, json.dumps({"noticeTime": now}), {}
        return 404, "<html>404 - Not Found</html>", {}

    def _gcp(self, _method: str, path: str, query: dict[str, str], headers: dict[str, str]
             ) -> tuple[int, str, dict[str, str]]:
        if headers.get("metadata-flavor") != "Google":
            return 403, "Missing Metadata-Flavor:Google header.", {}
        values = {"/computeMetadata/v1/instance/preempted": lambda: "TRUE" if self._notice else "FALSE",
                  "/computeMetadata/v1/instance/maintenance-event":
                      lambda: "TERMINATE_ON_HOST_MAINTENANCE" if self._warning else "NONE"}
        if path not in values:
            return 404, "", {}
        value = values[path]
        with self._state:
            if query.get("wait_for_change") == "true":
                # Returns at once if the caller's etag is stale, else when the value changes or at timeout.
                last = query.get("last_etag") or _etag(value())
                self._state.wait_for(lambda: _etag(value()) != last,
                                     timeout=float(query.get("timeout_sec", "300")))
            body = value()
        return 200, body, {"Metadata-Flavor": "Google", "ETag": _etag(body)}

    def _azure(self, _method: str, path: str, query: dict[str, str], headers: dict[str, str]
               ) -> tuple[int, str, dict[str, str]]:
        if headers.get("metadata") != "true" or "api-version" not in query:
            return 400, json.dumps({"error": "Bad request. Required metadata header not specified"}), {}
        if path == "/metadata/instance/compute/name" and query.get("format") == "text":
            return 200, self.vm_name, {}
        if path != "/metadata/scheduledevents":
            return 404, "", {}
        events = []
        with self._state:
            if self._other_vm_event:
                events.append(_azure_event("Preempt", "another-vm", time.time() + 30))
            if self._warning:
                events.append(_azure_event("Reboot", self.vm_name, time.time() + 900))
            if self._notice:
                events.append(_azure_event(self._notice["event"], self.vm_name, self._notice["deadline"]))
        return 200, json.dumps({"DocumentIncarnation": len(events), "Events": events}), {}


def _etag(value: str) -> str:
    return hashlib.sha1(value.encode()).hexdigest()[:16]


def _azure_event(kind: str, vm: str, not_before: float) -> dict[str, Any]:
    return {"EventId": secrets.token_hex(8), "EventType": kind, "ResourceType": "VirtualMachine",
            "Resources": [vm], "EventStatus": "Scheduled", "EventSource": "Platform",
            "NotBefore": format_datetime(datetime.fromtimestamp(not_before, timezone.utc), usegmt=True),
            "Description": "", "DurationInSeconds": -1}


def _handler(metadata: FakeMetadata) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            query = dict(urllib.parse.parse_qsl(url.query))
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, body, extra = metadata.answer(self.command, url.path, query, headers)
            data = body.encode()
            self.send_response(status)
            for key, value in {"Content-Type": "text/plain", **extra}.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_PUT = do_POST = _serve

        def log_message(self, *_args: Any) -> None:  # the tests read `requests`, not stderr
            pass

    return Handler
