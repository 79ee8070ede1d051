"""`phoenix restore` against a live local Hub: only the latest verified checkpoint comes back, resumably."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from safetensors.numpy import save_file

from entrypoint.hub.config import HubConfig
from entrypoint.hub.restore import STAGING_DIR, restore
from tests.helpers import fill_checkpoint, rot_on_hub
from trainer import checkpoint_layout as layout

TAG = "d26-hyperbolic"
MiB = 1024 * 1024
PHOENIX = [sys.executable, "-c", "from entrypoint.cli import main; main()"]


def make_checkpoint(base: Path, step: int, tensors: dict[str, int] | None = None) -> layout.Checkpoint:
    """A published base checkpoint with one safetensors file per `tensors` entry (name -> bytes)."""
    tmp = layout.new_tmp_dir(layout.stage_dir(base, "base", TAG), step)
    rng = np.random.default_rng(step)
    for name, nbytes in (tensors or {"model.safetensors": 64 * 1024}).items():
        save_file({"w": rng.random(nbytes // 4, dtype=np.float32)}, str(tmp / name))
    fill_checkpoint(tmp, step)
    return layout.publish(tmp, step, stage="base", model_tag=TAG)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """The volume of the instance that died: its files are what the Hub holds."""
    base = tmp_path / "old_volume"
    (base / "tokenizer").mkdir(parents=True)
    (base / "tokenizer" / "tokenizer.json").write_text('{"model": "bpe"}')
    layout.write_json_atomic(base / "runs" / TAG / "run.json", {"run_id": "r1", "wandb_run_id": "w1"})
    layout.write_json_atomic(base / "runs" / TAG / "generation.json", {"generation": 3})
    return base


@pytest.fixture
def env(hub, tmp_path: Path) -> dict[str, str]:
    return hub.env | {
        "NANOCHAT_BASE_DIR": str(tmp_path / "new_volume"),
        "MODEL_TAG": TAG,
        "HF_REPO_ID": f"{hub.user}/phoenix-ckpt",
        "PYTHONUNBUFFERED": "1",
    }


def upload(hub, env: dict[str, str], source: Path) -> None:
    """Put the old volume on the Hub as the sidecar lays it out (server-side: sync is not under test here)."""
    files = {
        p.relative_to(source).as_posix(): p
        for p in sorted(source.rglob("*"))
        if p.is_file() and "trainer_status" not in p.name
    }
    hub.server.publish(env["HF_REPO_ID"], files, private=True)


def volume(env: dict[str, str]) -> Path:
    return Path(env["NANOCHAT_BASE_DIR"])


def phoenix(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(PHOENIX + list(args), env=env, capture_output=True, text=True, timeout=60)


def test_empty_volume_gets_only_the_latest_checkpoint(hub, env, source) -> None:
    ckpts = [make_checkpoint(source, step, {"model.safetensors": 256 * 1024}) for step in (250, 500, 750)]
    upload(hub, env, source)
    done = phoenix(env, "restore")
    assert done.returncode == 0, done.stdout + done.stderr
    assert hub.server.bytes_downloaded <= 1.05 * ckpts[-1].total_bytes
    restored = layout.latest(layout.stage_dir(volume(env), "base", TAG), full_hash=True)
    assert restored is not None and restored.step == 750
    assert [c.step for c in layout.complete_checkpoints(restored.path.parent)] == [750]
    manifest = restored.path / layout.MANIFEST_NAME
    assert manifest.read_bytes() == (ckpts[-1].path / layout.MANIFEST_NAME).read_bytes()
    assert (volume(env) / "tokenizer" / "tokenizer.json").read_text() == '{"model": "bpe"}'
    assert json.loads((volume(env) / "runs" / TAG / "run.json").read_text())["run_id"] == "r1"
    assert not (volume(env) / "runs" / TAG / "generation.json").exists()  # claim_generation owns it
    assert not (volume(env) / STAGING_DIR).exists()
    assert "event=restored stage=base step=750" in done.stdout


def _replace_on_hub(hub, env, path: str) -> None:
    """A different file at `path`: the manifest no longer matches what the Hub serves."""
    other = np.random.default_rng(0).random(1024, dtype=np.float32)
    blob = Path(env["NANOCHAT_BASE_DIR"]).parent / "other.safetensors"
    save_file({"w": other}, str(blob))
    HfApi(endpoint=hub.url, token=hub.token).create_commit(
        env["HF_REPO_ID"], [CommitOperationAdd(path, str(blob))], commit_message="corrupt"
    )


def _delete_on_hub(hub, env, path: str) -> None:
    HfApi(endpoint=hub.url, token=hub.token).create_commit(
        env["HF_REPO_ID"], [CommitOperationDelete(path)], commit_message="lose a file"
    )


def _rot_in_storage(hub, env, path: str) -> None:
    rot_on_hub(hub, env["HF_REPO_ID"], path)


@pytest.mark.parametrize("corrupt", [_replace_on_hub, _delete_on_hub, _rot_in_storage])
def test_corrupt_latest_on_the_hub_falls_back_to_the_previous(hub, env, source, corrupt, caplog) -> None:
    for step in (250, 500, 750):
        make_checkpoint(source, step)
    upload(hub, env, source)
    bad = f"base_checkpoints/{TAG}/step_000750/model.safetensors"
    corrupt(hub, env, bad)
    steps = restore(HubConfig.from_env(env))
    assert steps == {"base": 500, "sft": None}
    assert layout.verify(layout.stage_dir(volume(env), "base", TAG) / "step_000500", full_hash=True)
    assert not (layout.stage_dir(volume(env), "base", TAG) / "step_000750").exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(
        "event=hub_checkpoint_corrupt" in w and "step_000750" in w and "model.safetensors" in w
        for w in warnings
    ), warnings


def test_a_stage_whose_every_checkpoint_is_corrupt_is_an_error_unless_it_may_start_over(hub, env, source):
    make_checkpoint(source, 250)
    upload(hub, env, source)
    _rot_in_storage(hub, env, f"base_checkpoints/{TAG}/step_000250/model.safetensors")
    done = phoenix(env, "restore")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stdout + done.stderr
    assert done.stderr.startswith("error: the Hub holds 1 base checkpoint(s) of MODEL_TAG=d26-hyperbolic and "
                                  "not one is intact") and len(done.stderr.splitlines()) == 1, done.stderr
    assert restore(HubConfig.from_env(env), fresh_start_ok=["base"]) == {"base": None, "sft": None}


def test_killed_restore_resumes_without_refetching_finished_files(hub, env, source) -> None:
    # http_get writes in 10 MiB blocks: b.safetensors is big enough to leave a resumable partial behind.
    ckpt = make_checkpoint(source, 250, {"a.safetensors": 2 * MiB, "b.safetensors": 12 * MiB})
    upload(hub, env, source)
    staging = volume(env) / STAGING_DIR / f"base_checkpoints/{TAG}/step_000250"
    partial = staging / "b.safetensors.incomplete"
    hub.server.throttle_bps = 6 * MiB
    proc = subprocess.Popen(PHOENIX + ["restore"], env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not (partial.is_file() and partial.stat().st_size >= 10 * MiB):
        assert proc.poll() is None and time.monotonic() < deadline, "never got a partial b.safetensors"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (staging / "a.safetensors").stat().st_size == ckpt.files["a.safetensors"]["size"]
    kept = partial.stat().st_size
    assert layout.latest(layout.stage_dir(volume(env), "base", TAG)) is None  # nothing half-published

    hub.server.throttle_bps = None
    settled = -1
    while settled != hub.server.bytes_downloaded:  # the server may still be sending into the dead socket
        settled = hub.server.bytes_downloaded
        time.sleep(0.2)
    before, log_before = hub.server.bytes_downloaded, len(hub.server.request_log)
    done = phoenix(env, "restore")
    assert done.returncode == 0, done.stdout + done.stderr
    fetched = hub.server.bytes_downloaded - before
    assert fetched <= ckpt.files["b.safetensors"]["size"] - kept + 64 * 1024
    gets = [r for r in hub.server.request_log[log_before:] if r.method == "GET" and "/resolve/" in r.path]
    assert not [r for r in gets if r.path.endswith(("a.safetensors", layout.MANIFEST_NAME))]
    assert [r.status for r in gets if r.path.endswith("b.safetensors")] == [206]
    restored = layout.verify(layout.stage_dir(volume(env), "base", TAG) / "step_000250", full_hash=True)
    for name, entry in restored.files.items():
        assert hashlib.sha256((restored.path / name).read_bytes()).hexdigest() == entry["sha256"]


@pytest.mark.parametrize("local_step", [750, 1000])
def test_volume_as_new_as_the_hub_downloads_nothing(hub, env, source, local_step) -> None:
    for step in (250, 500, 750):
        make_checkpoint(source, step)
    upload(hub, env, source)
    make_checkpoint(volume(env), local_step)
    (volume(env) / "tokenizer").mkdir()
    (volume(env) / "tokenizer" / "tokenizer.json").write_text('{"model": "bpe"}')
    layout.write_json_atomic(volume(env) / "runs" / TAG / "run.json", {"run_id": "r1", "wandb_run_id": "w1"})
    assert restore(HubConfig.from_env(env)) == {"base": local_step, "sft": None}
    assert hub.server.bytes_downloaded == 0
    assert not [r for r in hub.server.request_log if "/resolve/" in r.path]


def test_without_repo_id_restore_is_off(hub, env) -> None:
    done = phoenix({k: v for k, v in env.items() if k != "HF_REPO_ID"}, "restore")
    assert done.returncode == 0
    assert done.stdout.strip().endswith("HF_REPO_ID not set: Hub sync and restore are off")
    assert not hub.server.request_log


def test_missing_repo_means_nothing_to_restore(hub, env) -> None:
    assert restore(HubConfig.from_env(env)) == {"base": None, "sft": None}
