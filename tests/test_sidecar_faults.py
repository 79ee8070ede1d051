"""Faults that must not kill the sidecar, nor let a taken-over instance train on: real `phoenix sync`
processes against the local Hub, the real client failing the way the real Hub makes it fail."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from entrypoint.hub.client import Hub
from entrypoint.hub.config import TOKENIZER_PATH, HubConfig
from entrypoint.hub.stores import claim_generation
from entrypoint.sidecar.sync import Syncer
from tests.helpers import MODEL_TAG, checkpoint_dir, publish_corpus, run_trainer
from tests.test_sync import PHOENIX, base_dir, hub_steps, make_checkpoint, phoenix, sidecar_env, wait_for
from trainer import checkpoint_layout as layout
from trainer import fencing

QUOTA_MESSAGE = "Private repository storage limit reached, please upgrade your plan..."


@pytest.fixture
def env(hub, tmp_path: Path) -> dict[str, str]:
    return sidecar_env(hub, tmp_path)


def lines_with(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


def sidecar(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(PHOENIX + ["sync", "--poll-seconds", "0.1", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def sync_log(env: dict[str, str]) -> str:
    path = base_dir(env) / "logs" / "hf_sync.log"
    return path.read_text() if path.is_file() else ""


def test_storage_refusal_and_full_quota_are_failed_passes_then_pushed(hub, env) -> None:
    env = env | {"HF_HUB_DISABLE_XET": "1"}  # the classic LFS path: presigned upload URLs
    make_checkpoint(base_dir(env), 250)
    # Xet token refreshes and presigned upload URLs fail with 401/403 although the token is fine.
    hub.server.fail_next(1, status=401, path_contains="/lfs-upload/")
    refused = phoenix(env, "sync", "--once")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    failed = lines_with(refused.stdout, "event=sync_failed")
    assert len(failed) == 1 and "storage refused an upload" in failed[0], refused.stdout
    assert "Traceback" not in refused.stdout + refused.stderr and "event=fatal" not in refused.stdout

    hub.server.fail_next(1, status=403, path_contains="/commit/", message=QUOTA_MESSAGE)
    full = phoenix(env, "sync", "--once")
    assert full.returncode == 1, full.stdout + full.stderr  # retried later, not a fatal (exit 2)
    failed = lines_with(full.stdout, "event=sync_failed")
    assert len(failed) == 1, full.stdout
    assert "error_type=QuotaExceeded" in failed[0] and "storage limit reached" in failed[0]
    assert "HF_KEEP_LAST" in failed[0] and "HF_TOKEN" not in failed[0]
    assert hub_steps(hub, env) == []

    done = phoenix(env, "sync", "--once")
    assert done.returncode == 0, done.stdout + done.stderr
    assert hub_steps(hub, env) == [250]
    # create_repo (rate limited, needs namespace rights) only while the repo was missing: three sidecars, one.
    assert [r.method for r in hub.server.request_log if r.path == "/api/repos/create"] == ["POST"]


def test_checkpoint_pruned_while_its_upload_waits_is_skipped_and_the_next_pushed(hub, env) -> None:
    env = env | {"HF_HUB_DISABLE_XET": "1"}  # the classic LFS path: its batch API is where the wait is
    doomed = make_checkpoint(base_dir(env), 250)
    # The LFS batch answers 503 a few times: the client retries it after 1, 2, 4 s, then opens the files
    # for upload. The trainer prunes 250 (having published 500) meanwhile: the open fails inside the client.
    hub.server.fail_next(3, status=503, path_contains="/info/lfs/objects/batch")
    proc = subprocess.Popen(PHOENIX + ["sync", "--once"], env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    wait_for(lambda: any(r.status == 503 for r in hub.server.request_log), 30, "the LFS batch to fail")
    make_checkpoint(base_dir(env), 500)
    assert layout.prune(doomed.path.parent, keep_last=1) == [doomed.path]
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "event=skip_vanished stage=base step=250" in out and "Traceback" not in out
    assert hub_steps(hub, env) == []

    done = phoenix(env, "sync", "--once")
    assert done.returncode == 0, done.stdout + done.stderr
    assert hub_steps(hub, env) == [500]


def test_failed_pass_keeps_the_loop_alive_and_the_retry_pushes(hub, env) -> None:
    make_checkpoint(base_dir(env), 250)
    # hf_xet's token refresh refused: a ConnectionError, retried in the call 4 times, then a failed pass.
    hub.server.fail_next(4, status=401, path_contains="/xet-write-token/")
    proc = sidecar(env | {"HF_SYNC_INTERVAL": "3600"})
    try:
        # The failed pass is retried after 5 s, well before the interval.
        wait_for(lambda: hub_steps(hub, env) == [250], 40, "the retry to push")
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert len(lines_with(out, "event=sync_failed")) == 1 and "Traceback" not in out


def commits(hub) -> list[int]:
    """Statuses of every commit request so far."""
    log = hub.server.request_log
    return [r.status for r in log if r.method == "POST" and r.path.endswith("/commit/main")]


def test_commit_quota_waits_between_passes_up_to_an_hour_and_never_holds_a_stop(hub, env) -> None:
    make_checkpoint(base_dir(env), 250)
    make_checkpoint(base_dir(env), 500)
    hub.server.set_commit_quota(1, window_s=5)  # a short window: its Retry-After is waited in the call
    assert phoenix(env, "sync", "--once").returncode == 0 and hub_steps(hub, env) == [250, 500]
    assert commits(hub) == [200, 429, 200]  # HF_KEEP_LAST=all: both in one pass

    make_checkpoint(base_dir(env), 750)
    hub.server.set_commit_quota(0, window_s=3600)  # the Hub's hourly quota, spent
    proc = sidecar(env, "--grace-seconds", "60")  # HF_SYNC_INTERVAL=1
    try:
        wait_for(lambda: "event=sync_failed" in sync_log(env), 30, "the 429")
        time.sleep(3)  # three sync intervals: the Hub asked for an hour, so no pass tries again
        assert commits(hub)[-1] == 429 and commits(hub).count(429) == 2
        proc.send_signal(signal.SIGTERM)  # docker compose stop: the final push could not be made in time
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 1, out
    failed = lines_with(out, "event=sync_failed")
    assert len(failed) == 1 and "error_type=RateLimited" in failed[0] and "retry_in_s=3600" in failed[0]
    assert "hourly quotas for action: commit" in failed[0]
    skipped = lines_with(out, "event=final_push_skipped")
    assert len(skipped) == 1 and "hub_wait_s=35" in skipped[0] and "Traceback" not in out
    assert hub_steps(hub, env) == [250, 500]
    hub.server.set_commit_quota(None)
    assert phoenix(env, "sync", "--once").returncode == 0  # nothing lost: the next sidecar pushes it
    assert hub_steps(hub, env) == [250, 500, 750]


def test_bad_token_idles_with_one_line_instead_of_a_restart_loop(hub, env) -> None:
    secret = "hf_RevokedTokenSecret12345678"
    proc = sidecar(env | {"HF_TOKEN": secret, "HF_SYNC_INTERVAL": "3600"})
    try:
        wait_for(lambda: "event=fatal" in sync_log(env), 30, "the fatal line")
        time.sleep(1)
        assert proc.poll() is None, "a sidecar that exits is restarted by Docker, in a loop"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 2
    fatal = lines_with(out, "event=fatal")
    assert len(fatal) == 1 and "the Hub rejected HF_TOKEN (401" in fatal[0], out
    assert secret not in out + sync_log(env) and "Traceback" not in out


def test_corrupt_local_tokenizer_never_replaces_the_hubs(hub, env) -> None:
    make_checkpoint(base_dir(env), 250)
    assert phoenix(env, "sync", "--once").returncode == 0
    tokenizer = base_dir(env) / "tokenizer" / "tokenizer.json"
    good = tokenizer.read_bytes()
    tokenizer.write_bytes(good[: len(good) // 2])  # truncated, e.g. by a full disk
    make_checkpoint(base_dir(env), 500)
    done = phoenix(env, "sync", "--once")
    assert done.returncode == 0, done.stdout + done.stderr
    warned = lines_with(done.stdout, "event=skip_bad_file")
    assert len(warned) == 1 and "tokenizer/tokenizer.json" in warned[0] and "not valid JSON" in warned[0]
    assert hub_steps(hub, env) == [250, 500]
    cfg = HubConfig.from_env(env)
    remote = Hub(cfg)
    assert remote.read_json(remote.snapshot(), TOKENIZER_PATH) == json.loads(good)


def test_fenced_trainer_stops_at_its_next_checkpoint(hub, tmp_path: Path) -> None:
    publish_corpus(hub.server, tmp_path / "shards")
    volume = tmp_path / "volume"
    env = hub.env | {"NANOCHAT_BASE_DIR": str(volume), "MODEL_TAG": MODEL_TAG, "WANDB_MODE": "offline",
                     "HF_REPO_ID": f"{hub.user}/checkpoints"}
    here = HubConfig.from_env(env)
    elsewhere = HubConfig.from_env(env | {"NANOCHAT_BASE_DIR": str(tmp_path / "other_instance")})
    assert claim_generation(here) == 1  # this instance's launch
    fenced_at: list[int] = []

    def relaunch_elsewhere(line: str) -> bool:
        if "checkpoint step=" in line and not fenced_at:
            assert claim_generation(elsewhere) == 2  # the run is relaunched on another box
            assert Syncer(here).sync_once().fenced  # this instance's sidecar notices
            fenced_at.append(int(line.split("step=")[1].split()[0]))
        return False

    code, out = run_trainer(volume, env, "--num-iterations", "5000", "--save-every", "5", "--eval-every", "0",
                            kill_when=relaunch_elsewhere, timeout=180)
    assert code == fencing.FENCED_EXIT_CODE, out[-3000:]
    errors = lines_with(out, "error:")
    assert len(errors) == 1 and errors[0].startswith("error: fenced: generation 1 was taken over by "
                                                     "generation 2 (launched elsewhere at 20"), errors
    assert "Traceback" not in out
    saves = [int(line.split("step=")[1].split()[0]) for line in lines_with(out, "checkpoint step=")]
    last = layout.latest(checkpoint_dir(volume), full_hash=True)
    assert last is not None and last.step == saves[-1] > fenced_at[0]  # the save after the marker, intact
    assert saves[-1] < 5000
