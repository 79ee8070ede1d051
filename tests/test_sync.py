"""`phoenix sync` against a live local Hub: what gets pushed, how, and what survives kills and outages."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import HfApi
from safetensors.numpy import save_file

from entrypoint.hub.client import Hub
from entrypoint.hub.config import TRAINER_STATUS_FILE, HubConfig
from entrypoint.hub.errors import RepoMissing
from entrypoint.hub.stores import claim_generation, open_store
from entrypoint.sidecar.sync import Syncer
from tests.helpers import fill_checkpoint
from trainer import checkpoint_layout as layout

TAG = "d26-hyperbolic"
MiB = 1024 * 1024
PHOENIX = [sys.executable, "-c", "from entrypoint.cli import main; main()"]


def make_checkpoint(base: Path, step: int, stage: str = "base", nbytes: int = 64 * 1024) -> layout.Checkpoint:
    """A published checkpoint: random tensors of about `nbytes` plus meta.json."""
    tmp = layout.new_tmp_dir(layout.stage_dir(base, stage, TAG), step)
    rng = np.random.default_rng(step)
    save_file({"w": rng.random(nbytes // 4, dtype=np.float32)}, str(tmp / "model.safetensors"))
    fill_checkpoint(tmp, step, stage)
    return layout.publish(tmp, step, stage=stage, model_tag=TAG)


@pytest.fixture
def env(hub, tmp_path: Path) -> dict[str, str]:
    return sidecar_env(hub, tmp_path)


def sidecar_env(hub, tmp_path: Path) -> dict[str, str]:
    """A sidecar's environment and a volume holding a tokenizer and the run's identity; checkpoints go into
    the git repo (test_bucket_store.py covers the default, a bucket)."""
    base = tmp_path / "volume"
    (base / "tokenizer").mkdir(parents=True)
    (base / "tokenizer" / "tokenizer.json").write_text('{"model": "bpe"}')
    layout.write_json_atomic(base / "runs" / TAG / "run.json", {"run_id": "r1", "wandb_run_id": "w1"})
    return hub.env | {
        "NANOCHAT_BASE_DIR": str(base),
        "MODEL_TAG": TAG,
        "HF_REPO_ID": f"{hub.user}/phoenix-ckpt",
        "HF_SYNC_INTERVAL": "1",
        "HF_KEEP_LAST": "all",  # tests of pruning set their own
        "HF_CHECKPOINT_STORE": "repo",
        "HF_SQUASH_CREDIT_HOURS": str(hub.server.credit_delay_s / 3600),  # as late as this Hub credits
        "PYTHONUNBUFFERED": "1",
    }


def base_dir(env: dict[str, str]) -> Path:
    return Path(env["NANOCHAT_BASE_DIR"])


def api(hub) -> HfApi:
    return HfApi(endpoint=hub.url, token=hub.token)


def hub_steps(hub, env: dict[str, str], stage: str = "base") -> list[int]:
    """The complete checkpoints of `stage` in the run's store (the bucket or the git repo), oldest first."""
    try:
        return sorted(open_store(HubConfig.from_env(env)).view().steps(stage))
    except RepoMissing:
        return []


def commit_titles(hub, env: dict[str, str]) -> list[str]:
    return [c.title for c in api(hub).list_repo_commits(env["HF_REPO_ID"])][::-1]


def phoenix(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(PHOENIX + list(args), env=env, capture_output=True, text=True, timeout=timeout)


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_pushes_exactly_the_complete_checkpoints_one_commit_each(hub, env) -> None:
    base = base_dir(env)
    ckpts = [make_checkpoint(base, step) for step in (250, 500, 750)]
    unfinished = layout.stage_dir(base, "base", TAG) / "step_001000"  # crashed before its manifest
    unfinished.mkdir()
    (unfinished / "model.safetensors").write_bytes(b"\0" * 4096)
    in_progress = layout.new_tmp_dir(layout.stage_dir(base, "base", TAG), 1250)  # trainer mid-save
    (in_progress / "model.safetensors").write_bytes(b"\0" * 4096)

    done = phoenix(env, "sync", "--once")
    assert done.returncode == 0, done.stdout + done.stderr
    assert hub_steps(hub, env) == [250, 500, 750]
    files = api(hub).list_repo_files(env["HF_REPO_ID"])
    assert not [f for f in files if "step_001000" in f or layout.TMP_PREFIX in f]
    assert {"tokenizer/tokenizer.json", f"runs/{TAG}/run.json"} <= set(files)
    # Newest first: if the instance dies mid-pass, the checkpoint a resume needs is already up.
    newest_first = [f"step {c.step} of {TAG} (base)" for c in sorted(ckpts, key=lambda c: -c.step)]
    assert commit_titles(hub, env) == ["initial commit", *newest_first]
    assert api(hub).repo_info(env["HF_REPO_ID"]).private is True
    tensors = sum(e["size"] for c in ckpts for name, e in c.files.items() if name.endswith(".safetensors"))
    assert hub.server.bytes_uploaded == tensors  # JSON files travel inline in the commit
    assert "event=push_done stage=base step=750" in done.stdout and "mb_s=" in done.stdout
    assert (base / "logs" / "hf_sync.log").read_text().count("event=push_done") == 3

    again = phoenix(env, "sync", "--once")
    assert again.returncode == 0, again.stdout + again.stderr
    assert hub.server.bytes_uploaded == tensors
    assert len(commit_titles(hub, env)) == 4

    (base / "tokenizer" / "tokenizer.json").write_text('{"model": "bpe", "merges": 2}')
    assert phoenix(env, "sync", "--once").returncode == 0
    assert commit_titles(hub, env)[4:] == [f"update tokenizer/tokenizer.json of {TAG}"]

    # `phoenix eval` results travel with the run files, so a redeployed run keeps its scores.
    layout.write_json_atomic(base / "runs" / TAG / "eval" / "base_step000750.json", {"core_metric": 0.21})
    assert phoenix(env, "sync", "--once").returncode == 0
    assert commit_titles(hub, env)[5:] == [f"update runs/{TAG}/eval/base_step000750.json of {TAG}"]


def test_checkpoint_corrupted_on_the_volume_is_never_pushed(hub, env) -> None:
    good, bad = make_checkpoint(base_dir(env), 250), make_checkpoint(base_dir(env), 500)
    tensors = bad.path / "model.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0xFF  # same size: only the sha256 check right before the push can tell
    tensors.write_bytes(bytes(data))
    done = phoenix(env, "sync", "--once")
    assert done.returncode == 1
    assert "event=skip_corrupt stage=base step=500" in done.stdout
    assert hub_steps(hub, env) == [good.step]


def test_killed_mid_upload_leaves_nothing_complete_and_next_sync_finishes(hub, env) -> None:
    """The classic LFS path (hf_xet off): the throttled PUT shows the kill lands mid-upload."""
    env = env | {"HF_HUB_DISABLE_XET": "1"}
    make_checkpoint(base_dir(env), 250, nbytes=4 * MiB)
    hub.server.throttle_bps = 2 * MiB
    proc = subprocess.Popen(PHOENIX + ["sync", "--once"], env=env, stdout=subprocess.DEVNULL)
    wait_for(lambda: hub.server.bytes_uploaded > 256 * 1024, 20, "the upload to start")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert hub_steps(hub, env) == []
    assert not [f for f in api(hub).list_repo_files(env["HF_REPO_ID"]) if "step_" in f]

    hub.server.throttle_bps = None
    done = phoenix(env, "sync", "--once")
    assert done.returncode == 0, done.stdout + done.stderr
    assert hub_steps(hub, env) == [250]
    assert commit_titles(hub, env)[-1] == f"step 250 of {TAG} (base)"


def test_hub_down_then_up_loop_keeps_running_and_catches_up(hub, env) -> None:
    make_checkpoint(base_dir(env), 250)
    hub.server.down = True
    proc = subprocess.Popen(
        PHOENIX + ["sync", "--poll-seconds", "0.2", "--exit-when-stopped"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    log = base_dir(env) / "logs" / "hf_sync.log"
    try:  # however long the process takes to start on a loaded machine, it meets the outage
        wait_for(lambda: log.is_file() and "event=hub_retry" in log.read_text(), 60, "a retry in the outage")
        time.sleep(1)
        assert proc.poll() is None, "the sidecar must survive a Hub outage"
        hub.server.down = False
        wait_for(lambda: 250 in hub_steps(hub, env), 30, "the sidecar to catch up")
        # The trainer stops: the sidecar pushes what is new at once, then exits as asked.
        make_checkpoint(base_dir(env), 500)
        status = {"status": "stopped", "updated": time.time(), "generation": 0}
        layout.write_json_atomic(base_dir(env) / "runs" / TAG / "trainer_status.json", status)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert hub_steps(hub, env) == [250, 500]
    assert "event=hub_retry" in out and "event=trainer_stopped" in out


def test_final_sync_when_trainer_stops_despite_long_interval(hub, env) -> None:
    env = env | {"HF_SYNC_INTERVAL": "3600"}
    status_file = base_dir(env) / "runs" / TAG / "trainer_status.json"
    layout.write_json_atomic(status_file, {"status": "running", "updated": time.time(), "generation": 0})
    make_checkpoint(base_dir(env), 250)
    proc = subprocess.Popen(
        PHOENIX + ["sync", "--poll-seconds", "0.1", "--exit-when-stopped"], env=env, stdout=subprocess.DEVNULL
    )
    try:
        wait_for(lambda: hub_steps(hub, env) == [250], 20, "the first pass")
        make_checkpoint(base_dir(env), 500)
        layout.write_json_atomic(status_file, {"status": "finished", "updated": time.time(), "generation": 0})
        assert proc.wait(timeout=20) == 0
    finally:
        proc.kill()
    assert hub_steps(hub, env) == [250, 500]


def test_sigterm_waits_for_the_trainer_then_pushes_once_more(hub, env) -> None:
    env = env | {"HF_SYNC_INTERVAL": "3600"}
    status_file = base_dir(env) / "runs" / TAG / "trainer_status.json"
    layout.write_json_atomic(status_file, {"status": "running", "updated": time.time(), "generation": 0})
    make_checkpoint(base_dir(env), 250)
    proc = subprocess.Popen(PHOENIX + ["sync", "--poll-seconds", "0.1"], env=env, stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: hub_steps(hub, env) == [250], 20, "the first pass")
        proc.send_signal(signal.SIGTERM)  # the whole machine is going down: the trainer got it too
        time.sleep(0.5)
        assert proc.poll() is None, "the sidecar must wait for the trainer's emergency checkpoint"
        make_checkpoint(base_dir(env), 300)
        layout.write_json_atomic(status_file, {"status": "stopped", "updated": time.time(), "generation": 0})
        assert proc.wait(timeout=20) == 0
    finally:
        proc.kill()
    assert hub_steps(hub, env) == [250, 300]


def test_checkpoint_pruned_by_the_trainer_mid_push_is_skipped(hub, env) -> None:
    doomed = make_checkpoint(base_dir(env), 250)
    make_checkpoint(base_dir(env), 500)
    syncer = Syncer(HubConfig.from_env(env))
    real_commit = syncer.hub.commit

    def prune_then_commit(*args, **kwargs):
        syncer.hub.commit = real_commit
        layout.prune(doomed.path.parent, keep_last=1)  # the trainer's local retention, racing the upload
        return real_commit(*args, **kwargs)

    syncer.hub.commit = prune_then_commit
    result = syncer.sync_once()
    assert result.ok and result.pushed == [("base", 500)]
    assert hub_steps(hub, env) == [500]


def test_429_retry_after_is_honoured(hub, env) -> None:
    make_checkpoint(base_dir(env), 250)
    hub.server.fail_next(1, status=429, path_contains="/commit/", retry_after=2)
    start = time.monotonic()
    result = Syncer(HubConfig.from_env(env)).sync_once()
    elapsed = time.monotonic() - start
    assert result.ok and result.pushed == [("base", 250)]
    assert elapsed >= 2.0
    # The hub logs a request once its response is out: the client may have read the 200 a moment before.
    wait_for(lambda: [r.status for r in hub.server.request_log if r.method == "POST" and "/commit/" in r.path]
             == [429, 200], 10, "the commit's 429 then 200 in the request log")


@pytest.mark.credit_delayed
def test_keep_last_prunes_older_checkpoints_in_one_commit(hub, env) -> None:
    base = base_dir(env)
    for step in (250, 500, 750):
        make_checkpoint(base, step)
    assert phoenix(env, "sync", "--once").returncode == 0
    make_checkpoint(base, 1000)
    keep2 = env | {"HF_KEEP_LAST": "2"}
    done = phoenix(keep2, "sync", "--once")
    assert done.returncode == 0, done.stdout + done.stderr
    assert hub_steps(hub, env) == [750, 1000]
    # The prune commit alone frees nothing on the Hub: the history is squashed into one commit after it.
    assert commit_titles(hub, env) == [f"squash the history of {TAG} to free pruned checkpoints"]
    assert "prune" in done.stdout + done.stderr
    head = Hub(HubConfig.from_env(env)).snapshot()
    head_lfs = sum(f.lfs.size for f in head.files.values() if f.lfs)
    assert hub.server.storage_settled(env["HF_REPO_ID"]) == head_lfs
    # The pruned checkpoints are still on the volume; they must not be pushed again.
    assert phoenix(keep2, "sync", "--once").returncode == 0
    assert hub_steps(hub, env) == [750, 1000] and len(commit_titles(hub, env)) == 1


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"HF_TOKEN": "hf_WrongTokenSecret0123456789"}, "the Hub rejected HF_TOKEN (401"),
        (
            {"HF_REPO_ID": "someone-else/their-repo"},
            "HF_TOKEN may not write to model repo HF_REPO_ID=someone-else/their-repo",
        ),
        ({"HF_TOKEN": ""}, "HF_TOKEN is not set"),
        ({"HF_REPO_ID": "not a repo id"}, "HF_REPO_ID='not a repo id' is not a valid repo id"),
        ({"HF_KEEP_LAST": "-1"}, "HF_KEEP_LAST='-1' is not a positive integer"),
    ],
)
def test_config_and_auth_errors_are_one_line_and_nonzero(hub, env, change, expected) -> None:
    make_checkpoint(base_dir(env), 250)
    done = phoenix(env | change, "sync", "--once")
    assert done.returncode == 2
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], lines
    assert "Traceback" not in done.stderr
    assert "hf_WrongTokenSecret" not in done.stdout + done.stderr


def test_token_never_appears_in_output_or_log(hub, env) -> None:
    make_checkpoint(base_dir(env), 250)
    # Requests carrying the token fail (and are retried) before the sync succeeds.
    hub.server.fail_next(1, status=500, path_contains="/commit/")
    hub.server.fail_next(1, status=503, path_contains="/api/models/")
    done = phoenix(env, "sync", "--once")
    assert done.returncode == 0, done.stdout + done.stderr
    log_text = (base_dir(env) / "logs" / "hf_sync.log").read_text()
    assert "event=hub_retry" in log_text
    for text in (done.stdout, done.stderr, log_text):
        assert hub.token not in text
    bad = phoenix(env | {"HF_TOKEN": "hf_AnotherSecretToken987654"}, "sync", "--once")
    assert bad.returncode == 2
    for text in (bad.stdout, bad.stderr, (base_dir(env) / "logs" / "hf_sync.log").read_text()):
        assert "hf_AnotherSecretToken987654" not in text


def test_older_generation_is_fenced(hub, env, tmp_path: Path) -> None:
    old = HubConfig.from_env(env)
    new = HubConfig.from_env(env | {"NANOCHAT_BASE_DIR": str(tmp_path / "new_volume")})
    assert claim_generation(old) == 1
    make_checkpoint(old.base_dir, 250)
    assert Syncer(old).sync_once().ok
    assert claim_generation(new) == 2  # a relaunch elsewhere; the old instance is still alive
    make_checkpoint(old.base_dir, 500)
    result = Syncer(old).sync_once()
    assert result.fenced and not result.ok and result.pushed == []
    assert hub_steps(hub, env) == [250]
    done = phoenix(env, "sync", "--once")
    assert done.returncode == 1 and "fenced: generation 1 < 2" in done.stdout


def test_sidecar_started_before_the_claim_pushes_as_soon_as_it_is_made(hub, env, tmp_path: Path) -> None:
    previous = HubConfig.from_env(env | {"NANOCHAT_BASE_DIR": str(tmp_path / "previous_instance")})
    claim_generation(previous)
    make_checkpoint(base_dir(env), 250)
    env = env | {"HF_SYNC_INTERVAL": "3600"}
    log_file = base_dir(env) / "logs" / "hf_sync.log"
    proc = subprocess.Popen(PHOENIX + ["sync", "--poll-seconds", "0.1"], env=env, stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: log_file.is_file() and "event=waiting_for_claim" in log_file.read_text(), 20,
                 "a pass waiting for the claim")
        assert "ERROR" not in log_file.read_text()  # the usual start order is not an error
        assert claim_generation(HubConfig.from_env(env)) == 2  # the entrypoint, at launch
        wait_for(lambda: hub_steps(hub, env) == [250], 20, "the push right after the claim")
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_claim_between_plan_and_commit_is_caught_by_parent_commit(hub, env, tmp_path: Path) -> None:
    old = HubConfig.from_env(env)
    new = HubConfig.from_env(env | {"NANOCHAT_BASE_DIR": str(tmp_path / "new_volume")})
    claim_generation(old)
    make_checkpoint(old.base_dir, 250)
    syncer = Syncer(old)
    real_commit = syncer.hub.commit

    def commit_after_a_rival_claim(*args, **kwargs):
        syncer.hub.commit = real_commit
        claim_generation(new)  # lands after the old sidecar read generation 1, before it commits
        return real_commit(*args, **kwargs)

    syncer.hub.commit = commit_after_a_rival_claim
    result = syncer.sync_once()
    assert result.fenced and result.pushed == []
    assert hub_steps(hub, env) == []
    assert [r.status for r in hub.server.request_log if "/commit/" in r.path][-1] == 412


def test_without_repo_id_sync_is_off(hub, env) -> None:
    done = phoenix({k: v for k, v in env.items() if k != "HF_REPO_ID"}, "sync", "--once")
    assert done.returncode == 0
    assert "HF_REPO_ID not set: Hub sync and restore are off" in done.stdout


def test_a_running_status_nobody_refreshes_reads_as_lost(tmp_path):
    """A SIGKILLed entrypoint leaves "running" behind; the sidecar must not wait for it forever."""
    from entrypoint.sidecar.loop import STALE_S, read_trainer_status

    cfg = HubConfig.from_env({"NANOCHAT_BASE_DIR": str(tmp_path), "MODEL_TAG": "t"})
    path = tmp_path / "runs" / "t" / TRAINER_STATUS_FILE
    layout.write_json_atomic(path, {"status": "running", "updated": time.time(), "generation": 0})
    assert read_trainer_status(cfg)["status"] == "running"
    silent = time.time() - STALE_S - 5
    layout.write_json_atomic(path, {"status": "running", "updated": silent, "generation": 0})
    assert read_trainer_status(cfg)["status"] == "lost"
