"""Faults that used to trap `phoenix run` in a loop: each now ends in progress or in one clear stop.

Real processes (tiny preset on CPU), the local Hub, real signals, a real full disk and a folder the run
cannot write into.
"""

from __future__ import annotations

import json
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import suppress
from pathlib import Path

import pytest
from huggingface_hub import HfApi

from tests.helpers import (
    MODEL_TAG,
    fill,
    kill_tree,
    publish_chat_dataset,
    run_phoenix,
    run_process,
    small_tmpfs,
    tiny_job,
    weights_sha256,
)
from trainer import checkpoint_layout as layout
from trainer import fencing

STEPS = 20
TRAIN = ("--", "--num-iterations", str(STEPS), "--save-every", "5", "--eval-every", "0")


@pytest.fixture
def job(hub, tmp_path):
    return tiny_job(hub, tmp_path)


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


def test_damaged_checkpoints_are_quarantined_and_saved_again(job):
    env, volume = job
    assert run_phoenix(env, "run", *TRAIN)[0] == 0
    uninterrupted = weights_sha256(volume, STEPS)
    final = layout.latest(ckpt_dir(volume))
    assert final.done and final.step == STEPS
    # Sizes right, sha256 wrong (bit rot): the done checkpoint, and the one below it, which the rerun of
    # the last steps will save again.
    flip_a_byte(final.path / "optimizer-00000-of-00001.safetensors")
    flip_a_byte(ckpt_dir(volume) / layout.step_dir_name(STEPS - 5) / "model.safetensors")
    code, out = run_phoenix(env, "run", *TRAIN)
    assert code == 0, out
    assert out.count("checkpoint quarantined") == 2 and f"resuming from step={STEPS - 10}" in out
    assert layout.latest(ckpt_dir(volume)).done and weights_sha256(volume, STEPS) == uninterrupted
    quarantine = volume / "quarantine" / "base_checkpoints" / MODEL_TAG
    kept = sorted(path.name.split(".")[0] for path in quarantine.iterdir())
    assert kept == [layout.step_dir_name(STEPS - 5), layout.step_dir_name(STEPS)]  # moved aside, not deleted


def test_an_empty_volume_waits_for_the_hub_instead_of_starting_over(job, tmp_path, hub):
    env, volume = job
    # In the git repo, whose downloads phoenix retries itself (a bucket's are retried inside the client too).
    env = env | {"HF_CHECKPOINT_STORE": "repo"}
    code, _ = run_phoenix(env, "run", *TRAIN, kill_when=lambda line: "step 00012/" in line)
    assert code is None
    assert run_phoenix(env, "sync", "--once")[0] == 0
    # The Hub holds the volume's latest complete checkpoint: step 10, or step 5 when the kill landed while a
    # loaded machine was still writing step 10 in the background.
    on_hub = layout.latest(layout.stage_dir(volume, "base", MODEL_TAG), full_hash=True).step
    run_file = (volume / "runs" / MODEL_TAG / "run.json").read_text()

    fresh = tmp_path / "redeploy"
    fresh.mkdir()
    # A rate-limited whoami, a generation claim and checkpoint downloads answering 503 for longer than
    # their retries (4 tries each): an outage, then recovery.
    hub.server.fail_next(1, status=429, path_contains="whoami")
    hub.server.fail_next(4, status=503, path_contains="/commit/main", method="POST")
    hub.server.fail_next(5, status=503, path_contains="/base_checkpoints/")
    code, out = run_phoenix({**env, "NANOCHAT_BASE_DIR": str(fresh)}, "run", *TRAIN)
    assert code == 0, out
    assert "whoami answered 429: retry 1/4" in out
    assert "event=generation_claim_failed" in out and status(fresh)["generation"] == 2  # landed later
    assert "event=hub_wait" in out and "retry_in_s=" in out
    assert "fresh start" not in out and f"resuming from step={on_hub}" in out
    assert "checkpoint published step=5 " not in out  # nothing at or below the Hub's step was written again
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

    # A changed PRESET, four launches in a row: refused before torchrun; the third trips the guard, which
    # exits 0 (restart: on-failure stops) and a later launch refuses at once, with no Hub commit.
    outcomes = [launch({"PRESET": "d20"}) for _ in range(4)]
    assert [code for code, _, _ in outcomes] == [2, 2, 0, 0]
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

    tokenizer = volume / "tokenizer" / "tokenizer.json"
    original = tokenizer.read_text()
    tokenizer.write_text(json.dumps(json.loads(original), indent=2))  # another file, same vocab size
    code, line, _ = launch({"KEEP_LAST": "4"})
    tokenizer.write_text(original)
    assert code == 2 and "was trained with another tokenizer" in line

    # A checkpoint folder the run cannot write into (root-owned on a real box; immutable here, as we are
    # root): found by preflight, not at the first save.
    folder = ckpt_dir(volume)
    subprocess.run(["chattr", "+i", str(folder)], check=True)
    try:
        code, line, commits = launch({"KEEP_LAST": "2"})
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    assert code == 2 and f"{folder} is not writable" in line and commits == 0

    # Fenced (the sidecar saw a newer launch elsewhere): the trainer stops at its next checkpoint and the
    # launch exits 0, since a relaunch here would take the run back.
    fencing.write_marker(volume, MODEL_TAG, generation=1, claim={"generation": 2, "host": "elsewhere"})
    code, line, _ = launch({})
    assert code == 0 and "fenced: generation 1 was taken over by generation 2" in line
    assert status(volume)["status"] == "fenced"


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


def test_bad_sft_data_is_one_line_and_a_stop_before_the_workers_still_stops(job, hub):
    env, volume = job
    publish_chat_dataset(hub.server)
    env = {**env, "RUN_SFT": "1", "SFT_ARGS": "--num-iterations 6 --save-every 3 --eval-every 0"}
    assert run_phoenix({**env, "RUN_SFT": "0"}, "run", "--", "--num-iterations", "5", "--save-every", "5",
                       "--eval-every", "0")[0] == 0

    # A dataset that does not exist, named after a secret: the worker side's error line is masked too.
    secret = "wandb0123456789abcdef"
    code, out = run_phoenix({**env, "SFT_DATASET": f"nobody/{secret}", "WANDB_API_KEY": secret}, "run",
                            timeout=60)
    assert code == 2 and "Traceback" not in out, out
    assert len(errors(out)) == 1 and "SFT dataset 'nobody/***' not found" in errors(out)[0]
    assert secret not in out and secret not in (volume / "logs" / "phoenix_run.log").read_text()

    hub.server.throttle_bps = 1000  # the SFT dataset download now takes minutes
    start = time.monotonic()
    code, out = run_phoenix(env, "run", kill_when=lambda line: "entrypoint.launch.prepare sft" in line,
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
    publish_chat_dataset(hub.server, count=300)  # the dataset moves on; the run keeps its pinned revision
    code, out = run_phoenix(env, "run")
    assert code == 0, out
    assert layout.latest(ckpt_dir(volume, "sft")).done and status(volume)["status"] == "finished"
    assert "conversations=200" in out


def test_a_stop_on_one_node_stops_both_and_both_resume(job, tmp_path):
    env, volume = job
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    nodes = {**env, "NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
             "NPROC_PER_NODE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

    def launch_both(stop_node1_at: str | None) -> list[tuple[int, str]]:
        procs = [subprocess.Popen([sys.executable, "-m", "entrypoint", "run", *TRAIN],
                                  env={**nodes, "NODE_RANK": str(rank)}, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
        outputs: list[list[str]] = [[], []]
        readers = [threading.Thread(target=lambda p=p, o=o: o.extend(p.stdout), daemon=True)
                   for p, o in zip(procs, outputs, strict=True)]
        for reader in readers:
            reader.start()
        try:
            deadline = time.monotonic() + 180
            while stop_node1_at and not any(stop_node1_at in line for o in outputs for line in list(o)):
                assert time.monotonic() < deadline and procs[1].poll() is None, "".join(outputs[1])
                time.sleep(0.05)
            if stop_node1_at:
                procs[1].send_signal(signal.SIGTERM)  # docker compose stop on node 1 only
            for proc in procs:
                proc.wait(timeout=120)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    kill_tree(proc)
        for reader in readers:
            reader.join()
        return [(proc.returncode, "".join(out)) for proc, out in zip(procs, outputs, strict=True)]

    (code0, out0), (code1, out1) = launch_both(stop_node1_at="step 00008/")
    assert code0 == 0 and code1 == 0, out0 + out1
    stopped = layout.latest(ckpt_dir(volume))
    assert not stopped.done and stopped.meta()["stopped"] and stopped.step >= 8
    runs = volume / "runs" / MODEL_TAG
    assert json.loads((runs / "trainer_status.json").read_text())["status"] == "stopped"
    assert json.loads((runs / "trainer_status.node1.json").read_text())["status"] == "stopped"

    (code0, out0), (code1, out1) = launch_both(stop_node1_at=None)
    assert code0 == 0 and code1 == 0, out0 + out1
    assert f"resuming from step={stopped.step}" in out0 + out1 and layout.latest(ckpt_dir(volume)).done

    # The same second node on a folder that is not node 0's: refused in one line.
    alone = tmp_path / "not_shared"
    alone.mkdir()
    code, out = run_phoenix({**nodes, "NODE_RANK": "1", "NANOCHAT_BASE_DIR": str(alone),
                             "PHOENIX_SHARED_WAIT_S": "3"}, "run", *TRAIN, timeout=60)
    assert code == 2 and len(errors(out)) == 1 and "is not shared with node 0" in errors(out)[0], out


def test_secrets_stay_out_of_outputs_files_status_and_command_lines(job, hub):
    env, volume = job
    hf_token, wandb_key = "hf_" + secrets.token_hex(17), secrets.token_hex(20)  # shaped like real ones
    hub.server.add_token(hf_token, hub.user)
    env = {**env, "HF_TOKEN": hf_token, "WANDB_API_KEY": wandb_key, "WANDB_RUN": "secrets"}
    leaked_argv: list[str] = []

    def scan_command_lines(_line: str) -> bool:
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            with suppress(OSError):
                if any(s.encode() in cmdline.read_bytes() for s in (hf_token, wandb_key)):
                    leaked_argv.append(str(cmdline))
        return False

    hub.server.fail_next(1, status=429, path_contains="whoami", retry_after=1)
    hub.server.fail_next(1, status=503, path_contains="/commit/main")  # the generation claim
    code, out = run_phoenix(env, "run", *TRAIN, kill_when=scan_command_lines)
    assert code == 0, out
    outputs = [out]
    # The sidecar meets a storage refusal, then a 5xx, then pushes; a truncated local tokenizer is never
    # pushed over the Hub's good one.
    hub.server.fail_next(1, status=403, path_contains="xet-write-token")
    hub.server.fail_next(1, status=502, path_contains="/preupload/")
    for _ in range(3):
        outputs.append(run_phoenix(env, "sync", "--once", kill_when=scan_command_lines)[1])
    tokenizer = volume / "tokenizer" / "tokenizer.json"
    on_hub = HfApi(endpoint=hub.url, token=hf_token).hf_hub_download(
        env["HF_REPO_ID"], "tokenizer/tokenizer.json", cache_dir=str(volume.parent / "check"))
    tokenizer.write_bytes(tokenizer.read_bytes()[:100])
    code, synced = run_phoenix(env, "sync", "--once")
    outputs.append(synced)
    assert "event=skip_bad_file" in synced
    fresh = HfApi(endpoint=hub.url, token=hf_token).hf_hub_download(
        env["HF_REPO_ID"], "tokenizer/tokenizer.json", cache_dir=str(volume.parent / "check2"))
    assert Path(fresh).read_bytes() == Path(on_hub).read_bytes()
    # A token the Hub rejects (401) is one line naming HF_TOKEN, not the token.
    bad = "hf_" + secrets.token_hex(17)
    code, rejected = run_phoenix({**env, "HF_TOKEN": bad}, "run", *TRAIN)
    assert code == 2 and errors(rejected) and "HF_TOKEN" in errors(rejected)[0], rejected
    outputs += [rejected, run_phoenix(env, "status", "--json")[1]]

    assert not leaked_argv
    for text in outputs:
        assert all(s not in text for s in (hf_token, wandb_key, bad))
    for path in volume.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert all(s.encode() not in data for s in (hf_token, wandb_key, bad)), path


def test_a_full_log_disk_never_stops_training_or_a_stop(job, tmp_path):
    """logs/phoenix_run.log cannot grow: on a full disk (ENOSPC), then past the file size limit (EFBIG).
    The workers' output must keep flowing to stdout, a stop must still end in an emergency checkpoint."""
    env, volume = job
    logs = volume / "logs"
    logs.mkdir()
    with small_tmpfs(tmp_path / "full_disk", "64k") as full:
        fill(full)
        (logs / "phoenix_run.log").symlink_to(full / "filler")  # only the log is on the full disk
        code, out = run_phoenix(env, "run", *TRAIN, kill_when=lambda line: "step 00012/" in line,
                                sig=signal.SIGTERM, timeout=120)
    assert code == 0, out
    assert "Traceback" not in out and "Logging error" not in out, out
    assert out.count("event=log_file_failed") == 1 and "No space left on device" in out
    stopped = layout.latest(ckpt_dir(volume))
    assert stopped.meta()["stopped"] and not stopped.done and stopped.step >= 12
    assert status(volume)["status"] == "stopped"

    # Past RLIMIT_FSIZE (a sparse 64 MiB log, the limit at its end): every write fails with EFBIG, and
    # the processes ignore SIGXFSZ as Python does. The relaunch resumes and finishes.
    (logs / "phoenix_run.log").unlink()
    limit = 64 * 2**20
    with open(logs / "phoenix_run.log", "wb") as f:
        f.truncate(limit)
    command = ["prlimit", f"--fsize={limit}", sys.executable, "-m", "entrypoint", "run", *TRAIN]
    code, out = run_process(command, env, timeout=120)
    assert code == 0, out
    assert "Traceback" not in out and out.count("event=log_file_failed") == 1 and "File too large" in out
    assert f"resuming from step={stopped.step}" in out and f"step {STEPS:05d}/" in out
    assert layout.latest(ckpt_dir(volume)).done and (logs / "phoenix_run.log").stat().st_size == limit


def test_a_sigterm_storm_during_prepare_ends_as_a_stop(job, hub):
    """docker stop (and a supervisor that repeats it) while the data is still downloading."""
    env, volume = job
    hub.server.throttle_bps = 20_000  # the shards take a while
    proc = subprocess.Popen([sys.executable, "-m", "entrypoint", "run", *TRAIN],
                            env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out = []
    for line in proc.stdout:
        out.append(line)
        if "entrypoint.launch.prepare base" in line:
            break

    def storm() -> None:
        while proc.poll() is None:
            with suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            time.sleep(0.001)

    stormer = threading.Thread(target=storm)
    stormer.start()
    out += proc.stdout.readlines()
    proc.wait(timeout=60)
    stormer.join()
    assert proc.returncode == 0, "".join(out)
    assert "Traceback" not in "".join(out) and status(volume)["status"] == "stopped"
