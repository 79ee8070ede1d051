"""The sidecar, restore and doctor on the real Hub's terms (issue 18), each against the local Hub with that
term switched on: storage credited late, the commit quota, the storage-patterns lock, a full account, Xet
faults, a bucket and a repo of one id, gated repos, a stop that leaves too little time, and runs an older
phoenix pushed into the git repo."""

from __future__ import annotations

import logging
import signal
import subprocess
import time
from pathlib import Path

import pytest
from huggingface_hub import HfApi

from bench.backup_sim import TOKEN as SIM_TOKEN
from bench.backup_sim import USER as SIM_USER
from bench.backup_sim import SimConfig, report, simulate
from entrypoint.hub.stores import open_store
from entrypoint.launch.config import RunConfig
from entrypoint.launch.preflight import hub_problems, storage_problems
from entrypoint.sidecar.sync import Syncer
from entrypoint.status import collect
from tests.helpers import SFT_DATASET_REPO, SYNTHETIC_FILES, fill_checkpoint, publish_chat_dataset
from tests.test_bucket_store import FILES, bucket_env, bucket_paths, restore_on_empty_volume
from tests.test_hub_storage import PHOENIX, TAG, cfg_of, digests, make_checkpoint
from tests.test_sidecar_faults import lines_with, sidecar, sync_log
from tests.test_sync import wait_for
from trainer import checkpoint_layout as layout
from trainer.chat_data import load_chat_dataset
from trainer.data import DataError, ShardStore


def stop(proc: subprocess.Popen[str]) -> str:
    """SIGTERM, as `docker compose stop` sends; the output once it exits."""
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return out


def uploads(hub) -> int:
    """Requests that carry or commit checkpoint data: Xet write tokens, commits, bucket batches."""
    return sum(r.method == "POST" and ("/commit/" in r.path or r.path.endswith("/batch")) or
               "/xet-write-token/" in r.path for r in hub.server.request_log)


def history_writes(hub) -> int:
    return sum(r.method == "POST" and ("/commit/" in r.path or "/super-squash/" in r.path) and r.status == 200
               for r in hub.server.request_log)


@pytest.fixture
def env(hub, tmp_path: Path) -> dict[str, str]:
    return bucket_env(hub, tmp_path)


def test_at_most_two_history_writes_per_pushed_checkpoint(hub, tmp_path) -> None:
    repo_env = bucket_env(hub, tmp_path / "repo") | {"HF_CHECKPOINT_STORE": "repo"}
    base = Path(repo_env["NANOCHAT_BASE_DIR"])
    syncer, pushed, before = Syncer(cfg_of(repo_env)), 0, history_writes(hub)
    for new in ([1], [2], [3], [4, 5, 6], [7]):  # one pass finds three new checkpoints
        for step in new:
            make_checkpoint(base, step)
        result = syncer.sync_once()
        assert result.ok and result.pushed == [("base", new[-1])], result.errors
        pushed += 1
    # The prune rides in the checkpoint's commit; the squash that frees it is the second write.
    assert history_writes(hub) - before <= 2 * pushed
    api = HfApi(endpoint=hub.url, token=hub.token)
    titles = [c.title for c in api.list_repo_commits(repo_env["HF_REPO_ID"])]
    assert len(titles) == 1 and titles[0].startswith("squash")
    # In a bucket (the default) a checkpoint is no history write at all; only run files changing are.
    bucket = bucket_env(hub, tmp_path / "bucket") | {"HF_REPO_ID": f"{hub.user}/phoenix-bucket"}
    syncer, before = Syncer(cfg_of(bucket)), history_writes(hub)
    for step in range(1, 6):
        make_checkpoint(Path(bucket["NANOCHAT_BASE_DIR"]), step)
        assert syncer.sync_once().pushed == [("base", step)]
    assert history_writes(hub) - before == 1  # tokenizer and run.json, with the first checkpoint


def test_storage_patterns_lock_is_one_line_and_nothing_more_is_uploaded(hub, env) -> None:
    make_checkpoint(Path(env["NANOCHAT_BASE_DIR"]), 1)
    hub.server.trip_storage_patterns(hub.user)
    proc = sidecar(env)  # HF_SYNC_INTERVAL=1
    try:
        wait_for(lambda: "event=fatal" in sync_log(env), 60, "the fatal line")
        sent = uploads(hub)
        time.sleep(3)  # three intervals: no pass, no upload, no hashing
        assert proc.poll() is None, "a sidecar that exits is restarted by Docker, in a loop"
        assert uploads(hub) == sent
    finally:
        out = stop(proc)
    assert proc.returncode == 2 and uploads(hub) == sent  # no final push either
    fatal = lines_with(out, "event=fatal")
    assert "website@huggingface.co" in fatal[0] and "restart the sidecar" in fatal[0]
    assert "Traceback" not in out
    assert all("uploading nothing" in line for line in fatal)
    status = subprocess.run(PHOENIX + ["status"], env=env, capture_output=True, text=True, timeout=60).stdout
    assert "website@huggingface.co" in status
    hub.server.unlock_storage(hub.user)  # a person at Hugging Face lifted it; the sidecar is restarted
    done = subprocess.run(PHOENIX + ["sync", "--once"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_full_account_backs_off_an_hour_and_never_hashes_a_checkpoint_again(hub, env, monkeypatch,
                                                                             caplog) -> None:
    base = Path(env["NANOCHAT_BASE_DIR"])
    make_checkpoint(base, 1)
    hub.server.set_quota(hub.user, 1000)  # the account is full of other repos: the budget cannot know
    hashed: list[Path] = []
    real = layout.sha256_file
    monkeypatch.setattr(layout, "sha256_file", lambda path, *a: hashed.append(path) or real(path, *a))
    syncer = Syncer(cfg_of(env))
    refused = syncer.sync_once()
    assert not refused.ok and refused.backoff_s == 3600  # the loop waits an hour: storage is credited late
    assert "storage limit reached" in refused.errors[0] and "retried in an hour" in refused.errors[0]
    assert len(hashed) == len(SYNTHETIC_FILES)  # each file the manifest lists, checked against it once
    assert syncer.sync_once().backoff_s == 3600 and len(hashed) == len(SYNTHETIC_FILES)  # nothing again
    hub.server.set_quota(hub.user, None)
    assert syncer.sync_once().pushed == [("base", 1)] and len(hashed) == len(SYNTHETIC_FILES)
    # The sidecar process: one refused push, then nothing for the hour, whatever the interval.
    make_checkpoint(base, 2)
    hub.server.set_quota(hub.user, 1000)
    proc = sidecar(env)
    try:
        wait_for(lambda: "event=sync_failed" in sync_log(env), 60, "the refusal")
        sent = uploads(hub)
        time.sleep(3)
        assert uploads(hub) == sent
    finally:
        out = stop(proc)
    failed = lines_with(out, "event=sync_failed")
    assert len(failed) == 1 and "retry_in_s=3600" in failed[0] and "event=final_push_skipped" in out


def test_xet_refusing_its_token_is_retried_then_one_line(hub, env, caplog) -> None:
    base = Path(env["NANOCHAT_BASE_DIR"])
    make_checkpoint(base, 1)
    hub.server.fail_xet_next("auth", "upload")  # the bucket's batch upload: its refresh stays refused
    syncer = Syncer(cfg_of(env))
    with caplog.at_level(logging.INFO, logger="phoenix"):
        failed = syncer.sync_once()
    assert not failed.ok and failed.errors[0].startswith("Xet storage refused its access token")
    assert len([r for r in caplog.records if "event=hub_retry" in r.getMessage()]) == 3  # 4 tries in all
    assert len([r for r in caplog.records if "event=sync_failed" in r.getMessage()]) == 1
    assert syncer.sync_once().pushed == [("base", 1)]  # the next pass


@pytest.mark.parametrize("fault", ["not_found", "auth"])
def test_a_xet_fault_mid_restore_is_retried_and_the_restore_is_bitwise(hub, env, tmp_path, fault) -> None:
    base = Path(env["NANOCHAT_BASE_DIR"])
    make_checkpoint(base, 1)
    assert Syncer(cfg_of(env)).sync_once().ok
    hub.server.fail_xet_next(fault, "download")
    volume, step = restore_on_empty_volume(env, tmp_path, "redeployed")
    assert step == 1 and digests(volume, 1) == digests(base, 1)


def test_a_bucket_refused_the_repos_id_takes_its_second_name(hub, env, tmp_path) -> None:
    hub.server.refuse_shared_names = True
    base = Path(env["NANOCHAT_BASE_DIR"])
    make_checkpoint(base, 1)
    done = subprocess.run(PHOENIX + ["sync", "--once"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    renamed = lines_with(done.stdout, "event=bucket_renamed")
    assert len(renamed) == 1 and f"bucket={env['HF_REPO_ID']}-checkpoints" in renamed[0]
    assert hub.server.bucket_size(env["HF_REPO_ID"] + "-checkpoints") > 0
    volume, step = restore_on_empty_volume(env, tmp_path, "redeployed")  # restore looks there too
    assert step == 1 and digests(volume, 1) == digests(base, 1)
    # A bucket named by HF_BUCKET_ID has no second name: the refusal is one line saying what to set.
    (tmp_path / "other").mkdir()  # a mounted volume: sync never creates one
    named = env | {"HF_BUCKET_ID": env["HF_REPO_ID"], "NANOCHAT_BASE_DIR": str(tmp_path / "other")}
    refused = subprocess.run(PHOENIX + ["sync", "--once"], env=named, capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode == 2 and "Traceback" not in refused.stdout + refused.stderr
    fatal = lines_with(refused.stdout, "event=fatal")
    assert len(fatal) == 1 and "409" in fatal[0] and "set HF_BUCKET_ID to a free" in fatal[0]


def test_doctor_says_when_the_settings_cannot_fit_the_account(hub, env) -> None:
    def run_config(**change: str) -> RunConfig:
        defaults = {"PRESET": "d26", "HF_SYNC_INTERVAL": "1200", "HF_SQUASH_CREDIT_HOURS": "36"}
        return RunConfig.from_env([], env | defaults | change)

    assert storage_problems(run_config()) == []  # the default: a bucket, d26 peaks at 4 x 16.7 = 67 GB
    [line] = storage_problems(run_config(HF_CHECKPOINT_STORE="repo"))
    assert "would count 1873 GB" in line and "every 18.2 h" in line and "unset HF_CHECKPOINT_STORE" in line
    [line] = storage_problems(run_config(HF_KEEP_LAST="5"))
    assert "peak at 117 GB in the bucket" in line and "set HF_KEEP_LAST to 3" in line
    assert storage_problems(run_config(HF_KEEP_LAST="5", HF_STORAGE_LIMIT_GB="1000")) == []  # a PRO plan
    # A second name for the bucket must be one HF_TOKEN may write.
    [line] = hub_problems(cfg_of(env, HF_BUCKET_ID="someone-else/ckpts"), volume_has_checkpoint=False)
    assert "cannot write the bucket HF_BUCKET_ID=someone-else/ckpts" in line


def test_a_rate_limited_whoami_is_a_warning(hub, env, caplog) -> None:
    hub.server.fail_next(5, status=429, path_contains="whoami", retry_after=1)
    with caplog.at_level(logging.WARNING):
        assert hub_problems(cfg_of(env), volume_has_checkpoint=False) == []
    assert "rate-limited whoami (429)" in caplog.text


def test_a_gated_dataset_is_a_read_problem(hub, tmp_path) -> None:
    repo = f"{hub.user}-other/fineweb"
    hub.server.publish_dataset(repo, {f"shard_0000{i}.parquet": b"PAR1" * 4000 for i in range(2)})
    hub.server.gate(repo, "dataset")
    store = ShardStore(tmp_path / "data", repo)
    with pytest.raises(DataError, match="is gated and HF_TOKEN may not read it yet: accept its conditions"):
        store.path("shard_00000.parquet")
    publish_chat_dataset(hub.server, 20)  # the SFT dataset, through `datasets`
    hub.server.gate(SFT_DATASET_REPO, "dataset")
    with pytest.raises(DataError, match="is gated and HF_TOKEN may not read it yet: .* or set SFT_DATASET"):
        load_chat_dataset(SFT_DATASET_REPO, "train", tmp_path / "sft_data")


def test_a_stop_says_whether_the_newest_can_go_up_and_never_leaves_it_looking_complete(hub, env,
                                                                                       tmp_path) -> None:
    base = Path(env["NANOCHAT_BASE_DIR"])
    make_checkpoint(base, 1)
    proc = sidecar(env, "--grace-seconds", "6")
    held = hub.server.pause_next(f"/api/buckets/{env['HF_REPO_ID']}/batch", "POST")
    try:
        wait_for(lambda: held.reached.is_set(), 60, "the first push")
        held.release()
        wait_for(lambda: "event=push_done stage=base step=1" in sync_log(env), 60, "a measured push")
        big = layout.new_tmp_dir(layout.stage_dir(base, "base", TAG), 2)  # far larger than a grace allows
        (big / "model.safetensors").write_bytes(b"\x08\0\0\0\0\0\0\0{}      " + bytes(32 << 20))
        fill_checkpoint(big, 2)
        layout.publish(big, 2, stage="base", model_tag=TAG)
        held = hub.server.pause_next(f"/api/buckets/{env['HF_REPO_ID']}/batch", "POST")  # its upload stalls
        out = stop(proc)
    finally:
        held.release()
    assert proc.returncode == 1, out
    [line] = lines_with(out, "event=stopping")
    assert "newest=base:2" in line and "fits=no" in line and "mb_s=" in line and "needs_s=" in line
    assert lines_with(out, "event=final_push_timeout")
    assert open_store(cfg_of(env)).view().steps("base") == [1]  # its files went up, not its manifest
    volume, step = restore_on_empty_volume(env, tmp_path, "redeployed")
    assert step == 1 and digests(volume, 1) == digests(base, 1)


@pytest.mark.credit_delayed
def test_a_run_an_older_phoenix_pushed_into_the_repo_restores_and_moves_to_the_bucket(
        hub, env, tmp_path, credit_delay) -> None:
    base = Path(env["NANOCHAT_BASE_DIR"])
    old = env | {"HF_CHECKPOINT_STORE": "repo"}
    for step in (1, 2):
        make_checkpoint(base, step)
        assert Syncer(cfg_of(old)).sync_once().ok  # the repo holds 2 and 1, as an older phoenix left them
    volume, step = restore_on_empty_volume(env, tmp_path, "redeployed")  # the new default reads them
    assert step == 2 and digests(volume, 2) == digests(base, 2)
    syncer = Syncer(cfg_of(env))
    for step in (3, 4):  # each push into the bucket prunes the oldest left in the repo (commit, squash)
        make_checkpoint(base, step)
        result = syncer.sync_once()
        assert result.ok and result.pushed == [("base", step)] and result.pruned == [("base", step - 2)]
    assert open_store(cfg_of(env)).view().steps("base") == [4, 3]
    api = HfApi(endpoint=hub.url, token=hub.token)
    assert not [f for f in api.list_repo_files(env["HF_REPO_ID"]) if f.startswith("base_checkpoints/")]
    assert len(bucket_paths(hub, env)) == 2 * FILES
    storage = collect(cfg_of(env))["hub_storage"]  # `phoenix status`: the repo's frees count until credited
    assert storage["settled"] == hub.server.bucket_size(env["HF_REPO_ID"])
    assert storage["counted"] == hub.server.storage(hub.user).counted
    assert (storage["counted"] > storage["settled"]) == bool(credit_delay)
    assert storage["projected_peak"] >= storage["counted"]
    volume, step = restore_on_empty_volume(env, tmp_path, "redeployed_again")
    assert step == 4 and digests(volume, 4) == digests(base, 4)


def test_a_run_in_scaled_time_keeps_its_backup_within_two_intervals(hub, tmp_path) -> None:
    """The default against a free account's terms: 100 GB, about 6 checkpoints of d26, a squash credited
    36 h late (longer than the run). 2.5 hours of training at 400x (bench/backup_sim.py runs 3 days): a
    checkpoint every 10 min, SFT at the end, the sidecar's real loop every 20 min, a stop, a redeploy."""
    cfg = SimConfig(hours=2.5, sft_hours=0.5, scale=400)
    hub.server.add_token(SIM_TOKEN, SIM_USER)
    result = simulate(cfg, hub.server, tmp_path, hub.env)
    assert result.refused == 0 and result.deferred == 0
    assert result.worst_lag_h <= 2 * cfg.interval_s / 3600, report(cfg, result)
    assert result.peak_counted_gb <= cfg.limit_gb
    assert result.pushes > 6  # more than 36 h of a git repo's history would hold
    assert result.restored == ("sft", 3) and result.bitwise  # the final push carried the newest
