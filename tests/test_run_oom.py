"""`phoenix run` after a CUDA out-of-memory, injected on the CPU (PHOENIX_TEST_OOM): the stage goes on from
its newest checkpoint with half the device batch, in-process, bitwise as an uninterrupted run at that size
from the same checkpoint; the halved size survives a relaunch; below one sequence, one `error:` line.

Real processes on CPU (tiny preset), shards from the local Hub, Hub sync off."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.helpers import (
    MODEL_TAG,
    checkpoint_dir,
    run_phoenix,
    run_trainer,
    step_losses,
    tiny_job,
    weights_sha256,
)
from trainer import checkpoint_layout as layout

STEPS = 30
TRAIN = ("--", "--num-iterations", str(STEPS), "--save-every", "5", "--eval-every", "15")


def run_state(volume, name):
    path = volume / "runs" / MODEL_TAG / name
    return json.loads(path.read_text()) if path.exists() else None


def test_an_out_of_memory_goes_on_at_half_the_device_batch_bitwise_and_the_choice_survives_a_relaunch(
        hub, tmp_path):
    # More than 2 rows per forward run out of memory from step 13 on; the tiny preset's default is 4.
    env, volume = tiny_job(hub, tmp_path, HF_REPO_ID="", KEEP_LAST="10",
                           PHOENIX_TEST_OOM="rows=2,from_step=13")
    relaunched = []

    def killed_after_the_relaunch(line: str) -> bool:  # then the instance dies at step 17
        relaunched.extend(["yes"] if "event=oom_relaunch" in line else [])
        return bool(relaunched) and "step 00017/" in line

    code, out = run_phoenix(env, "run", *TRAIN, kill_when=killed_after_the_relaunch)
    assert code is None, out
    assert ("event=oom_relaunch stage=base step=13 device_batch_size=4 next_device_batch_size=2 "
            "resume_from_step=10") in out
    assert out.count("torch.distributed.run") == 2 and "resuming from step=10" in out
    first, second = out.split("event=oom_relaunch")
    assert "device_batch_size=4 grad_accum=2" in first and "device_batch_size=2 grad_accum=4" in second
    assert run_state(volume, "failures.json") is None  # a halving is progress, not a failure
    assert run_state(volume, "device_batch.json")["base"]["device_batch_size"] == 2

    # A relaunch (Docker's, after the instance died) keeps the halved size: no out-of-memory again.
    code, out = run_phoenix(env, "run", *TRAIN)
    assert code == 0, out
    assert "--device-batch-size 2" in out and "device_batch_size=2 grad_accum=4" in out
    assert "event=out_of_memory" not in out and "resuming from step=15" in out

    # The reference: the same step-10 checkpoint, trained on uninterrupted at 2 rows per forward.
    reference = tmp_path / "reference"
    for name in ("base_data", "tokenizer"):
        shutil.copytree(volume / name, reference / name)
    ten = layout.step_dir_name(10)
    shutil.copytree(checkpoint_dir(volume) / ten, checkpoint_dir(reference) / ten)
    code, out = run_trainer(reference, {**env, "PHOENIX_TEST_OOM": ""}, *TRAIN[1:], "--device-batch-size",
                            "2")
    assert code == 0 and "resuming from step=10" in out, out
    want = step_losses(reference)
    got = step_losses(volume)
    assert sorted(want) == list(range(11, STEPS + 1))
    assert {step: got[step] for step in want} == want
    assert weights_sha256(volume, STEPS) == weights_sha256(reference, STEPS)


def test_out_of_memory_at_one_sequence_is_one_error_line_and_the_guard_holds(hub, tmp_path):
    env, volume = tiny_job(hub, tmp_path, HF_REPO_ID="", PHOENIX_TEST_OOM="rows=0,from_step=1",
                           PHOENIX_MAX_FAILURES="2")
    code, out = run_phoenix(env, "run", *TRAIN, "--device-batch-size", "2")
    assert code == 2, out
    assert "next_device_batch_size=1" in out  # 2 ran out, then 1 did
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(
        "error: the base stage ran out of GPU memory at device batch 1 (step 1)"), out
    failure = run_state(volume, "failures.json")
    assert (failure["count"], failure["kind"], failure["held"]) == (1, "memory", False)

    # Relaunched as Docker would: the recorded size (1) runs out again; the second identical failure holds.
    code, out = run_phoenix(env, "run", *TRAIN, "--device-batch-size", "2")
    assert code == 0 and "--device-batch-size 1" in out, out
    assert run_state(volume, "failures.json")["held"]
    assert "event=oom_relaunch" not in out


@pytest.mark.parametrize("changed", ["gpus", "args"])
def test_a_recorded_size_holds_only_for_the_same_gpus_and_settings(tmp_path, changed):
    from entrypoint.launch.volume import DeviceBatchRecord
    from trainer.out_of_memory import OutOfMemory

    record = DeviceBatchRecord(tmp_path, MODEL_TAG)
    key = {"gpus": "8 x NVIDIA H100 80GB HBM3, 81559 MiB", "args": ["--depth", "20"]}
    record.keep("base", key, 16, OutOfMemory("base", 13, 32, 79.1))
    assert record.get("base", key) == 16 and record.get("sft", key) is None
    assert DeviceBatchRecord(tmp_path, MODEL_TAG).get("base", key) == 16  # on the volume
    other = {**key, changed: "1 x NVIDIA H200, 143771 MiB" if changed == "gpus" else ["--depth", "26"]}
    assert record.get("base", other) is None
    record.keep("sft", other, 8, OutOfMemory("sft", 3, 16, 139.8))  # another stage's entry: its own key
    assert (record.get("base", key), record.get("sft", other)) == (16, 8)
