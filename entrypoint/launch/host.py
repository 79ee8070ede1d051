"""Host-side checks for `phoenix doctor` with docker-py: engine, NVIDIA runtime, a persistent volume."""

from __future__ import annotations

import os
from pathlib import Path

# Filesystems that do not outlive the instance (or the container): a checkpoint there is not safe.
_EPHEMERAL_FS = {"tmpfs", "overlay", "ramfs"}


def mount_fstype(path: Path) -> str | None:
    """Filesystem type of the mount holding `path` (longest matching mount point in /proc/mounts)."""
    best, fstype = "", None
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    target = str(path.resolve())
    for line in mounts:
        parts = line.split()
        if len(parts) >= 3 and (target == parts[1] or target.startswith(parts[1].rstrip("/") + "/")) \
                and len(parts[1]) > len(best):
            best, fstype = parts[1], parts[2]
    return fstype


def docker_problems(base_dir: Path) -> list[str]:
    """Problems with the Docker set-up, one line each; none when not on a Docker host."""
    in_container = Path("/.dockerenv").exists()
    problems = []
    fstype = mount_fstype(base_dir) if base_dir.exists() else None
    if fstype in _EPHEMERAL_FS:
        where = "inside the container" if in_container else "on this host"
        problems.append(f"NANOCHAT_BASE_DIR={base_dir} is on {fstype} {where}: it disappears with the "
                        "instance; bind-mount the persistent network volume there")
    if in_container or not (os.environ.get("DOCKER_HOST") or Path("/var/run/docker.sock").exists()):
        return problems
    from docker.errors import DockerException

    import docker

    try:
        client = docker.from_env(timeout=10)
        info = client.info()
    except DockerException as exc:
        return [*problems, f"the Docker engine does not answer ({exc.__class__.__name__}): start dockerd or "
                "check DOCKER_HOST"]
    if "nvidia" not in (info.get("Runtimes") or {}) and not info.get("CDISpecDirs"):
        problems.append("Docker has no NVIDIA runtime: install nvidia-container-toolkit and run "
                        "`nvidia-ctk runtime configure --runtime=docker`, then restart dockerd")
    for container in client.containers.list(filters={"label": "com.docker.compose.service=trainer"}):
        mounts = [m for m in container.attrs.get("Mounts", []) if m.get("Destination") == str(base_dir)]
        if not mounts or mounts[0].get("Type") != "bind":
            problems.append(f"container {container.name} does not bind-mount {base_dir}: checkpoints would "
                            "live in the container; use the compose.yaml volume line")
    return problems
