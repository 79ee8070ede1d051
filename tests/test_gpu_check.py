"""scripts/gpu_check.sh --cpu: the first-GPU check at tiny CPU sizes, so it cannot rot between GPUs.

It runs as a bare GPU host would: `datasets` and `wandb` are blocked in every process of the check
(a sitecustomize on PYTHONPATH), no Hub, generated shards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
BLOCK = "import sys\nfor name in ('datasets', 'wandb'):\n    sys.modules[name] = None\n"


def bare_host_env(tmp: Path) -> dict[str, str]:
    """This environment with `datasets` and `wandb` made unimportable for every Python process."""
    blocker = tmp / "bare_host"
    blocker.mkdir(exist_ok=True)
    (blocker / "sitecustomize.py").write_text(BLOCK)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "WANDB_"))}
    return {**env, "PYTHONPATH": str(blocker), "PYTHON": sys.executable}


def run_check(tmp: Path, parts: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp / "gpu_check.json"
    done = subprocess.run([str(SCRIPT), "--cpu", "--only", parts, "--out", str(out), "--budget-s", "900"],
                          env=bare_host_env(tmp), capture_output=True, text=True, timeout=1200)
    return done, json.loads(out.read_text())


# compile and bf16 run the probes tests/test_compile.py runs in-process: left out here to save ~25 s.
# relaunch_tiny (bench/relaunch.py: three launches, ~45 s) is left out too; test_train.py checks what
# it reads, the trainer's event=startup line.
QUICK_PARTS = "env,throughput_tiny,checkpoint_tiny,save_tiny"
# ~95 s more: their behaviour is also what test_train.py (kill -9 resume), test_run_oom.py and
# test_distributed.py check; these runs check the GPU check's own code for them.
LONG_PARTS = "resume_1proc,oom_relaunch,two_process"


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    return run_check(tmp_path_factory.mktemp("gpu_check"), QUICK_PARTS)


@pytest.fixture(scope="module")
def long_report(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    return run_check(tmp_path_factory.mktemp("gpu_check_long"), LONG_PARTS)


def test_the_blocker_really_blocks(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import wandb"], env=bare_host_env(tmp_path),
                          capture_output=True, text=True)
    assert done.returncode != 0 and "wandb" in done.stderr


def test_cpu_check_passes_every_part_and_ends_with_one_summary_line(report):
    done, result = report
    assert done.returncode == 0, done.stdout + done.stderr + json.dumps(result, indent=1)[-4000:]
    summary = done.stdout.strip().splitlines()[-1]
    parts = result["parts"]
    assert summary == result["summary"] and summary.startswith("gpu_check: ")
    assert f"{len(parts)}/{len(parts)} passed" in summary
    assert set(parts) == set(QUICK_PARTS.split(","))


def test_the_report_holds_the_figures(report):
    parts = report[1]["parts"]
    env = parts["env"]["result"]
    assert env["torch"] and env["numpy"] and env["eager_heavy_imports"] == []
    throughput = parts["throughput_tiny"]["result"]
    assert throughput["compiled"] and throughput["tok_per_sec"] > 0
    assert parts["checkpoint_tiny"]["result"]["async_stall_ms"] > 0
    save = parts["save_tiny"]["result"]
    assert save["emergency_save_s"] > 0 and "optimizer-00000-of-00001.safetensors" in save["files"]


@pytest.mark.long
def test_the_long_parts_pass(long_report):
    done, result = long_report
    assert done.returncode == 0, done.stdout + done.stderr + json.dumps(result, indent=1)[-4000:]
    assert set(result["parts"]) == set(LONG_PARTS.split(","))


@pytest.mark.long
def test_phoenix_run_killed_mid_run_resumes_bitwise_on_cpu(long_report):
    resume = long_report[1]["parts"]["resume_1proc"]["result"]
    assert resume["complete"] and resume["bitwise"]
    # Killed between two checkpoints: the relaunch resumed from the last one, before the end.
    assert 0 < resume["resumed_from"] <= resume["killed_at_log_of_step"] < resume["steps"]


@pytest.mark.long
def test_an_out_of_memory_relaunches_at_half_the_device_batch(long_report):
    oom = long_report[1]["parts"]["oom_relaunch"]["result"]
    assert oom["device_batch_per_launch"] == [4, 2] and oom["halvings"] == [[oom["oom_from_step"], 4, 2]]
    assert oom["complete"]


@pytest.mark.long
def test_two_ranks_train_in_step_over_the_sharded_step_and_compile(long_report):
    attempt = long_report[1]["parts"]["two_process"]["result"]["attempts"]["gloo-cpu"]
    assert attempt["ok"] and attempt["replicas_identical"]
    assert attempt["state_sharded"] and all(attempt["state_names_per_rank"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a GPU")
def test_without_a_gpu_the_gpu_check_is_one_clear_line(tmp_path):
    done = subprocess.run([str(SCRIPT), "--out", str(tmp_path / "gpu_check.json")],
                          env=bare_host_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and not (tmp_path / "gpu_check.json").exists()
    assert done.stderr.startswith("error: ") and "--cpu" in done.stderr and len(done.stderr.splitlines()) == 1


def test_an_exhausted_budget_is_recorded_not_fatal(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([str(SCRIPT), "--cpu", "--out", str(out), "--budget-s", "5"],
                          env=bare_host_env(tmp_path), capture_output=True, text=True, timeout=120)
    result = json.loads(out.read_text())
    assert done.returncode == 1
    assert {r["status"] for r in result["parts"].values()} == {"skipped"}
    assert done.stdout.strip().splitlines()[-1].endswith(f"0/{len(result['parts'])} passed in 0s")
