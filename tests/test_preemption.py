"""A cloud's preemption notice: each cloud's wording against a fake metadata server on loopback, the
sidecar pushing at once, and `phoenix run` stopping at start-up, during a restore and mid-run with an
exact resume afterwards.

The fake server (`entrypoint.demo.fake_metadata`) answers as AWS, GCP or Azure document; no test ever
calls a real metadata address (conftest sets PREEMPTION_WATCH=off for everything else).
"""

from __future__ import annotations

import json
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from entrypoint.demo.fake_metadata import FakeMetadata
from entrypoint.launch.clouds import (
    AZURE_ASSET_TAG,
    PREEMPTION,
    WARNING,
    AwsMetadata,
    AzureMetadata,
    GcpMetadata,
    MetadataUnavailable,
    Notice,
    detect_cloud,
)
from entrypoint.launch.config import RunConfig
from entrypoint.launch.preemption import notice_path, read_notice, start_watch
from entrypoint.launch.preflight import preflight
from tests.helpers import (
    MODEL_TAG,
    kill_tree,
    run_phoenix,
    run_trainer,
    seed_volume,
    step_losses,
    tiny_job,
    weights_sha256,
)
from tests.test_sync import PHOENIX, TAG, base_dir, hub_steps, make_checkpoint, sidecar_env, wait_for
from trainer import checkpoint_layout as layout

STEPS = 20
TRAIN = ("--", "--num-iterations", str(STEPS), "--save-every", "5", "--eval-every", "0")

# --- each cloud's wording ---------------------------------------------------------------------------


@pytest.mark.parametrize("files,cloud", [
    ({"sys_vendor": "Amazon EC2", "product_name": "p5.48xlarge", "bios_vendor": "Amazon EC2"}, "aws"),
    ({"sys_vendor": "Xen", "bios_version": "4.11.amazon"}, "aws"),  # older Xen instances
    ({"sys_vendor": "Google", "product_name": "Google Compute Engine", "bios_vendor": "Google"}, "gcp"),
    ({"sys_vendor": "Microsoft Corporation", "product_name": "Virtual Machine",
      "chassis_asset_tag": AZURE_ASSET_TAG}, "azure"),
    ({"sys_vendor": "Microsoft Corporation", "product_name": "Virtual Machine"}, None),  # Hyper-V at home
    ({"sys_vendor": "Dell Inc.", "product_name": "PowerEdge R750"}, None),
    ({}, None),  # no DMI at all (some containers)
])
def test_the_cloud_is_found_from_dmi_without_the_network(tmp_path, files, cloud):
    for name, text in files.items():
        (tmp_path / name).write_text(text + "\n")
    assert detect_cloud(tmp_path) == cloud


def test_aws_imdsv2_token_then_404_then_the_notice_and_a_new_token_after_401():
    with FakeMetadata("aws") as fake:
        aws = AwsMetadata(fake.url)
        assert aws.check() is None
        methods = [(method, path) for method, path, _ in fake.requests]
        assert methods == [("PUT", "/latest/api/token"), ("GET", "/latest/meta-data/spot/instance-action"),
                           ("GET", "/latest/meta-data/events/recommendations/rebalance")]
        assert fake.requests[0][2]["x-aws-ec2-metadata-token-ttl-seconds"] == "21600"
        assert fake.requests[1][2]["x-aws-ec2-metadata-token"]  # IMDSv2: every GET carries the token

        fake.warn()  # the rebalance recommendation comes first, and is no notice
        warning = aws.check()
        assert (warning.kind, warning.event, warning.deadline) == (WARNING, "rebalance", None)
        fake.expire_tokens()
        fake.announce(seconds=120, event="stop")
        notice = aws.check()
        assert (notice.kind, notice.event) == (PREEMPTION, "stop")
        assert 100 < notice.seconds_left() <= 120  # "time" is whole seconds, in UTC
        assert sum(method == "PUT" for method, _, _ in fake.requests) == 2  # 401 -> one new token


def test_gcp_false_then_a_waiting_request_returns_the_moment_preempted_turns_true():
    with FakeMetadata("gcp") as fake:
        gcp = GcpMetadata(fake.url, wait_s=30)
        assert gcp.check() is None  # FALSE, and its ETag for the next, waiting request
        threading.Timer(0.5, fake.announce).start()
        started = time.monotonic()
        notice = gcp.check()
        assert time.monotonic() - started < 10  # woken by the change, not by the 30 s timeout
        assert (notice.source, notice.kind, notice.event) == ("gcp", PREEMPTION, "preempted")
        assert 25 < notice.seconds_left() <= 30
        waited = [path for _, path, _ in fake.requests if "wait_for_change=true" in path]
        assert waited and "last_etag=" in waited[0] and all(h["metadata-flavor"] == "Google"
                                                            for _, _, h in fake.requests)

    with FakeMetadata("gcp") as fake:
        fake.warn()
        assert GcpMetadata(fake.url, wait_s=1).check().event == "TERMINATE_ON_HOST_MAINTENANCE"


def test_azure_scheduled_events_only_this_vms_preempt_is_a_notice():
    with FakeMetadata("azure") as fake:
        azure = AzureMetadata(fake.url)
        assert azure.check() is None  # {"Events": []}
        fake.announce_for_another_vm()  # the scale set's other VMs see it too
        assert azure.check() is None
        fake.announce(seconds=30)
        notice = azure.check()
        assert (notice.source, notice.kind, notice.event) == ("azure", PREEMPTION, "Preempt")
        assert 20 < notice.seconds_left() <= 30  # NotBefore, RFC 1123
        assert all(h["metadata"] == "true" for _, _, h in fake.requests)
        assert not [m for m, _, _ in fake.requests if m == "POST"]  # never acknowledged: that hastens it


def test_an_unreachable_server_is_unavailable_not_a_notice():
    with FakeMetadata("aws") as fake:
        url = fake.url
    with pytest.raises(MetadataUnavailable):
        AwsMetadata(url).check()


def test_off_and_auto_without_a_cloud_watch_nothing(tmp_path):
    with FakeMetadata("aws") as fake:
        env = {"PREEMPTION_METADATA_URL": fake.url}
        for mode in ("off", "auto"):
            assert start_watch(mode, tmp_path, TAG, stop=lambda: None, fresh=True, environ=env,
                               dmi_dir=tmp_path / "no_dmi") is None
        assert fake.requests == []


def test_an_unknown_watch_or_poll_interval_is_one_preflight_line(tmp_path, monkeypatch):
    env = {"NANOCHAT_BASE_DIR": str(tmp_path), "PRESET": "tiny", "DEVICE": "cpu", "PREEMPTION_WATCH": "ec2"}
    assert preflight(RunConfig.from_env([], env), check_hub=False) == [
        "PREEMPTION_WATCH=ec2 is unknown: use one of auto, off, aws, gcp, azure"]
    monkeypatch.setenv("PREEMPTION_POLL_S", "soon")
    assert preflight(RunConfig.from_env([], {**env, "PREEMPTION_WATCH": "AWS"}), check_hub=False) == [
        "PREEMPTION_POLL_S=soon is not a number of seconds: unset it (AWS: 5)"]


# --- the sidecar -----------------------------------------------------------------------------------


def write_notice(base: Path, notice: Notice) -> None:
    """What `phoenix run`'s watch writes for the sidecar."""
    layout.write_json_atomic(notice_path(base, TAG), notice.to_json())


def test_the_sidecar_pushes_on_a_warning_and_each_new_checkpoint_after_a_notice(hub, tmp_path):
    env = sidecar_env(hub, tmp_path) | {"HF_SYNC_INTERVAL": "3600"}
    base = base_dir(env)
    status_file = base / "runs" / TAG / "trainer_status.json"
    layout.write_json_atomic(status_file, {"status": "running", "updated": time.time(), "generation": 0})
    make_checkpoint(base, 250)

    def log() -> str:
        return (base / "logs" / "hf_sync.log").read_text()

    # The trainer stays "running" throughout and the interval is an hour: only the notice can push.
    proc = subprocess.Popen(PHOENIX + ["sync", "--poll-seconds", "30"], env=env, stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: hub_steps(hub, env) == [250], 20, "the first pass")
        make_checkpoint(base, 300)
        write_notice(base, Notice("aws", WARNING, "rebalance"))
        wait_for(lambda: hub_steps(hub, env) == [250, 300], 20, "the push a warning asks for")
        write_notice(base, Notice("aws", PREEMPTION, "terminate", time.time() + 120))
        nothing_new = "event=pass_done ok=True pushed=0 pruned=0 deferred=0 errors=0"
        wait_for(lambda: log().count("event=preemption_notice_seen") == 2
                 and nothing_new in log().splitlines()[-1], 20,
                 "the pass the notice asks for (nothing new yet)")
        make_checkpoint(base, 301)  # the emergency checkpoint, published while `phoenix run` winds down
        wait_for(lambda: hub_steps(hub, env) == [250, 300, 301], 20, "the emergency checkpoint's push")
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert "trainer_stopped" not in log()


# --- phoenix run -----------------------------------------------------------------------------------


class Launch:
    """A `phoenix run` (or `phoenix sync`) process whose output lines are collected as they come."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "entrypoint", *args],
                                     env={**env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.out: list[str] = []
        self.ended = False
        threading.Thread(target=lambda: [*map(self.lines.put, self.proc.stdout), self.lines.put(None)],
                         daemon=True).start()

    def _read(self, timeout: float) -> None:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            return
        if line is None:
            self.ended = True
        else:
            self.out.append(line)

    def wait_for_line(self, text: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.out):
            assert not self.ended and time.monotonic() < deadline, \
                f"no line with {text!r}:\n{''.join(self.out[-30:])}"
            self._read(0.05)

    def finish(self, timeout: float = 180) -> tuple[int, str]:
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                kill_tree(self.proc)
        while not self.ended:
            self._read(5)
        return self.proc.returncode, "".join(self.out)


def watched(env: dict[str, str], fake: FakeMetadata) -> dict[str, str]:
    return {**env, "PREEMPTION_WATCH": fake.cloud, "PREEMPTION_METADATA_URL": fake.url,
            "PREEMPTION_POLL_S": "0.1"}


def trainer_status(volume: Path) -> dict:
    return json.loads((volume / "runs" / MODEL_TAG / "trainer_status.json").read_text())


def test_a_notice_at_start_up_stops_the_launch_before_training(hub, tmp_path):
    env, volume = tiny_job(hub, tmp_path)
    cloud = "gcp"  # the mid-run scenario below is AWS's; each cloud's wording is tested above
    with FakeMetadata(cloud) as fake:
        fake.announce(seconds=60)  # the VM is already being taken when the container starts
        code, out = run_phoenix(watched(env, fake), "run", *TRAIN, timeout=120)
    assert code == 0, out  # stopped, not failed: restart: on-failure leaves it down
    assert out.count("event=preemption_notice ") == 1 and f"source={cloud} " in out, out
    assert "deadline_s=" in out and "torch.distributed.run" not in out
    assert trainer_status(volume)["status"] == "stopped"
    assert read_notice(volume, MODEL_TAG).source == cloud  # for the sidecar


def test_a_notice_mid_run_ends_in_a_pushed_checkpoint_and_an_exact_resume(hub, tmp_path):
    """The issue's done-when scenario, on AWS: a notice as a checkpoint is being written, the emergency
    checkpoint published and pushed; a redeploy that meets a notice during its restore stops cleanly;
    the next one resumes from the pushed checkpoint and ends bitwise equal to an uninterrupted run."""
    # Checkpoints in the git repo: the redeploy's restore is held at one of its file requests.
    env, volume = tiny_job(hub, tmp_path, HF_SYNC_INTERVAL="3600", HF_CHECKPOINT_STORE="repo")
    reference = tmp_path / "reference"
    assert run_trainer(reference, env, *TRAIN[1:])[0] == 0  # uninterrupted, the bare trainer
    seed_volume(reference, volume)  # its tokenizer and shards: saves training the tokenizer again

    with FakeMetadata("aws") as fake:
        sidecar = Launch(env, "sync")
        trainer = Launch(watched(env, fake), "run", *TRAIN)
        try:
            trainer.wait_for_line("checkpoint step=10 ")  # its background write has just started
            fake.announce(seconds=120)
            code, out = trainer.finish()
            stopped = layout.latest(layout.stage_dir(volume, "base", MODEL_TAG))
            sidecar.wait_for_line(f"event=push_done stage=base step={stopped.step} ", timeout=60)
        finally:
            sidecar.proc.terminate()
            sidecar.finish(timeout=60)
    assert code == 0, out
    assert out.count("event=preemption_notice ") == 1 and "source=aws notice=terminate " in out, out
    assert stopped.meta()["stopped"] and not stopped.done and stopped.step > 10
    assert f"checkpoint published step={stopped.step} " in out
    # The emergency save against the notice's window: 120 s, of which the save left most.
    saved = re.search(rf"event=emergency_save step={stopped.step} reason=preemption_notice "
                      r"emergency_save_s=([\d.]+) since_stop_s=[\d.]+ deadline_left_s=([\d.]+) ", out)
    assert saved and float(saved[1]) < 60 < float(saved[2]) <= 120, out
    assert trainer_status(volume)["status"] == "stopped"
    assert "event=preemption_notice_seen" in "".join(sidecar.out)
    assert stopped.step in hub_steps(hub, env)

    fresh = tmp_path / "new_instance"
    fresh.mkdir()
    redeploy = {**env, "NANOCHAT_BASE_DIR": str(fresh)}
    with FakeMetadata("aws") as fake:
        held = hub.server.pause_next(f"/{layout.step_dir_name(stopped.step)}/model.safetensors", "HEAD")
        trainer = Launch(watched(redeploy, fake), "run", *TRAIN)
        try:
            assert held.reached.wait(120), "the restore never asked for the checkpoint"
            fake.announce(seconds=120)  # this VM too is taken, while its restore downloads
            trainer.wait_for_line("event=preemption_notice ")
        finally:
            held.release()
        code, out = trainer.finish()
    assert code == 0 and "torch.distributed.run" not in out, out
    assert trainer_status(fresh)["status"] == "stopped"

    code, out = run_phoenix(redeploy, "run", *TRAIN)  # the next VM: no notice
    assert code == 0, out
    assert f"resuming from step={stopped.step}" in out and "fresh start" not in out
    assert weights_sha256(fresh, STEPS) == weights_sha256(reference, STEPS)
    assert step_losses(fresh).items() <= step_losses(reference).items()
