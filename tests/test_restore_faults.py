"""Faults around restore, in the chaos suite's manner: a Hub that cannot serve the run, restores that collide,
a stop in the middle of a download, checkpoints whose hashes match but whose content is wrong.

Real processes (tiny preset on CPU), the local Hub (throttled where a download must take a while), real
signals. A module-scoped run trains once (checkpoints at steps 4, 8 and 12, the last one final); each test
puts what it needs of it on its own Hub or volume.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from entrypoint.demo.localhub import LocalHub
from entrypoint.hub.restore import STAGING_DIR
from tests.helpers import (
    MODEL_TAG,
    checkpoint_dir,
    client_env,
    kill_tree,
    publish_corpus,
    rot_on_hub,
    run_phoenix,
    run_trainer,
    seed_volume,
    tiny_job,
)
from trainer import checkpoint_layout as layout

STEPS = 12
TRAINER_ARGS = ("--num-iterations", str(STEPS), "--save-every", "4", "--eval-every", "0")
TRAIN = ("--", *TRAINER_ARGS)
PHOENIX = [sys.executable, "-m", "entrypoint"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A volume trained to the end: tokenizer, shards, run.json, checkpoints 4, 8 and 12 (done)."""
    root = tmp_path_factory.mktemp("trained")
    with LocalHub(root / "hub") as server:
        publish_corpus(server, root / "shards")
        code, out = run_trainer(root / "volume", client_env(server, root), *TRAINER_ARGS)
    assert code == 0, out
    return root / "volume"


def put_on_hub(hub, env: dict[str, str], volume: Path, steps: list[int]) -> None:
    """The Hub as the sidecar leaves it: these base checkpoints of `volume`, its tokenizer and run file."""
    files = {"tokenizer/tokenizer.json": volume / "tokenizer" / "tokenizer.json",
             f"runs/{MODEL_TAG}/run.json": volume / "runs" / MODEL_TAG / "run.json"}
    for step in steps:
        folder = checkpoint_dir(volume) / layout.step_dir_name(step)
        files |= {f"base_checkpoints/{MODEL_TAG}/{folder.name}/{p.name}": p for p in folder.iterdir()}
    hub.server.publish(env["HF_REPO_ID"], files)


def errors(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("error: ")]


def start(env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen([*PHOENIX, *args], env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for_line(proc: subprocess.Popen, needle: str, seen: list[str]) -> None:
    for line in proc.stdout:
        seen.append(line)
        if needle in line:
            return
    raise AssertionError(f"{needle!r} never came:\n{''.join(seen)}")


def gets(hub, since: int, folder: str) -> list[str]:
    """Names of the files of `folder` on the Hub that were downloaded (GET) after request number `since`."""
    return sorted(r.path.rsplit("/", 1)[1] for r in hub.server.request_log[since:]
                  if r.method == "GET" and "/resolve/" in r.path and f"/{folder}/" in r.path)


def test_a_hub_that_cannot_serve_the_run_stops_the_launch_instead_of_starting_over(trained, hub, tmp_path):
    env, volume = tiny_job(hub, tmp_path, HF_KEEP_LAST="1")
    seed_volume(trained, volume)
    put_on_hub(hub, env, trained, [8])  # HF_KEEP_LAST=1: the Hub's only checkpoint, and it rots
    rot_on_hub(hub, env["HF_REPO_ID"], f"base_checkpoints/{MODEL_TAG}/step_000008/model.safetensors")

    code, out = run_phoenix(env, "run", *TRAIN, timeout=120)
    # A corrupt object will not heal by waiting (this launch fenced off whoever pushed it): one line, now.
    assert code == 2 and "Traceback" not in out and len(errors(out)) == 1, out
    assert "not one is intact" in errors(out)[0] and "--allow-fresh-start" in errors(out)[0]
    assert "sha256 does not match" in errors(out)[0]
    assert "fresh start" not in out and "phoenix.train" not in out
    failures = json.loads((volume / "runs" / MODEL_TAG / "failures.json").read_text())
    assert failures["count"] == 1 and failures["kind"] == "hub"  # counted by the guard, tried again if held
    assert layout.step_dirs(checkpoint_dir(volume)) == []

    # Told to, it goes on to start over as a new run: the old run's ids stay behind on the Hub.
    code, out = run_phoenix(env, "run", *TRAIN, "--allow-fresh-start",
                            kill_when=lambda line: "event=restore_done" in line)
    assert code is None and "starting the base stage over as a new run" in out and not errors(out), out
    assert not (volume / "runs" / MODEL_TAG / "run.json").exists()  # the trainer makes new ids


def test_restores_of_one_volume_take_turns_and_a_published_checkpoint_never_changes(trained, hub, tmp_path):
    env, volume = tiny_job(hub, tmp_path)
    seed_volume(trained, volume)
    put_on_hub(hub, env, trained, [8])
    # Per download: the optimizer state takes 6 s, time enough for another process to start and find the lock.
    hub.server.throttle_bps = 600_000
    folder, published = f"base_checkpoints/{MODEL_TAG}/step_000008", checkpoint_dir(volume) / "step_000008"
    procs: list[subprocess.Popen] = []
    try:
        # Two `phoenix restore` at once: the second waits for the first, then finds nothing to do.
        first, seen = start(env, "restore"), []
        procs.append(first)
        wait_for_line(first, "event=restore_start", seen)
        second = start(env, "restore")
        procs.append(second)
        out_first = "".join(seen) + first.communicate(timeout=60)[0]
        out_second = second.communicate(timeout=60)[0]
        downloaded = gets(hub, 0, folder)
        restored = layout.verify(published, full_hash=True)
        # The checkpoint lost again: `phoenix run` waits for a restore by hand, then goes on from its work...
        shutil.rmtree(published)
        again, seen = start(env, "restore"), []
        procs.append(again)
        wait_for_line(again, "event=restore_start", seen)
        run, run_seen = start(env, "run", *TRAIN), []
        procs.append(run)
        wait_for_line(run, "event=restore_skip", run_seen)
        # ...and holds the volume: a restore by hand is now one line.
        refused = subprocess.run([*PHOENIX, "restore"], env=env, capture_output=True, text=True, timeout=60)
    finally:
        for proc in procs:
            if proc.poll() is None:
                kill_tree(proc)
    out_run = "".join(run_seen)
    assert first.returncode == 0 and second.returncode == 0, out_first + out_second
    assert "event=restored stage=base step=8" in out_first
    assert "event=lock_wait" in out_second and "event=restore_skip" in out_second
    assert again.returncode == 0 and "event=lock_wait" in out_run and "event=restore_skip" in out_run
    assert refused.returncode == 2 and len(errors(refused.stderr)) == 1, refused.stdout + refused.stderr
    assert "phoenix run (pid" in refused.stderr and "stop it first" in refused.stderr
    for text in (out_first, out_second, out_run, refused.stdout + refused.stderr):
        assert "Traceback" not in text and "hub_checkpoint_corrupt" not in text, text
    # Each file came down once, and what was published is exactly the Hub's checkpoint.
    original = layout.verify(checkpoint_dir(trained) / "step_000008")
    assert downloaded == sorted([*original.files, layout.MANIFEST_NAME])
    assert restored.manifest == original.manifest


def test_two_weight_fetches_take_turns(trained, hub, tmp_path):
    env, _ = tiny_job(hub, tmp_path)
    put_on_hub(hub, env, trained, [8])
    hub.server.throttle_bps = 1_000_000
    fetch = ("import logging; logging.basicConfig(level=logging.INFO); "
             "from entrypoint.hub.config import HubConfig; from entrypoint.hub.restore import fetch_weights; "
             "print(*fetch_weights(HubConfig.from_env()))")
    chats = [subprocess.Popen([sys.executable, "-c", fetch], env={**env, "PYTHONUNBUFFERED": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [chat.communicate(timeout=90)[0] for chat in chats]
    assert [chat.returncode for chat in chats] == [0, 0], outs
    assert all("Traceback" not in out and "hub_checkpoint_corrupt" not in out for out in outs), outs
    assert sum("event=lock_wait" in out for out in outs) == 1, outs
    weights = Path(env["NANOCHAT_BASE_DIR"]) / "weights" / f"base_checkpoints/{MODEL_TAG}/step_000008"
    manifest = layout.read_manifest(weights)
    for name in ("model.safetensors", layout.META_NAME):
        assert layout.sha256_file(weights / name) == manifest["files"][name]["sha256"]
    assert gets(hub, 0, f"base_checkpoints/{MODEL_TAG}/step_000008").count("model.safetensors") == 1


def test_a_stop_during_a_restore_ends_it_at_once_and_the_next_launch_keeps_what_came(trained, hub, tmp_path):
    env, volume = tiny_job(hub, tmp_path)
    seed_volume(trained, volume)
    put_on_hub(hub, env, trained, [8])
    hub.server.throttle_bps = 200_000  # the weights take 10 s, the optimizer state 18 s; meta.json 0.1 s
    staging = volume / STAGING_DIR / f"base_checkpoints/{MODEL_TAG}/step_000008"
    stopped_at: list[float] = []

    def stop_once_the_small_files_are_in(line: str) -> bool:
        if "event=restore_start" not in line:
            return False
        deadline = time.monotonic() + 10
        while not ((staging / "meta.json").is_file() and (staging / "rng.safetensors").is_file()):
            assert time.monotonic() < deadline, "meta.json and rng.safetensors never came"
            time.sleep(0.05)
        stopped_at.append(time.monotonic())
        return True

    code, out = run_phoenix(env, "run", *TRAIN, kill_when=stop_once_the_small_files_are_in,
                            sig=signal.SIGTERM, timeout=120)
    assert code == 0 and time.monotonic() - stopped_at[0] < 5, out  # not after the whole download
    assert "Traceback" not in out and not errors(out), out
    status = json.loads((volume / "runs" / MODEL_TAG / "trainer_status.json").read_text())
    assert status["status"] == "stopped"
    kept = {p.name for p in staging.iterdir()}
    assert {layout.MANIFEST_NAME, "meta.json", "rng.safetensors"} <= kept
    assert layout.latest(checkpoint_dir(volume)) is None  # nothing half-published

    hub.server.throttle_bps = None
    before = len(hub.server.request_log)
    code, out = run_phoenix(env, "run", *TRAIN, kill_when=lambda line: "event=restored " in line)
    assert "event=restored stage=base step=8" in out, out
    fetched = gets(hub, before, f"base_checkpoints/{MODEL_TAG}/step_000008")
    assert not set(fetched) & {layout.MANIFEST_NAME, "meta.json", "rng.safetensors"}, fetched
    assert layout.verify(checkpoint_dir(volume) / "step_000008", full_hash=True)


def _rewrite(folder: Path, meta: dict | None = None, keep: tuple[str, ...] | None = None) -> None:
    """Change a checkpoint's content and hash it again, as a buggy writer would: the hashes match."""
    manifest = layout.read_manifest(folder)
    if meta is not None:
        (folder / layout.META_NAME).write_text(json.dumps(meta))
    for path in folder.iterdir():
        if keep is not None and path.name not in (*keep, layout.MANIFEST_NAME):
            path.unlink()
    (folder / layout.MANIFEST_NAME).unlink()
    fields = {k: v for k, v in manifest.items() if k not in ("format", "step", "files", "done")}
    layout.write_manifest(folder, manifest["step"], **fields)


def test_checkpoints_whose_content_is_wrong_are_quarantined_and_the_good_one_resumed(trained, hub, tmp_path):
    env, volume = tiny_job(hub, tmp_path)
    shutil.copytree(trained, volume, dirs_exist_ok=True)
    run_file = volume / "runs" / MODEL_TAG / "run.json"
    identity = json.loads(run_file.read_text())
    step8, step12 = (checkpoint_dir(volume) / layout.step_dir_name(step) for step in (8, 12))
    meta = json.loads((step8 / layout.META_NAME).read_text())
    _rewrite(step8, meta={**{k: v for k, v in meta.items() if k != "loader"}, "loop_state": []})
    _rewrite(step12, keep=(layout.META_NAME,))  # a manifest listing only meta.json, not final any more
    run_file.write_text(run_file.read_text()[:20])  # torn

    code, out = run_phoenix(env, "run", *TRAIN, kill_when=lambda line: "resuming from step=" in line)
    assert "Traceback" not in out and "resuming from step=4 " in out, out
    assert out.count("checkpoint quarantined") == 2 and out.count("file quarantined") == 1, out
    assert [step for step, _ in layout.step_dirs(checkpoint_dir(volume))] == [4]
    assert json.loads(run_file.read_text())["wandb_run_id"] == identity["wandb_run_id"]  # the same W&B run
