"""The preemption watch of `phoenix run`: a cloud's notice stops the run the way `docker stop` does.

Spot VMs are warned before they are taken (AWS two minutes, GCP and Azure about 30 s; see `clouds`).
A thread polls the cloud's metadata server for the life of the launch, so a notice during start-up,
restore or training is caught alike. On a notice it logs one `event=preemption_notice` line (source,
deadline), writes runs/<tag>/preemption.json for the sidecar, which then pushes the emergency checkpoint
the moment it is published, and stops the launch as SIGTERM does: the workers stop at their next step
boundary, write an emergency checkpoint and the launch exits as stopped. A warning (AWS's rebalance
recommendation, GCP's host maintenance, Azure's reboot) is one `event=preemption_warning` line and the
same file: the sidecar pushes the newest checkpoint now, and training goes on.

PREEMPTION_WATCH: auto (default: the cloud from DMI, no network; none found, nothing watched), off, aws,
gcp, azure. PREEMPTION_METADATA_URL replaces the metadata server's address (the tests' fake one on
loopback); PREEMPTION_POLL_S the seconds between polls (AWS 5, as AWS advises; Azure 1; GCP's request
waits on the server for a change).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Mapping
from contextlib import suppress
from datetime import datetime, timezone
from pathlib import Path

from entrypoint.launch.clouds import (
    DMI_DIR,
    PREEMPTION,
    CloudMetadata,
    MetadataUnavailable,
    Notice,
    detect_cloud,
    metadata_for,
)
from entrypoint.logs import kv
from trainer import checkpoint_layout as layout
from trainer.recovery import notice_path  # the trainer reads the notice's deadline from it too

log = logging.getLogger("phoenix.run")

WATCH_MODES = ("auto", "off", "aws", "gcp", "azure")
DEFAULT_POLL_S = {"aws": 5.0, "gcp": 1.0, "azure": 1.0}


def read_notice(base_dir: str | Path, model_tag: str) -> Notice | None:
    """This launch's notice (or warning) on the volume; None if there is none or it is unreadable."""
    try:
        return Notice.from_json(json.loads(notice_path(base_dir, model_tag).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def clear_notice(base_dir: str | Path, model_tag: str) -> None:
    """At launch: a notice on the volume was the previous instance's."""
    with suppress(OSError):
        notice_path(base_dir, model_tag).unlink(missing_ok=True)


def describe(notice: Notice) -> dict[str, str | float]:
    """The notice as log fields: source, event, deadline (UTC) and seconds left."""
    left = notice.seconds_left()
    deadline = ("unknown" if notice.deadline is None else
                datetime.fromtimestamp(notice.deadline, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    return {"source": notice.source, "notice": notice.event, "deadline": deadline,
            "deadline_s": "unknown" if left is None else round(left, 1)}


class PreemptionWatch:
    """A daemon thread polling one cloud; each new notice is logged, written for the sidecar and, for a
    preemption, followed by `stop()`. A server that does not answer is said once, then retried quietly."""

    def __init__(self, metadata: CloudMetadata, base_dir: Path, model_tag: str, stop: Callable[[], None],
                 poll_s: float) -> None:
        self.metadata = metadata
        self.base_dir, self.model_tag = base_dir, model_tag
        self.stop = stop
        self.poll_s = poll_s
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="preemption-watch", daemon=True)

    def start(self) -> PreemptionWatch:
        self._thread.start()
        return self

    def close(self) -> None:
        """No join: a GCP request may be waiting on the server, and the thread dies with the process."""
        self._closed.set()

    def _run(self) -> None:
        seen: set[tuple[str, str]] = set()
        said_unavailable = False
        while not self._closed.is_set():
            try:
                notice = self.metadata.check()
            except MetadataUnavailable as exc:
                if not said_unavailable:
                    log.warning(kv(event="preemption_watch_unavailable", source=self.metadata.source,
                                   error=str(exc), action=_unavailable_hint(self.metadata.source)))
                said_unavailable, notice = True, None
            if notice is not None and (notice.kind, notice.event) not in seen and not self._closed.is_set():
                seen.add((notice.kind, notice.event))
                self._act(notice)
                if notice.kind == PREEMPTION:
                    return
            self._closed.wait(self.poll_s)

    def _act(self, notice: Notice) -> None:
        if notice.kind == PREEMPTION:
            log.warning(kv(event="preemption_notice", **describe(notice),
                           then="emergency checkpoint at the next step boundary, pushed at once"))
        else:
            log.warning(kv(event="preemption_warning", **describe(notice),
                           then="the sidecar pushes the newest checkpoint now; training goes on"))
        previous = read_notice(self.base_dir, self.model_tag)
        if notice.kind == PREEMPTION or previous is None or previous.kind != PREEMPTION:
            try:  # for the sidecar; before the stop, which may end this process soon after
                layout.write_json_atomic(notice_path(self.base_dir, self.model_tag), notice.to_json())
            except OSError as exc:
                log.warning("cannot write %s: %s", notice_path(self.base_dir, self.model_tag), exc)
        if notice.kind == PREEMPTION:
            self.stop()  # the workers stop at their step boundary: a small write first costs nothing there


def _unavailable_hint(source: str) -> str:
    if source == "aws":
        return ("retrying quietly; in a container, IMDSv2 needs the instance's metadata hop limit at 2 (aws "
                "ec2 modify-instance-metadata-options --http-put-response-hop-limit 2), or set "
                "PREEMPTION_WATCH=off")
    return "retrying quietly; set PREEMPTION_WATCH=off if this machine has no such metadata server"


def watch_problem(mode: str, poll_s: str) -> str | None:
    """The preflight line for a PREEMPTION_WATCH or PREEMPTION_POLL_S the watch cannot use."""
    if mode not in WATCH_MODES:
        return f"PREEMPTION_WATCH={mode} is unknown: use one of {', '.join(WATCH_MODES)}"
    try:
        usable = not poll_s or float(poll_s) >= 0
    except ValueError:
        usable = False
    return None if usable else f"PREEMPTION_POLL_S={poll_s} is not a number of seconds: unset it (AWS: 5)"


def start_watch(mode: str, base_dir: Path, model_tag: str, stop: Callable[[], None], fresh: bool,
                environ: Mapping[str, str] | None = None, dmi_dir: Path = DMI_DIR) -> PreemptionWatch | None:
    """Start watching per PREEMPTION_WATCH (`mode`), or return None when there is nothing to watch.

    `fresh`: this launch owns the notice file (node 0), so a notice left there by the previous instance
    is removed first.
    """
    env = os.environ if environ is None else environ
    if fresh:
        clear_notice(base_dir, model_tag)
    cloud = detect_cloud(dmi_dir) if mode == "auto" else mode
    if cloud in (None, "off"):
        return None
    url = env.get("PREEMPTION_METADATA_URL") or None
    poll_s = float(env.get("PREEMPTION_POLL_S") or DEFAULT_POLL_S[cloud])
    log.info(kv(event="preemption_watch", source=cloud, mode=mode, poll_s=poll_s, url=url or "default"))
    return PreemptionWatch(metadata_for(cloud, url), base_dir, model_tag, stop, poll_s).start()
