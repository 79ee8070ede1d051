"""The operator's side of faults: each ends in progress or one line, never a traceback.

The sidecar on an unmounted volume or with a bad setting, health/status/report on torn files and clocks
gone wrong, the local Hub when a client hangs up, and `phoenix demo` end to end. Real processes and signals.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.helpers import MODEL_TAG, run_phoenix
from trainer import checkpoint_layout as layout

PHOENIX = [sys.executable, "-m", "entrypoint"]


def start(command: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, queue.Queue]:
    """A process and a queue of its output lines (stdout and stderr together)."""
    proc = subprocess.Popen(command, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [*map(lines.put, proc.stdout)], daemon=True).start()
    return proc, lines


def sidecar_env(volume: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "NANOCHAT_BASE_DIR": str(volume), "MODEL_TAG": MODEL_TAG, "HF_REPO_ID": "", **extra}


def test_the_sidecar_never_creates_a_missing_volume_and_waits_for_it(tmp_path):
    volume = tmp_path / "not_mounted_yet"
    proc, lines = start([*PHOENIX, "sync", "--poll-seconds", "0.2"], sidecar_env(volume))
    try:
        first = lines.get(timeout=60)
        assert first.startswith(f"error: NANOCHAT_BASE_DIR={volume} does not exist: mount"), first
        assert "waiting" in first
        time.sleep(1)
        assert proc.poll() is None and not volume.exists()  # idle, and a later preflight would fail there
        volume.mkdir()  # mounted now
        assert "HF_REPO_ID not set" in lines.get(timeout=30)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()


def test_the_sidecar_idles_on_a_bad_setting_instead_of_exiting(tmp_path):
    proc, lines = start([*PHOENIX, "sync"], sidecar_env(tmp_path, HF_SYNC_INTERVAL="soon"))
    try:
        first = lines.get(timeout=60)
        assert first.startswith("error: HF_SYNC_INTERVAL='soon' is not a positive number"), first
        time.sleep(2)
        assert proc.poll() is None  # `restart: unless-stopped` would relaunch an exit in a loop
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 2 and lines.empty()
    finally:
        proc.kill()


def test_health_status_and_report_read_torn_files_and_clocks_gone_wrong(tmp_path):
    env = sidecar_env(tmp_path)
    runs, logs = tmp_path / "runs" / MODEL_TAG, tmp_path / "logs"
    (runs / "eval").mkdir(parents=True)
    logs.mkdir()
    now = time.time()
    step = {"loss": 3.0, "lrm": 1.0, "dt": 0.1, "tok_per_sec": 1e3, "mfu": None, "elapsed": 1.0, "time": now}
    good = [json.dumps({**step, "step": n}) for n in (1, 2)]
    (logs / f"train_base_{MODEL_TAG}.jsonl").write_text("\n".join(
        [*good, "[1, 2]", json.dumps({**step, "step": "3"}),
         json.dumps({**step, "step": 4, "tok_per_sec": None}),
         '{"step": 5, "loss": 2.9, "dt"']))  # the last one cut short by a kill
    (runs / "eval" / "base_step000002.json").write_text('["not", "an", "object"]')
    (runs / "eval" / "base_step000001.json").write_text(json.dumps({"eval": "core", "core_metric": "high",
                                                                     "accuracy": {"t": "good"}}))
    (runs / "failures.json").write_text('{"held": true, "cou')
    heartbeat = logs / f"heartbeat_{MODEL_TAG}.json"

    def health(status: dict, beat: object) -> tuple[int, str]:
        layout.write_json_atomic(runs / "trainer_status.json", status)
        heartbeat.write_text(json.dumps(beat))
        code, out = run_phoenix(env, "health")
        assert "Traceback" not in out, out
        return code, out

    code, out = health({"status": "running", "phase": "base", "updated": "now", "phase_started": None},
                       [now])
    assert code == 1 and "unhealthy: phase base silent for" in out
    # Times in the future never go stale: a clock set back, or a bad file, must not read as healthy.
    code, out = health({"status": "running", "phase": "restore", "updated": now + 86400}, {})
    assert code == 1 and "unhealthy: phase restore dated" in out and "s in the future" in out
    code, out = health({"status": "running", "phase": "base", "updated": now, "phase_started": now - 5000},
                       {"time": now + 86400})
    assert code == 1 and "in the future" in out
    assert health({"status": "running", "phase": "base", "updated": now, "phase_started": now - 5000},
                  {"time": now - 5})[0] == 0

    code, out = run_phoenix(env, "status", "--no-hub", "--json")
    assert code == 0, out
    report = json.loads(out)
    assert report["stages"]["base"]["train_step"] == 2 and report["failures"] is None
    code, out = run_phoenix(env, "report")
    assert code == 0 and "Traceback" not in out, out
    page = (runs / "report" / "report.md").read_text()
    assert "steps logged | 2 (last step 2)" in page and "| t accuracy |" not in page


def test_the_local_hub_says_nothing_when_a_client_hangs_up(tmp_path):
    """A sidecar killed with a connection open (the demo loses its instance so): no traceback."""
    hub = subprocess.Popen([sys.executable, "-m", "entrypoint.demo.localhub", "--data", str(tmp_path / "hub"),
                            "--token", "hf_localhub_token:someone"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        host, port = hub.stdout.readline().strip().removeprefix("url=http://").split(":")
        with socket.create_connection((host, int(port))) as client:
            client.sendall(b"GET /api/whoami-v2 HTTP/1.1\r\nHost: x\r\n"
                           b"Authorization: Bearer hf_localhub_token\r\n\r\n")
            time.sleep(0.5)  # answered and unread: the server waits for the next request on it
            # Closed with a reset, as a killed process with unread data in its socket closes it.
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        time.sleep(0.5)
    finally:
        hub.terminate()
        _, errors = hub.communicate(timeout=30)
    assert "Traceback" not in errors and "ConnectionResetError" not in errors, errors


def test_the_demo_tells_the_whole_story_with_its_hub_storage_line(tmp_path):
    # Lost at step 15: the Hub holds one checkpoint then, so only the redeployed instance's push prunes.
    done = subprocess.run([*PHOENIX, "demo", "--workdir", str(tmp_path), "--steps", "20", "--kill-at", "8",
                           "--lose-at", "15"], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0 and "Traceback" not in out, out
    storage = [line for line in out.splitlines() if line.strip().startswith("Hub storage")]
    assert len(storage) == 1 and "MB before pruning, now" in storage[0], out
    assert "final weights bit-identical (sha256):    yes" in out
