"""Hub storage stays bounded through Xet: pruning squashes, quotas hold, kills and squashes lose nothing."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError
from safetensors.numpy import save_file

from entrypoint.hub.client import Hub
from entrypoint.hub.config import HubConfig
from entrypoint.hub.restore import restore
from entrypoint.sidecar.sync import Syncer
from entrypoint.status import collect
from tests.conftest import CREDIT_DELAY_S
from tests.helpers import fill_checkpoint
from tests.test_sync import sidecar_env
from trainer import checkpoint_layout as layout

TAG = "d26-hyperbolic"
PHOENIX = [sys.executable, "-c", "from entrypoint.cli import main; main()"]
CKPT_BYTES = 64 * 1024


def make_checkpoint(base: Path, step: int, stage: str = "base", done: bool = False) -> layout.Checkpoint:
    """A published checkpoint: weights and optimizer state (random, so no two share content), the same size
    in every stage (SFT saves the same model and optimizer); `done` marks a stage's final one."""
    tmp = layout.new_tmp_dir(layout.stage_dir(base, stage, TAG), step)
    rng = np.random.default_rng([step, layout.STAGES.index(stage)])
    for name in ("model.safetensors", "optimizer.safetensors"):
        save_file({"w": rng.random(CKPT_BYTES // 8, dtype=np.float32)}, str(tmp / name))
    fill_checkpoint(tmp, step, stage)
    return layout.publish(tmp, step, stage=stage, model_tag=TAG, done=done)


@pytest.fixture
def env(hub, tmp_path: Path) -> dict[str, str]:
    return sidecar_env(hub, tmp_path) | {"HF_KEEP_LAST": "2"}


def cfg_of(env: dict[str, str], **change: str) -> HubConfig:
    return HubConfig.from_env(env | change)


def checkpoint_bytes(base: Path, step: int) -> int:
    folder = layout.stage_dir(base, "base", TAG) / layout.step_dir_name(step)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def restore_on_empty_volume(env: dict[str, str], tmp_path: Path, name: str) -> tuple[Path, int | None]:
    """An empty-volume redeploy: restore, then return the volume and its latest verified step."""
    volume = tmp_path / name
    restore(cfg_of(env, NANOCHAT_BASE_DIR=str(volume)))
    latest = layout.latest(layout.stage_dir(volume, "base", TAG), full_hash=True)
    return volume, latest.step if latest else None


def digests(base: Path, step: int) -> dict[str, str]:
    folder = layout.stage_dir(base, "base", TAG) / layout.step_dir_name(step)
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def same_files(a: Path, b: Path, step: int) -> bool:
    return digests(a, step) == digests(b, step)


def head_lfs_bytes(env: dict[str, str]) -> int:
    snapshot = Hub(cfg_of(env)).snapshot()
    return sum(f.lfs.size for f in snapshot.files.values() if f.lfs)


def hub_steps(env: dict[str, str], stage: str) -> list[int]:
    return Hub(cfg_of(env)).snapshot().complete_steps(cfg_of(env), stage)


def with_quota(hub, env: dict[str, str], nbytes: int) -> dict[str, str]:
    """The account's storage capped at `nbytes` on the Hub, and the sidecar told so (HF_STORAGE_LIMIT_GB)."""
    hub.server.set_quota(hub.user, nbytes)
    return env | {"HF_STORAGE_LIMIT_GB": str(nbytes / 1e9)}


def refusals(hub) -> list[int]:
    return [r.status for r in hub.server.request_log if r.status in (403, 429)]


@pytest.mark.credit_delayed
def test_thirty_checkpoints_with_keep_last_2_never_pass_a_three_checkpoint_quota(hub, env, tmp_path,
                                                                                 credit_delay) -> None:
    base = Path(env["NANOCHAT_BASE_DIR"])
    make_checkpoint(base, 1)
    # HF_KEEP_LAST + 1: the small files are not LFS, they cost nothing.
    env = with_quota(hub, env, quota := 3 * checkpoint_bytes(base, 1))
    syncer, pushed, made = Syncer(cfg_of(env)), [], {1: digests(base, 1)}
    for step in range(1, 31):
        if step > 1:
            make_checkpoint(base, step)
            made[step] = digests(base, step)
        layout.prune(layout.stage_dir(base, "base", TAG), keep_last=3)  # the trainer's own retention
        if step % 6 not in (0, 1, 3):
            continue  # the sidecar fell behind (a slow upload): the next pass finds 2 or 3 new ones
        result = syncer.sync_once()
        assert result.ok, result.errors
        assert result.pushed + result.deferred == [("base", step)]  # the newest, now or once it fits
        pushed += [s for _, s in result.pushed]
        assert hub_steps(env, "base") == sorted(pushed[-2:], reverse=True)
        assert hub.server.storage_used(env["HF_REPO_ID"]) <= quota  # what the Hub counts, credited or not
    assert refusals(hub) == []  # the budget waits for the credit instead of being refused
    # Credited at once, every pass pushes; credited an hour later, the third push fills the quota until then.
    assert pushed == ([1, 3, 6] if credit_delay else [s for s in range(1, 31) if s % 6 in (0, 1, 3)])
    storage = collect(cfg_of(env))["hub_storage"]  # `phoenix status`
    assert storage["counted"] == hub.server.storage_used(env["HF_REPO_ID"]) <= quota
    assert storage["settled"] == head_lfs_bytes(env) == 2 * quota // 3
    volume, step = restore_on_empty_volume(env, tmp_path, "redeployed")
    assert step == pushed[-1] and digests(volume, step) == made[step]  # bitwise, though long pruned here


@pytest.mark.credit_delayed
def test_a_finished_base_stage_keeps_only_its_final_checkpoint_while_sft_runs(hub, env, tmp_path,
                                                                              credit_delay) -> None:
    base = Path(env["NANOCHAT_BASE_DIR"])
    for step in (1, 2, 3):
        make_checkpoint(base, step)
    env = with_quota(hub, env, 4 * checkpoint_bytes(base, 1))  # 1 base + HF_KEEP_LAST + 1 SFT
    syncer = Syncer(cfg_of(env))
    assert syncer.sync_once().pushed == [("base", 3)]  # the newest only: 2 would cost an upload for nothing
    make_checkpoint(base, 4, done=True)  # the final one: restore and SFT need nothing older
    result = syncer.sync_once()
    assert result.ok and result.pushed == [("base", 4)] and result.pruned == [("base", 3)]
    assert hub_steps(env, "base") == [4]
    assert hub.server.storage_settled(env["HF_REPO_ID"]) == checkpoint_bytes(base, 4)  # squashed at once
    assert collect(cfg_of(env))["stages"]["base"]["not_synced"] == []  # `phoenix status`: 1-3 are not due
    for new in ([1, 2], [3], [4, 5]):  # SFT checkpoints, one pass finding two
        for step in new:
            make_checkpoint(base, step, stage="sft")
        result = syncer.sync_once()
        assert result.ok, result.errors
        assert result.pushed + result.deferred == [("sft", new[-1])]  # older base ones never return
        assert hub_steps(env, "base") == [4]
    # Credited at once: SFT keeps its last 2. Credited later: base 3 still counts, so 4 checkpoints are
    # counted once SFT 2 and 3 are up, and SFT 5 waits for the credit.
    assert hub_steps(env, "sft") == ([3, 2] if credit_delay else [5, 3])
    assert refusals(hub) == []
    expected = {"base": 4, "sft": 3 if credit_delay else 5}
    assert restore(cfg_of(env, NANOCHAT_BASE_DIR=str(tmp_path / "redeployed"))) == expected


@pytest.mark.credit_delayed
def test_a_prune_left_unsquashed_is_squashed_before_the_next_push(hub, env, credit_delay) -> None:
    base = Path(env["NANOCHAT_BASE_DIR"])
    for step in (1, 2, 3):
        make_checkpoint(base, step)
    assert Syncer(cfg_of(env, HF_KEEP_LAST="all")).sync_once().ok
    make_checkpoint(base, 4)
    hub.server.fail_next(status=400, path_contains="/super-squash/")  # the squash after the prune fails
    failed = Syncer(cfg_of(env)).sync_once()
    assert not failed.ok and failed.pushed == [("base", 4)]
    assert sorted(failed.pruned) == [("base", 1), ("base", 2)]  # in the push's own commit
    assert hub.server.storage_used(env["HF_REPO_ID"]) == 4 * checkpoint_bytes(base, 1)  # history holds all
    # Pushing first would take the history to 5 checkpoints; squashing first needs room for 3.
    env = with_quota(hub, env, 4 * checkpoint_bytes(base, 1))
    make_checkpoint(base, 5)
    result = Syncer(cfg_of(env)).sync_once()
    assert result.ok, result.errors
    settled = hub.server.storage_settled(env["HF_REPO_ID"])
    if credit_delay:  # the squash is credited an hour later: until then 5 waits, and the Hub keeps 4 and 3
        assert result.deferred == [("base", 5)] and hub_steps(env, "base") == [4, 3]
        assert settled == head_lfs_bytes(env) == 2 * checkpoint_bytes(base, 1)
    else:
        assert result.pushed == [("base", 5)] and hub_steps(env, "base") == [5, 4]
        assert settled == head_lfs_bytes(env) == 2 * checkpoint_bytes(base, 1)
    assert refusals(hub) == []


def test_without_pruning_the_quota_answers_the_hubs_403(hub, env) -> None:
    base = Path(env["NANOCHAT_BASE_DIR"])
    make_checkpoint(base, 1)
    hub.server.set_quota(hub.user, 2 * checkpoint_bytes(base, 1))
    syncer = Syncer(cfg_of(env, HF_KEEP_LAST="all"))
    assert syncer.sync_once().ok
    make_checkpoint(base, 2)
    assert syncer.sync_once().ok  # the tokenizer and run files are small: 2 checkpoints fit
    make_checkpoint(base, 3)
    keep_all = env | {"HF_KEEP_LAST": "all"}
    full = subprocess.run(PHOENIX + ["sync", "--once"], env=keep_all, capture_output=True, text=True,
                          timeout=60)
    assert full.returncode == 1 and "storage limit reached" in full.stdout  # a failed pass, retried later
    assert [r.status for r in hub.server.request_log if r.path.endswith("/commit/main")][-1] == 403
    assert "storage limit reached" in collect(cfg_of(keep_all))["hub_quota_error"]  # `phoenix status`


@pytest.mark.credit_delayed
def test_delete_commit_frees_nothing_squash_and_permanent_deletion_do(hub, env, credit_delay) -> None:
    api = HfApi(endpoint=hub.url, token=hub.token)
    repo = env["HF_REPO_ID"]
    api.create_repo(repo, private=True)
    one, two = np.random.default_rng(1).bytes(50_000), np.random.default_rng(2).bytes(70_000)
    api.upload_file(path_or_fileobj=one, path_in_repo="a/one.bin", repo_id=repo)
    api.upload_file(path_or_fileobj=two, path_in_repo="b/two.bin", repo_id=repo)
    api.upload_file(path_or_fileobj=two, path_in_repo="c/two.bin", repo_id=repo)  # same content: once
    assert api.repo_info(repo, expand=["usedStorage"]).used_storage == 120_000
    api.delete_folder("a", repo_id=repo)
    assert hub.server.storage_used(repo) == 120_000  # the history still holds one.bin
    api.super_squash_history(repo)
    assert hub.server.storage_settled(repo) == 70_000 and len(api.list_repo_commits(repo)) == 1
    assert hub.server.storage_used(repo) == (120_000 if credit_delay else 70_000)  # what the quota sees
    assert hf_bytes(hub, repo, "b/two.bin") == two  # what the head holds survives the squash
    doomed = [f for f in api.list_lfs_files(repo) if f.filename.startswith("b/")]
    api.permanently_delete_lfs_files(repo, doomed)
    assert hub.server.storage_settled(repo) == 0 and "c/two.bin" not in api.list_repo_files(repo)
    assert hub.server.storage_used(repo) == (120_000 if credit_delay else 0)


def hf_bytes(hub, repo: str, path: str) -> bytes:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo, path, endpoint=hub.url, token=hub.token)).read_bytes()


def kill_sync_while_held(hub, env: dict[str, str], held: str, method: str, let_through: int = 0) -> None:
    """`phoenix sync --once`, SIGKILLed while the Hub holds its request matching `held` (after letting
    `let_through` such requests pass): a sidecar killed at that instant."""
    pauses = [hub.server.pause_next(held, method) for _ in range(let_through + 1)]
    proc = subprocess.Popen(PHOENIX + ["sync", "--once"], env=env, stdout=subprocess.DEVNULL)
    try:
        for pause in pauses[:let_through]:
            assert pause.reached.wait(30), f"the sidecar never sent {held}"
            pause.release()
        assert pauses[-1].reached.wait(30), f"the sidecar never reached {held}"
        proc.kill()
        proc.wait()
    finally:
        for pause in pauses:
            pause.release()


@pytest.mark.parametrize(
    ("held", "method", "credit_delay"),
    [("/xet-write-token/", "GET", 0.0), ("/commit/main", "POST", 0.0), ("/super-squash/", "POST", 0.0),
     ("/super-squash/", "POST", CREDIT_DELAY_S)],
    ids=["mid-xet-upload", "mid-prune-or-push-commit", "mid-squash", "mid-squash-credit-delayed"],
)
def test_sidecar_killed_mid_transfer_prune_or_squash_leaves_a_verifiable_latest(
    hub, env, tmp_path, held, method
) -> None:
    base = Path(env["NANOCHAT_BASE_DIR"])
    for step in (1, 2, 3):
        make_checkpoint(base, step)
    assert Syncer(cfg_of(env, HF_KEEP_LAST="all")).sync_once().ok
    make_checkpoint(base, 4)
    kill_sync_while_held(hub, env, held, method)
    _, step = restore_on_empty_volume(env, tmp_path, "after_kill")
    assert step in (3, 4)  # the newest complete checkpoint the Hub had, whatever the kill interrupted
    done = subprocess.run(PHOENIX + ["sync", "--once"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert hub.server.storage_settled(env["HF_REPO_ID"]) == head_lfs_bytes(env)  # the next pass freed it
    volume, step = restore_on_empty_volume(env, tmp_path, "after_resync")
    assert step == 4 and same_files(base, volume, 4)


def test_restore_survives_a_squash_of_the_commit_it_pinned(hub, env, tmp_path) -> None:
    base = Path(env["NANOCHAT_BASE_DIR"])
    for step in (1, 2, 3):
        make_checkpoint(base, step)
        assert Syncer(cfg_of(env, HF_KEEP_LAST="all")).sync_once().ok
    # Restore pauses on its first checkpoint file; meanwhile the sidecar prunes and squashes the history.
    pause = hub.server.pause_next("/optimizer.safetensors", "HEAD")
    outcome: dict[str, object] = {}
    volume = tmp_path / "restoring"
    thread = threading.Thread(
        target=lambda: outcome.update(steps=restore(cfg_of(env, NANOCHAT_BASE_DIR=str(volume)))))
    thread.start()
    try:
        assert pause.reached.wait(30)
        result = Syncer(cfg_of(env, HF_KEEP_LAST="1")).sync_once()
        assert result.ok and sorted(result.pruned) == [("base", 1), ("base", 2)]
    finally:
        pause.release()
    thread.join(60)
    assert outcome["steps"] == {"base": 3, "sft": None}
    assert layout.latest(layout.stage_dir(volume, "base", TAG), full_hash=True).step == 3
    assert same_files(base, volume, 3)
    gone = [r for r in hub.server.request_log if "/resolve/" in r.path and r.status == 404]
    assert gone, "the restore never hit the squashed commit"


def test_quota_message_is_the_hubs(hub, env) -> None:
    hub.server.set_quota(hub.user, 10)
    api = HfApi(endpoint=hub.url, token=hub.token)
    api.create_repo(env["HF_REPO_ID"], private=True)
    with pytest.raises(HfHubHTTPError) as err:
        api.upload_file(path_or_fileobj=np.random.default_rng(0).bytes(20_000), path_in_repo="x.bin",
                        repo_id=env["HF_REPO_ID"])
    assert err.value.response.status_code == 403
    assert "Private repository storage limit reached" in str(err.value)
