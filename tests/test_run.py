"""`phoenix run` as the trainer container runs it: fresh start, crash, redeploy, stop, refuse bad set-ups.

Real processes on CPU (gloo, tiny preset), the local Hub for data and checkpoints.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.helpers import (
    MODEL_TAG,
    kill_tree,
    publish_chat_dataset,
    run_phoenix,
    step_losses,
    tiny_job,
    weights_sha256,
)
from trainer import checkpoint_layout as layout
from trainer import recovery

STEPS = 30
TRAIN = ("--", "--num-iterations", str(STEPS), "--save-every", "5", "--eval-every", "15")


@pytest.fixture
def job(hub, tmp_path):
    """Environment of a tiny CPU job with Hub sync configured, and its volume."""
    return tiny_job(hub, tmp_path, HF_SYNC_INTERVAL="1")


def ckpt_dir(volume):
    return layout.stage_dir(volume, "base", MODEL_TAG)


def status(volume) -> dict:
    return json.loads((volume / "runs" / MODEL_TAG / "trainer_status.json").read_text())


def test_fresh_start_finishes_and_a_relaunch_does_not_rerun_the_stage(job):
    env, volume = job
    code, out = run_phoenix(env, "run", *TRAIN)
    assert code == 0, out
    assert layout.latest(ckpt_dir(volume)).done and status(volume)["status"] == "finished"
    assert status(volume)["generation"] == 1

    code, out = run_phoenix(env, "status", "--json")
    base = json.loads(out)["stages"]["base"]
    # 20 and 25 are not waiting: the stage is done, so the sidecar pushes only its final checkpoint.
    assert (base["local_step"], base["hub_step"], base["not_synced"]) == (STEPS, None, [STEPS])
    assert base["done"] and base["tok_per_sec"] > 0
    assert run_phoenix(env, "sync", "--once")[0] == 0
    base = json.loads(run_phoenix(env, "status", "--json")[1])["stages"]["base"]
    assert (base["hub_step"], base["not_synced"]) == (STEPS, [])

    code, out = run_phoenix(env, "run", *TRAIN)
    assert code == 0, out
    assert "base stage already finished: skipping it" in out and "torch.distributed.run" not in out
    assert status(volume)["generation"] == 1  # still the Hub's newest: a relaunch adds no Hub commit


def test_kill9_of_everything_then_relaunch_resumes_at_the_last_checkpoint(job, tmp_path):
    env, volume = job
    code, out = run_phoenix(env, "run", *TRAIN, kill_when=lambda line: "step 00013/" in line)
    assert code is None
    survivor = layout.latest(ckpt_dir(volume)).step
    assert survivor >= 5  # SIGKILL leaves no emergency checkpoint: the last published one survives
    relaunched = time.time()
    code, out = run_phoenix(env, "run", *TRAIN)
    assert code == 0, out
    assert f"resuming from step={survivor}" in out
    # The relaunch's cost, counted from `phoenix run`'s start (not the worker's, seconds later), with the
    # entrypoint's verify and prepare in its restore and data phases.
    (record,) = recovery.read(volume, MODEL_TAG)
    assert abs(record["time"] - record["launch_to_first_step_s"] - relaunched) < 0.5, record
    assert record["resumed_step"] == survivor and 12 <= record["reached_step"] <= 13
    assert record["launch_to_first_step_s"] >= record["restore_s"] + record["data_s"] > 0


def test_redeploy_on_an_empty_volume_restores_from_the_hub_and_ends_identical(job, tmp_path):
    env, volume = job
    reference = {**env, "NANOCHAT_BASE_DIR": str(tmp_path / "reference"), "HF_REPO_ID": ""}
    (tmp_path / "reference").mkdir()
    assert run_phoenix(reference, "run", *TRAIN)[0] == 0

    code, out = run_phoenix(env, "run", *TRAIN, kill_when=lambda line: "step 00017/" in line)
    assert code is None
    assert run_phoenix(env, "sync", "--once")[0] == 0  # what the sidecar did before the instance died
    pushed = layout.latest(ckpt_dir(volume)).step

    fresh = tmp_path / "new_instance_volume"
    fresh.mkdir()
    code, out = run_phoenix({**env, "NANOCHAT_BASE_DIR": str(fresh)}, "run", *TRAIN)
    assert code == 0, out
    assert f"resuming from step={pushed}" in out
    assert weights_sha256(fresh, STEPS) == weights_sha256(tmp_path / "reference", STEPS)
    assert step_losses(fresh).items() <= step_losses(tmp_path / "reference").items()


def test_second_launch_on_the_same_volume_is_refused_by_the_lock(job):
    env, volume = job
    first = subprocess.Popen([sys.executable, "-m", "entrypoint", "run", *TRAIN], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in first.stdout:
            if "phoenix.train" in line:  # the first one holds the lock and is training
                break
        code, out = run_phoenix(env, "run", *TRAIN)
        assert code == 2
        assert "another phoenix run is training this MODEL_TAG on this volume (pid" in out
    finally:
        kill_tree(first)
    # Its holders died: the kernel released the flock, so the next launch takes it.
    code, out = run_phoenix(env, "run", *TRAIN)
    assert code == 0, out


def test_sigterm_writes_an_emergency_checkpoint_and_the_relaunch_continues(job):
    env, volume = job
    code, out = run_phoenix(env, "run", *TRAIN, kill_when=lambda line: "step 00008/" in line,
                            sig=signal.SIGTERM)
    assert code == 0, out  # docker stop: exit 0, so restart: on-failure does not loop
    assert "emergency checkpoint published" in out
    stopped_at = layout.latest(ckpt_dir(volume)).step
    assert stopped_at >= 8 and not layout.latest(ckpt_dir(volume)).done
    assert status(volume)["status"] == "stopped"
    code, out = run_phoenix(env, "run", *TRAIN)
    assert code == 0, out
    assert f"resuming from step={stopped_at}" in out and layout.latest(ckpt_dir(volume)).done


def test_two_nodes_of_one_process_rendezvous_over_c10d(job):
    env, volume = job
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    nodes = {**env, "NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
             "NPROC_PER_NODE": "1"}
    second = subprocess.Popen([sys.executable, "-m", "entrypoint", "run", *TRAIN],
                              env={**nodes, "NODE_RANK": "1"}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        code, out = run_phoenix(nodes, "run", *TRAIN)
        second_out, _ = second.communicate(timeout=120)
    finally:
        if second.poll() is None:
            kill_tree(second)
    assert code == 0, out
    assert second.returncode == 0, second_out
    assert "--nnodes=2" in out and "--nnodes=2" in second_out
    assert "world_size=2" in out + second_out  # c10d hands global rank 0 to whichever node joined first
    assert layout.latest(ckpt_dir(volume)).done


@pytest.mark.parametrize("change,message", [
    ({"NANOCHAT_BASE_DIR": "/nonexistent/volume"}, "NANOCHAT_BASE_DIR=/nonexistent/volume does not exist"),
    ({"HF_TOKEN": ""}, "HF_TOKEN is not: add a write token"),
    ({"HF_TOKEN": "hf_NotAValidTokenAtAll123"}, "the Hub rejected HF_TOKEN (401)"),
    ({"HF_REPO_ID": "someone-else/checkpoints"}, "cannot write to someone-else/checkpoints"),
    ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "cannot reach the Hub (ConnectError) and the volume has no"),
    ({"PRESET": "d99"}, "PRESET=d99 is unknown"),
    ({"DEVICE": "auto", "PRESET": "d26", "CUDA_VISIBLE_DEVICES": ""}, "no GPU visible for PRESET=d26"),
    ({"DEVICE": "cuda", "CUDA_VISIBLE_DEVICES": "0,1", "NPROC_PER_NODE": "8"},
     "NPROC_PER_NODE=8 but only 2 GPUs are visible"),
    ({"WANDB_RUN": "r1", "WANDB_MODE": "online", "WANDB_API_KEY": ""}, "WANDB_API_KEY is not set"),
    ({"WANDB_RUN": "r1", "WANDB_MODE": "online", "WANDB_API_KEY": "mistyped"}, "is not a W&B API key"),
    ({"NNODES": "2", "NODE_RANK": "5"}, "NODE_RANK=5 is outside 0..1"),
])
def test_each_preflight_problem_is_one_line_before_anything_starts(job, change, message):
    env, volume = job
    code, out = run_phoenix({**env, **change}, "run", *TRAIN)
    assert code == 2, out
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], out
    assert "Traceback" not in out and "torch.distributed.run" not in out
    assert not (volume / "tokenizer").exists()  # nothing downloaded or trained
    if "HF_TOKEN" in change:
        assert change["HF_TOKEN"] == "" or change["HF_TOKEN"] not in out


def test_full_or_read_only_volume_is_refused(job, tmp_path):
    env, _ = job
    for options, message in (("size=1m", "two checkpoints need"), ("ro,size=64m", "is not writable")):
        mount = tmp_path / options.replace(",", "_").replace("=", "")
        mount.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)],
                              capture_output=True, text=True)
        assert done.returncode == 0, f"this test needs root to mount a tmpfs: {done.stderr}"
        try:
            code, out = run_phoenix({**env, "NANOCHAT_BASE_DIR": str(mount)}, "run", *TRAIN)
        finally:
            subprocess.run(["umount", "-l", str(mount)], check=False)
        assert code == 2 and message in out, out


def test_base_then_sft_resumes_after_a_kill_and_neither_stage_reruns(job, hub):
    env, volume = job
    publish_chat_dataset(hub.server)
    env = {**env, "RUN_SFT": "1", "SFT_ARGS": "--num-iterations 12 --save-every 4 --eval-every 0"}
    code, out = run_phoenix(env, "run", *TRAIN, kill_when=lambda line: "step 00006/00012" in line)
    assert code is None  # killed during SFT, after base finished
    assert layout.latest(ckpt_dir(volume)).done
    sft_dir = layout.stage_dir(volume, "sft", MODEL_TAG)
    assert layout.latest(sft_dir).step == 4

    code, out = run_phoenix(env, "run", *TRAIN)
    assert code == 0, out
    assert "base stage already finished: skipping it" in out and "resuming from step=4" in out
    assert layout.latest(sft_dir).done and status(volume)["status"] == "finished"

    code, out = run_phoenix(env, "run", *TRAIN)
    assert code == 0, out
    assert "base stage already finished" in out and "sft stage already finished" in out
    assert "torch.distributed.run" not in out


def test_doctor_passes_a_good_setup_and_flags_a_volume_that_dies_with_the_instance(job, tmp_path):
    env, volume = job
    code, out = run_phoenix(env, "doctor")
    assert code == 0 and "ok: volume, GPUs, Hub and W&B settings look right" in out, out

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(scratch)],
                             capture_output=True, text=True)
    assert mounted.returncode == 0, f"this test needs root to mount a tmpfs: {mounted.stderr}"
    try:
        code, out = run_phoenix({**env, "NANOCHAT_BASE_DIR": str(scratch)}, "doctor")
    finally:
        subprocess.run(["umount", "-l", str(scratch)], check=False)
    assert code == 2
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"NANOCHAT_BASE_DIR={scratch} is on tmpfs" in errors[0], out


def test_health_follows_the_status_file_and_the_training_heartbeat(tmp_path):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path), "MODEL_TAG": MODEL_TAG}
    runs, logs = tmp_path / "runs" / MODEL_TAG, tmp_path / "logs"
    assert run_phoenix(env, "health")[0] == 1  # no status yet: still starting
    now = time.time()

    def write(status, heartbeat_age=None):
        layout.write_json_atomic(runs / "trainer_status.json", {"updated": now, "generation": 1, **status})
        if heartbeat_age is not None:
            layout.write_json_atomic(logs / f"heartbeat_{MODEL_TAG}.json", {"time": now - heartbeat_age})

    write({"status": "running", "phase": "restore", "phase_started": now - 5000})
    assert run_phoenix(env, "health")[0] == 0  # restoring: the entrypoint is alive, that is enough
    write({"status": "running", "phase": "base", "phase_started": now - 5000}, heartbeat_age=20)
    assert run_phoenix(env, "health")[0] == 0
    write({"status": "running", "phase": "base", "phase_started": now - 5000}, heartbeat_age=2000)
    code, out = run_phoenix(env, "health")
    assert code == 1 and "unhealthy: phase base silent for" in out  # a hung step: no heartbeat
    write({"status": "running", "phase": "base", "phase_started": now - 60}, heartbeat_age=2000)
    assert run_phoenix(env, "health")[0] == 0  # a new stage start: compile and first step take a while
    write({"status": "finished", "phase": "done", "phase_started": now - 5000}, heartbeat_age=9000)
    assert run_phoenix(env, "health")[0] == 0
