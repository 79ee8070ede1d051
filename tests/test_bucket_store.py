"""Checkpoints in a Storage Bucket (the default): bounded storage, kills, partial uploads, fencing."""

from __future__ import annotations

import hashlib
import signal
import subprocess
from pathlib import Path

import pytest
from huggingface_hub import HfApi

from entrypoint.hub.restore import fetch_weights, restore
from entrypoint.hub.stores import claim_generation, open_store
from entrypoint.sidecar.sync import Syncer
from entrypoint.status import collect
from tests.helpers import SYNTHETIC_FILES
from tests.test_hub_storage import (
    PHOENIX,
    TAG,
    cfg_of,
    kill_sync_while_held,
    make_checkpoint,
    same_files,
    with_quota,
)
from tests.test_sync import sidecar_env
from trainer import checkpoint_layout as layout

FILES = len(SYNTHETIC_FILES) + 1  # per checkpoint in the bucket, MANIFEST.json included


def bucket_env(hub, tmp_path: Path) -> dict[str, str]:
    """A sidecar's environment with the defaults: checkpoints in a bucket of the repo's id."""
    env = sidecar_env(hub, tmp_path) | {"HF_KEEP_LAST": "2"}
    del env["HF_CHECKPOINT_STORE"]
    return env


@pytest.fixture
def env(hub, tmp_path: Path) -> dict[str, str]:
    return bucket_env(hub, tmp_path)


def volume(env: dict[str, str]) -> Path:
    return Path(env["NANOCHAT_BASE_DIR"])


def folder_bytes(base: Path, step: int) -> int:
    """A checkpoint's size in a bucket: every file counts there, the JSON ones too."""
    folder = layout.stage_dir(base, "base", TAG) / layout.step_dir_name(step)
    return sum(p.stat().st_size for p in folder.iterdir())


def bucket_steps(env: dict[str, str], stage: str = "base") -> list[int]:
    return open_store(cfg_of(env)).view().steps(stage)


def bucket_paths(hub, env: dict[str, str]) -> list[str]:
    return sorted(f.path for f in HfApi(endpoint=hub.url, token=hub.token).list_bucket_tree(
        env["HF_REPO_ID"], recursive=True) if hasattr(f, "xet_hash"))


def phoenix(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(PHOENIX + list(args), env=env, capture_output=True, text=True, timeout=120)


def restore_on_empty_volume(env: dict[str, str], tmp_path: Path, name: str, cli: bool = False
                            ) -> tuple[Path, int | None]:
    """A restore (`phoenix restore` with `cli`) onto an empty volume; the volume, its latest verified step."""
    empty = tmp_path / name
    if cli:
        done = phoenix(env | {"NANOCHAT_BASE_DIR": str(empty)}, "restore")
        assert done.returncode == 0, done.stdout + done.stderr
    else:
        restore(cfg_of(env, NANOCHAT_BASE_DIR=str(empty)))
    latest = layout.latest(layout.stage_dir(empty, "base", TAG), full_hash=True)
    return empty, latest.step if latest else None


@pytest.mark.credit_delayed  # a bucket frees a delete at once: no credit to wait for
def test_thirty_checkpoints_with_keep_last_2_fit_a_three_checkpoint_quota(hub, env, tmp_path) -> None:
    base = volume(env)
    make_checkpoint(base, 10)
    quota = 3 * folder_bytes(base, 10) + 64  # HF_KEEP_LAST + 1; manifests of later steps differ by bytes
    env = with_quota(hub, env, quota)
    syncer, pushed = Syncer(cfg_of(env)), []
    for step in range(10, 40):  # 30 checkpoints
        if step > 10:
            make_checkpoint(base, step)
        layout.prune(layout.stage_dir(base, "base", TAG), keep_last=3)  # the trainer's own retention
        if step % 6 not in (0, 1, 3):
            continue  # the sidecar fell behind (a slow upload): the next pass finds 2 or 3 new ones
        result = syncer.sync_once()
        assert result.ok, result.errors  # no 403: each push is pruned at once, and deletes free storage
        assert result.pushed == [("base", step)] and not result.deferred  # the newest, every pass
        pushed.append(step)
        assert bucket_steps(env) == pushed[:-3:-1]
        assert hub.server.bucket_size(env["HF_REPO_ID"]) <= quota
    assert not [r for r in hub.server.request_log if r.status == 403]
    assert collect(cfg_of(env))["hub_storage"]["counted"] == hub.server.bucket_size(env["HF_REPO_ID"])
    assert len(bucket_paths(hub, env)) == 2 * FILES  # two checkpoints: nothing left behind
    volume_after, step = restore_on_empty_volume(env, tmp_path, "redeployed", cli=True)
    assert step == 39 and same_files(base, volume_after, 39)
    stage, weights = fetch_weights(cfg_of(env, NANOCHAT_BASE_DIR=str(tmp_path / "chat")))  # `phoenix chat`
    model = hashlib.sha256((weights / "model.safetensors").read_bytes()).hexdigest()
    assert stage == "base" and model == digests(base, 39)["model.safetensors"]


@pytest.mark.parametrize(("held", "method"), [("/xet-write-token", "GET"), ("/batch", "POST")],
                         ids=["mid-xet-upload", "mid-batch"])
def test_sidecar_killed_mid_upload_leaves_a_verifiable_latest(hub, env, tmp_path, held, method) -> None:
    base = volume(env)
    for step in (1, 2):
        make_checkpoint(base, step)
    assert Syncer(cfg_of(env)).sync_once().ok
    make_checkpoint(base, 3)
    kill_sync_while_held(hub, env, f"/api/buckets/{env['HF_REPO_ID']}{held}", method)  # mid-upload
    _, step = restore_on_empty_volume(env, tmp_path, "after_kill")
    assert step == 2  # step 3 has no manifest in the bucket, whatever files of it landed
    done = phoenix(env, "sync", "--once")
    assert done.returncode == 0, done.stdout + done.stderr
    volume_after, step = restore_on_empty_volume(env, tmp_path, "after_resync")
    assert step == 3 and same_files(base, volume_after, 3)
    assert bucket_steps(env) == [3, 2]


@pytest.mark.parametrize("held_batch", [0, 1], ids=["mid-manifest-delete", "mid-file-delete"])
def test_sidecar_killed_mid_prune_leaves_a_verifiable_latest(hub, env, tmp_path, held_batch) -> None:
    base = volume(env)
    for step in (1, 2, 3):
        make_checkpoint(base, step)
    assert Syncer(cfg_of(env, HF_KEEP_LAST="all")).sync_once().ok
    # Nothing new to push: this pass's batches are the prune's, manifests first, then the files.
    kill_sync_while_held(hub, env, f"/api/buckets/{env['HF_REPO_ID']}/batch", "POST", let_through=held_batch)
    volume_after, step = restore_on_empty_volume(env, tmp_path, "after_kill")
    assert step == 3 and same_files(base, volume_after, 3)
    done = phoenix(env, "sync", "--once")
    assert done.returncode == 0, done.stdout + done.stderr
    assert bucket_steps(env) == [3, 2]
    assert len(bucket_paths(hub, env)) == 2 * FILES  # step 1's files went too, manifest or not


def test_a_batch_applied_only_in_part_leaves_no_manifest_and_the_next_pass_completes_it(hub, env) -> None:
    make_checkpoint(volume(env), 1)
    hub.server.fail_bucket_op("step_000001/optimizer.safetensors")  # buckets are not transactional
    failed = Syncer(cfg_of(env)).sync_once()
    assert not failed.ok and failed.pushed == [] and "optimizer.safetensors" in failed.errors[0]
    landed = bucket_paths(hub, env)
    assert any(p.endswith("step_000001/model.safetensors") for p in landed)  # the rest of the batch did
    assert not any(p.endswith(layout.MANIFEST_NAME) for p in landed) and bucket_steps(env) == []
    assert Syncer(cfg_of(env)).sync_once().pushed == [("base", 1)]
    assert bucket_steps(env) == [1]


def test_partial_or_damaged_checkpoints_in_the_bucket_are_never_restored(hub, env, tmp_path) -> None:
    base = volume(env)
    make_checkpoint(base, 1)
    assert Syncer(cfg_of(env)).sync_once().ok
    api, bucket = HfApi(endpoint=hub.url, token=hub.token), env["HF_REPO_ID"]
    stage_dir = layout.stage_dir(base, "base", TAG)
    for step in (2, 3, 4):
        make_checkpoint(base, step)
    folder = {step: f"base_checkpoints/{TAG}/gen_000000/step_{step:06d}" for step in (2, 3, 4)}

    def upload(step: int, names: list[str], override: dict[str, bytes] | None = None) -> None:
        local = stage_dir / layout.step_dir_name(step)
        api.batch_bucket_files(bucket, add=[((override or {}).get(n) or (local / n).read_bytes(),
                                             f"{folder[step]}/{n}") for n in names])

    data = list(SYNTHETIC_FILES)  # model.safetensors first
    upload(4, data)  # step 4: every file but no manifest (an upload cut short)
    upload(3, [*data[1:], layout.MANIFEST_NAME])  # step 3: a manifest, but a file it lists is missing
    model = (stage_dir / "step_000002" / "model.safetensors").read_bytes()
    flipped = model[:-1] + bytes([model[-1] ^ 1])  # step 2: right size, wrong sha256
    upload(2, [*data, layout.MANIFEST_NAME], {"model.safetensors": flipped})
    volume_after, step = restore_on_empty_volume(env, tmp_path, "redeployed")
    assert step == 1 and same_files(base, volume_after, 1)
    # The sidecar deletes the checkpoint that lacks a file the volume's copy has, pushes the newest again
    # over its manifest-less files, and prunes the oldest. Step 2 looks whole by its sizes: only a restore
    # can tell its sha256 is wrong, and it falls back from it.
    layout.prune(stage_dir, keep_last=2)
    result = Syncer(cfg_of(env)).sync_once()
    assert result.ok and result.pushed == [("base", 4)] and result.pruned == [("base", 1)], result.errors
    assert bucket_steps(env) == [4, 2] and len(bucket_paths(hub, env)) == 2 * FILES


def digests(base: Path, step: int) -> dict[str, str]:
    folder = layout.stage_dir(base, "base", TAG) / layout.step_dir_name(step)
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_a_fenced_generation_cannot_become_the_restored_checkpoint(hub, env, tmp_path) -> None:
    from tests.test_sync import make_checkpoint as make_other_checkpoint

    old_env = env
    new_env = bucket_env(hub, tmp_path / "new")
    old, new = cfg_of(old_env), cfg_of(new_env)
    assert claim_generation(old) == 1
    for step in (1, 2):
        make_checkpoint(volume(old_env), step)
        assert Syncer(old).sync_once().ok
    make_checkpoint(volume(old_env), 3)
    # The old instance's sidecar checks the claim and sends step 3's manifest; the VM is paused right then
    # (SIGSTOP, the request held). Meanwhile a redeploy elsewhere claims generation 2. It wakes up, and its
    # manifest lands: a bucket has no compare-and-swap to refuse it.
    batch = f"/api/buckets/{env['HF_REPO_ID']}/batch"
    files_batch, manifest_batch = hub.server.pause_next(batch, "POST"), hub.server.pause_next(batch, "POST")
    sidecar = subprocess.Popen(PHOENIX + ["sync", "--once"], env=old_env, stdout=subprocess.PIPE, text=True)
    try:
        assert files_batch.reached.wait(30)
        files_batch.release()
        assert manifest_batch.reached.wait(30)
        sidecar.send_signal(signal.SIGSTOP)
        assert claim_generation(new) == 2
        sidecar.send_signal(signal.SIGCONT)
    finally:
        files_batch.release()
        manifest_batch.release()
    out, _ = sidecar.communicate(timeout=60)
    assert sidecar.returncode == 1 and "event=push_done stage=base step=3" in out and "event=fenced" in out
    assert f"base_checkpoints/{TAG}/gen_000001/step_000003/MANIFEST.json" in bucket_paths(hub, env)
    _, step = restore_on_empty_volume(new_env, tmp_path, "redeployed")
    assert step == 2  # what generation 1 had pushed when generation 2 claimed the run; not its late step 3
    assert Syncer(old).sync_once().fenced  # from now on the old instance writes nothing
    # The new generation trains its own step 3 (other weights) and pushes it: no path is shared.
    make_other_checkpoint(volume(new_env), 3)
    assert Syncer(new).sync_once().pushed == [("base", 3)]
    assert not [p for p in bucket_paths(hub, env) if "gen_000001/step_000003" in p]  # deleted as fenced
    volume_after, step = restore_on_empty_volume(new_env, tmp_path, "redeployed_again")
    assert step == 3 and digests(volume_after, 3) == digests(volume(new_env), 3)
    assert digests(volume_after, 3) != digests(volume(old_env), 3)


def test_a_full_account_is_one_clear_line_and_status_shows_it(hub, env) -> None:
    base = volume(env)
    make_checkpoint(base, 1)
    hub.server.set_quota(hub.user, folder_bytes(base, 1) // 2)
    full = phoenix(env, "sync", "--once")
    assert full.returncode == 1 and "Traceback" not in full.stdout + full.stderr
    line = next(x for x in full.stdout.splitlines() if "event=sync_failed" in x)
    assert "storage limit reached" in line and "HF_KEEP_LAST" in line and "HF_STORAGE_LIMIT_GB" in line
    status = phoenix(env, "status").stdout
    assert "(checkpoints in the bucket)" in status and "hub storage: counted 0.00 GB" in status
    assert "storage limit reached" in status
    assert bucket_steps(env) == []
