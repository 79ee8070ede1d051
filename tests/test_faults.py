"""Faults that used to trap `phoenix run` in a loop: each now ends in progress or in one clear stop.

Real processes (tiny preset on CPU), the local Hub, real signals, a real full disk and a folder the run
cannot write into.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from tests.helpers import (
    MODEL_TAG,
    publish_chat_dataset,
    publish_corpus,
    run_phoenix,
    weights_sha256,
)
from trainer import checkpoint_layout as layout

STEPS = 20
TRAIN = ("--", "--num-iterations", str(STEPS), "--save-every", "5", "--eval-every", "0")


@pytest.fixture
def job(hub, tmp_path):
    publish_corpus(hub.server, tmp_path / "shards")
    volume = tmp_path / "volume"
    volume.mkdir()
    env = {**hub.env, "NANOCHAT_BASE_DIR": str(volume), "MODEL_TAG": MODEL_TAG, "PRESET": "tiny",
           "DEVICE": "cpu", "RUN_SFT": "0", "HF_REPO_ID": f"{hub.user}/checkpoints", "WANDB_MODE": "offline"}
    return env, volume


def ckpt_dir(volume, stage="base"):
    return layout.stage_dir(volume, stage, MODEL_TAG)


def status(volume) -> dict:
    return json.loads((volume / "runs" / MODEL_TAG / "trainer_status.json").read_text())


def errors(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("error: ")]


def flip_a_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def hub_commits(hub) -> int:
    return sum(r.method == "POST" and r.path.endswith("/commit/main") and r.status == 200
               for r in hub.server.request_log)


def test_damaged_checkpoints_are_quarantined_and_saved_again(job, tmp_path):
    env, volume = job
    reference = tmp_path / "reference"
    reference.mkdir()
    assert run_phoenix({**env, "NANOCHAT_BASE_DIR": str(reference), "HF_REPO_ID": ""}, "run", *TRAIN)[0] == 0

    code, _ = run_phoenix(env, "run", *TRAIN, kill_when=lambda line: "step 00012/" in line)
    assert code is None
    newest = layout.latest(ckpt_dir(volume))
    assert newest.step == 10  # a step the relaunch will save again
    flip_a_byte(newest.path / "model.safetensors")  # sizes right, sha256 wrong: bit rot
    code, out = run_phoenix(env, "run", *TRAIN)
    assert code == 0, out
    assert "checkpoint quarantined" in out and "resuming from step=5" in out

    final = layout.latest(ckpt_dir(volume))
    assert final.done and final.step == STEPS
    flip_a_byte(final.path / "optimizer.safetensors")  # the done checkpoint itself
    code, out = run_phoenix(env, "run", *TRAIN)
    assert code == 0, out
    assert "resuming from step=15" in out and layout.latest(ckpt_dir(volume)).done
    assert weights_sha256(volume, STEPS) == weights_sha256(reference, STEPS)
    quarantine = volume / "quarantine" / "base_checkpoints" / MODEL_TAG
    kept = sorted(path.name.split(".")[0] for path in quarantine.iterdir())
    assert kept == ["step_000010", "step_000020"]  # moved aside, never deleted


def test_an_empty_volume_waits_for_the_hub_instead_of_starting_over(job, tmp_path, hub):
    env, volume = job
    code, _ = run_phoenix(env, "run", *TRAIN, kill_when=lambda line: "step 00012/" in line)
    assert code is None
    assert run_phoenix(env, "sync", "--once")[0] == 0  # the Hub holds step 10 of this run
    run_file = (volume / "runs" / MODEL_TAG / "run.json").read_text()

    fresh = tmp_path / "redeploy"
    fresh.mkdir()
    # Checkpoint downloads answer 503 for two restore attempts (4 tries each): an outage, then recovery.
    hub.server.fail_next(8, status=503, path_contains="/base_checkpoints/")
    code, out = run_phoenix({**env, "NANOCHAT_BASE_DIR": str(fresh)}, "run", *TRAIN)
    assert code == 0, out
    assert "event=hub_wait" in out and "retry_in_s=" in out
    assert "fresh start" not in out and "resuming from step=10" in out
    assert "checkpoint published step=5 " not in out  # nothing below the Hub's step was ever written
    assert (fresh / "runs" / MODEL_TAG / "run.json").read_text() == run_file  # the same run, not a new one


def test_permanent_errors_are_one_line_and_relaunches_do_not_loop(job, hub, tmp_path):
    env, volume = job
    code, out = run_phoenix(env, "run", *TRAIN, kill_when=lambda line: "step 00007/" in line,
                            sig=signal.SIGTERM)
    assert code == 0 and layout.latest(ckpt_dir(volume)).step >= 7, out

    def launch(change: dict[str, str], *args: str) -> tuple[int, str, int]:
        before = hub_commits(hub)
        code, out = run_phoenix({**env, **change}, "run", *(args or TRAIN), timeout=60)
        assert "Traceback" not in out and len(errors(out)) == 1, out
        assert hub_commits(hub) - before <= 1
        return code, errors(out)[0], hub_commits(hub) - before

    # A changed PRESET, five launches in a row: refused before torchrun; the third trips the guard, which
    # exits 0 (restart: on-failure stops) and later launches refuse at once, with no Hub commit.
    outcomes = [launch({"PRESET": "d20"}) for _ in range(5)]
    assert [code for code, _, _ in outcomes] == [2, 2, 0, 0, 0]
    assert all("was trained with PRESET=tiny" in line for _, line, _ in outcomes)
    assert "not relaunching" in outcomes[-1][1] and sum(c for _, _, c in outcomes) == 0
    failures = json.loads((volume / "runs" / MODEL_TAG / "failures.json").read_text())
    assert failures["held"] and failures["count"] == 3
    code, out = run_phoenix({**env, "PRESET": "d20"}, "health")
    assert code == 1 and "not relaunching after 3 identical failures" in out
    code, out = run_phoenix(env, "status", "--json", "--no-hub")
    assert json.loads(out)["failures"]["count"] == 3

    # Each of these changes the settings, so the guard lets it through to its own one line.
    code, line, _ = launch({}, "--", "--num-iterations", str(STEPS), "--total-batch-size", "2048")
    assert code == 2 and "total_batch_size=1024" in line
    code, line, _ = launch({"RUN_SFT": "1", "SFT_DATASET": "nobody/no-such-chats"},
                           "--", "--num-iterations", "12", "--save-every", "5", "--eval-every", "0")
    assert code == 2 and "nobody/no-such-chats" in line  # base finished first, then SFT could not start

    # A checkpoint folder the run cannot write into (root-owned on a real box; immutable here, as we are
    # root): found by preflight, not at the first save.
    folder = ckpt_dir(volume)
    subprocess.run(["chattr", "+i", str(folder)], check=True)
    try:
        code, line, commits = launch({"KEEP_LAST": "2"})
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    assert code == 2 and f"{folder} is not writable" in line and commits == 0


def test_a_full_disk_during_restore_is_one_line(job, hub, tmp_path):
    env, volume = job
    code, _ = run_phoenix(env, "run", "--", "--num-iterations", "5", "--save-every", "5", "--eval-every", "0")
    assert code == 0 and run_phoenix(env, "sync", "--once")[0] == 0
    # Room for two checkpoints (what preflight asks for, with its estimate for an empty volume) and a bit.
    need_kib = 2 * max(layout.latest(ckpt_dir(volume)).total_bytes, 4_000_000) // 1024 + 1024
    mount = tmp_path / "small_disk"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={need_kib}k", "tmpfs", str(mount)],
                             capture_output=True, text=True)
    assert mounted.returncode == 0, f"this test needs root to mount a small tmpfs: {mounted.stderr}"
    hub.server.throttle_bps = 2_000_000

    def fill_the_disk(line: str) -> bool:
        if "event=restore_start" in line:  # preflight saw enough room; now something else takes it
            with open(mount / "filler", "wb") as f:
                while True:
                    try:
                        f.write(b"\0" * 65536)
                    except OSError:
                        break
        return False

    try:
        code, out = run_phoenix({**env, "NANOCHAT_BASE_DIR": str(mount)}, "run", *TRAIN,
                                kill_when=fill_the_disk, timeout=60)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
    assert code == 2, out
    assert "Traceback" not in out and len(errors(out)) == 1, out
    assert "restoring from the Hub" in errors(out)[0] and "No space left on device" in errors(out)[0]


def test_a_stop_during_the_sft_download_or_torchrun_start_ends_stopped_and_resumes(job, hub):
    env, volume = job
    publish_chat_dataset(hub.server)
    env = {**env, "RUN_SFT": "1", "SFT_ARGS": "--num-iterations 6 --save-every 3 --eval-every 0"}
    assert run_phoenix({**env, "RUN_SFT": "0"}, "run", "--", "--num-iterations", "5", "--save-every", "5",
                       "--eval-every", "0")[0] == 0

    hub.server.throttle_bps = 1000  # the SFT dataset download now takes minutes
    start = time.monotonic()
    code, out = run_phoenix(env, "run", kill_when=lambda line: "entrypoint.prepare sft" in line,
                            sig=signal.SIGTERM, timeout=90)
    assert code == 0 and time.monotonic() - start < 60, out
    assert status(volume)["status"] == "stopped" and "torch.distributed.run" not in out
    hub.server.throttle_bps = None

    def half_a_second_after_torchrun_starts(line: str) -> bool:
        if "launch" in line and "torch.distributed.run" in line:
            time.sleep(0.5)
            return True
        return False

    start = time.monotonic()
    code, out = run_phoenix(env, "run", kill_when=half_a_second_after_torchrun_starts, sig=signal.SIGTERM,
                            timeout=90)
    assert code == 0 and time.monotonic() - start < 60, out
    assert status(volume)["status"] == "stopped"
    code, out = run_phoenix(env, "run")
    assert code == 0, out
    assert layout.latest(ckpt_dir(volume, "sft")).done and status(volume)["status"] == "finished"
