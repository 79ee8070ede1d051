"""What each cloud's metadata server says about this VM being taken away: AWS, GCP and Azure, read-only.

One `check()` per poll returns a Notice or None; the watch around it (`preemption`) decides what to do.
Each follows its cloud's documentation:

- AWS (IMDSv2): PUT /latest/api/token with X-aws-ec2-metadata-token-ttl-seconds, then every GET carries
  X-aws-ec2-metadata-token. /latest/meta-data/spot/instance-action answers 404 until EC2 marks the spot
  instance, then {"action": "terminate" | "stop" | "hibernate", "time": "<UTC ISO 8601>"}, two minutes
  ahead; poll every 5 s. /latest/meta-data/events/recommendations/rebalance ({"noticeTime": ...}) comes
  earlier, when the instance's risk rises: a warning, not a notice.
- GCP: GET /computeMetadata/v1/instance/preempted with Metadata-Flavor: Google answers FALSE, then TRUE
  when the VM is preempted (about 30 s before it stops); `?wait_for_change=true&last_etag=...` holds the
  request until the value changes. instance/maintenance-event TERMINATE_ON_HOST_MAINTENANCE (GPU VMs,
  up to an hour ahead) is a warning.
- Azure: GET /metadata/scheduledevents?api-version=2020-07-01 with Metadata: true lists events for
  every VM of the availability set or scale set; ours name this VM (instance/compute/name) in Resources.
  Preempt (spot eviction, at least 30 s ahead) and Terminate are notices, with NotBefore as the deadline;
  Reboot and Redeploy are warnings. We never acknowledge an event: that would only make it come sooner.
"""

from __future__ import annotations

import email.utils
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

DMI_DIR = Path("/sys/class/dmi/id")
# Hyper-V on a desk says "Microsoft Corporation" too; only Azure's chassis carries this asset tag.
AZURE_ASSET_TAG = "7783-7084-3265-9085-8269-3286-77"
METADATA_URLS = {"aws": "http://169.254.169.254", "gcp": "http://metadata.google.internal",
                 "azure": "http://169.254.169.254"}
PREEMPTION, WARNING = "preemption", "warning"
GCP_NOTICE_S = 30.0  # GCP stops a preempted VM about 30 s after preempted turns TRUE
# No proxy for link-local metadata addresses, whatever HTTP_PROXY says.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Notice:
    """What a cloud announced. kind: PREEMPTION (the VM goes away: stop and save) or WARNING (its risk
    rose: push what there is, keep training). deadline: when the cloud acts (epoch seconds), if it says."""

    source: str  # aws | gcp | azure
    kind: str
    event: str  # the cloud's own word: terminate, stop, hibernate, preempted, Preempt, rebalance, ...
    deadline: float | None = None
    noticed: float = field(default_factory=time.time)

    def seconds_left(self, now: float | None = None) -> float | None:
        return None if self.deadline is None else self.deadline - (time.time() if now is None else now)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> Notice:
        return cls(**{name: record[name] for name in ("source", "kind", "event", "deadline", "noticed")})


class MetadataUnavailable(Exception):
    """The metadata server did not answer as documented (unreachable, refused, malformed)."""


class CloudMetadata(Protocol):
    source: str

    def check(self) -> Notice | None: ...


def detect_cloud(dmi_dir: Path = DMI_DIR) -> str | None:
    """aws, gcp or azure from the firmware's DMI strings (no network, a few small reads), or None."""
    def read(name: str) -> str:
        try:
            return (dmi_dir / name).read_text().strip()
        except OSError:
            return ""

    text = " ".join(read(n) for n in ("sys_vendor", "product_name", "bios_vendor", "bios_version")).lower()
    if "amazon" in text:  # "Amazon EC2" on Nitro, bios_version "4.11.amazon" on Xen
        return "aws"
    if "google" in text:  # "Google Compute Engine", "Google"
        return "gcp"
    if read("chassis_asset_tag") == AZURE_ASSET_TAG:
        return "azure"
    return None


def _request(url: str, headers: dict[str, str], method: str = "GET", timeout: float = 2.0
             ) -> tuple[int, str, dict[str, str]]:
    """(status, body, headers); an HTTP error status is an answer, an unreachable server is not."""
    request = urllib.request.Request(url, headers=headers, method=method)
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return response.status, response.read().decode(errors="replace"), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace"), dict(exc.headers or {})
    except (OSError, ValueError) as exc:  # URLError, timeouts, refused connections, a bad URL
        reason = getattr(exc, "reason", exc)
        raise MetadataUnavailable(f"{url.split('?')[0]}: {reason}") from None


def _json(body: str, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise MetadataUnavailable(f"{what} is not a JSON object: {body[:80]!r}")
    return doc


def _iso_time(text: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class AwsMetadata:
    """EC2's instance metadata through IMDSv2 session tokens (refreshed before they expire, and on 401)."""

    source = "aws"
    TOKEN_TTL_S = 21600

    def __init__(self, base_url: str = METADATA_URLS["aws"]) -> None:
        self.base_url = base_url.rstrip("/")
        self._token: str | None = None
        self._token_expires = 0.0

    def _fetch_token(self) -> str:
        status, body, _ = _request(f"{self.base_url}/latest/api/token", method="PUT",
                                   headers={"X-aws-ec2-metadata-token-ttl-seconds": str(self.TOKEN_TTL_S)})
        if status != 200 or not body:
            raise MetadataUnavailable(f"no IMDSv2 token (PUT /latest/api/token answered {status})")
        self._token, self._token_expires = body.strip(), time.monotonic() + self.TOKEN_TTL_S - 60
        return self._token

    def _get(self, path: str) -> tuple[int, str]:
        for attempt in range(2):
            if self._token is None or time.monotonic() > self._token_expires:
                self._fetch_token()
            status, body, _ = _request(f"{self.base_url}{path}",
                                       headers={"X-aws-ec2-metadata-token": self._token or ""})
            if status != 401 or attempt:
                return status, body
            self._token = None  # expired or revoked: one new token, once
        raise AssertionError("unreachable")

    def check(self) -> Notice | None:
        status, body = self._get("/latest/meta-data/spot/instance-action")
        if status == 200:
            doc = _json(body, "spot/instance-action")
            return Notice("aws", PREEMPTION, str(doc.get("action", "terminate")), _iso_time(doc.get("time")))
        if status != 404:
            raise MetadataUnavailable(f"spot/instance-action answered {status}")
        status, body = self._get("/latest/meta-data/events/recommendations/rebalance")
        if status == 200:
            return Notice("aws", WARNING, "rebalance")
        if status != 404:
            raise MetadataUnavailable(f"events/recommendations/rebalance answered {status}")
        return None


class GcpMetadata:
    """Compute Engine's metadata server; `preempted` is awaited with wait_for_change, so a notice is seen
    the moment it is set rather than at the next poll."""

    source = "gcp"
    HEADERS = {"Metadata-Flavor": "Google"}

    def __init__(self, base_url: str = METADATA_URLS["gcp"], wait_s: int = 60) -> None:
        self.base_url = base_url.rstrip("/")
        self.wait_s = wait_s
        self._etag: str | None = None

    def _get(self, name: str, wait: bool = False) -> str:
        url = f"{self.base_url}/computeMetadata/v1/instance/{name}"
        if wait and self._etag:
            url += "?" + urllib.parse.urlencode({"wait_for_change": "true", "last_etag": self._etag,
                                                 "timeout_sec": self.wait_s})
        status, body, headers = _request(url, self.HEADERS, timeout=self.wait_s + 5 if wait else 2.0)
        if status != 200:
            raise MetadataUnavailable(f"instance/{name} answered {status}")
        if wait:
            self._etag = headers.get("ETag") or headers.get("Etag") or self._etag
        return body.strip()

    def check(self) -> Notice | None:
        if self._get("preempted", wait=True).upper() == "TRUE":
            now = time.time()
            return Notice("gcp", PREEMPTION, "preempted", now + GCP_NOTICE_S, noticed=now)
        maintenance = self._get("maintenance-event")
        if maintenance == "TERMINATE_ON_HOST_MAINTENANCE":
            return Notice("gcp", WARNING, maintenance)
        return None


class AzureMetadata:
    """Azure's Scheduled Events for this VM (the first call switches the service on and may take a while)."""

    source = "azure"
    API_VERSION = "2020-07-01"
    HEADERS = {"Metadata": "true"}
    NOTICES, WARNINGS = ("Preempt", "Terminate"), ("Reboot", "Redeploy")

    def __init__(self, base_url: str = METADATA_URLS["azure"]) -> None:
        self.base_url = base_url.rstrip("/")
        self._vm_name: str | None = None
        self._first = True

    def _name(self) -> str | None:
        if self._vm_name is None:
            url = f"{self.base_url}/metadata/instance/compute/name?api-version=2021-02-01&format=text"
            status, body, _ = _request(url, self.HEADERS)
            self._vm_name = body.strip() if status == 200 and body.strip() else None
        return self._vm_name

    def check(self) -> Notice | None:
        # Up to two minutes for the very first request, per Azure's documentation; seconds afterwards.
        status, body, _ = _request(f"{self.base_url}/metadata/scheduledevents?api-version={self.API_VERSION}",
                                   self.HEADERS, timeout=120.0 if self._first else 5.0)
        self._first = False
        if status != 200:
            raise MetadataUnavailable(f"scheduledevents answered {status}")
        events = _json(body, "scheduledevents").get("Events")
        if not isinstance(events, list):
            raise MetadataUnavailable("scheduledevents has no Events list")
        name = self._name()
        ours = [e for e in events if isinstance(e, dict)
                and (name is None or not e.get("Resources") or name in e["Resources"])]
        for kind, types in ((PREEMPTION, self.NOTICES), (WARNING, self.WARNINGS)):
            for event in ours:
                if event.get("EventType") in types:
                    return Notice("azure", kind, event["EventType"], _rfc1123_time(event.get("NotBefore")))
        return None


def _rfc1123_time(text: Any) -> float | None:
    """NotBefore, e.g. "Mon, 19 Sep 2016 18:29:47 GMT"; empty once the event has started."""
    try:
        return email.utils.parsedate_to_datetime(str(text)).timestamp()
    except (TypeError, ValueError):
        return None


def metadata_for(cloud: str, base_url: str | None = None) -> CloudMetadata:
    classes: dict[str, type] = {"aws": AwsMetadata, "gcp": GcpMetadata, "azure": AzureMetadata}
    return classes[cloud](base_url or METADATA_URLS[cloud])
