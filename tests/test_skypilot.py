"""skypilot.yaml and scripts/skypilot.sh: what SkyPilot would run, read with SkyPilot's own parser, and
the run section itself on the CPU against the local Hub (no cloud account anywhere).

SkyPilot pins click<8.2, which huggingface_hub>=2.4 refuses, so it cannot share phoenix's environment: the
parser runs in SkyPilot's own interpreter (`pipx install skypilot`, or PHOENIX_SKY_PYTHON=<its python>),
and that test is skipped where there is none.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from entrypoint.demo.fake_metadata import FakeMetadata
from entrypoint.launch.config import RunConfig
from entrypoint.launch.torchrun import torchrun_command
from tests.helpers import MODEL_TAG, fill_checkpoint, tiny_job
from tests.test_sync import hub_steps
from trainer import checkpoint_layout as layout

ROOT = Path(__file__).resolve().parents[1]
TASK, SCRIPT = ROOT / "skypilot.yaml", ROOT / "scripts" / "skypilot.sh"
PREEMPTED_EXIT = int(re.search(r"^PREEMPTED_EXIT=(\d+)", SCRIPT.read_text(), re.M).group(1))

# Run with SkyPilot's interpreter: the task as `sky jobs launch [--env ...] [--secret ...]` would build it,
# for each set of overrides (one interpreter: importing sky takes seconds).
PARSE = """
import json, sys
import sky
from sky.utils import yaml_utils
for env, secrets in json.loads(sys.argv[2]):
    try:
        task = sky.Task.from_yaml_config(yaml_utils.read_yaml(sys.argv[1]), env_overrides=env,
                                         secrets_overrides=secrets)
    except ValueError as exc:
        print(json.dumps({"error": str(exc)}))
        continue
    print(json.dumps({"name": task.name, "num_nodes": task.num_nodes, "setup": task.setup, "run": task.run,
                      "workdir": task.workdir, "envs": task.envs, "secrets": sorted(task.secrets),
                      "resources": [{"use_spot": r.use_spot, "accelerators": r.accelerators,
                                     "job_recovery": r.job_recovery} for r in task.resources]}))
"""


def sky_python() -> str | None:
    """SkyPilot's interpreter: PHOENIX_SKY_PYTHON, else the one the `sky` command runs with."""
    if os.environ.get("PHOENIX_SKY_PYTHON"):
        return os.environ["PHOENIX_SKY_PYTHON"]
    sky = shutil.which("sky")
    if sky is None:
        return None
    shebang = Path(sky).read_text(errors="replace").splitlines()[0]
    return shebang[2:].strip() if shebang.startswith("#!") else None


def parse_task(*launches: tuple[list[tuple[str, str]], list[tuple[str, str]]]) -> list[dict]:
    """The task SkyPilot builds for each (env overrides, secret overrides), or {"error": ...}."""
    python = sky_python()
    if python is None:
        pytest.skip("SkyPilot is not installed: `pipx install skypilot` (it cannot share phoenix's "
                    "environment: it pins click<8.2), or set PHOENIX_SKY_PYTHON")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_"))}
    done = subprocess.run([python, "-c", PARSE, str(TASK), json.dumps(launches)], capture_output=True,
                          text=True, env=clean, timeout=300)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_skypilot_reads_a_spot_managed_job_whose_secrets_come_from_the_launch():
    launch = ([("HF_REPO_ID", "alice/phoenix-d26")], [("HF_TOKEN", "hf_FromTheUsersShell0123")])
    task, bare = parse_task(launch, ([], []))  # bare: `sky jobs launch skypilot.yaml`, no --env HF_REPO_ID
    assert (task["name"], task["num_nodes"], task["workdir"]) == ("phoenix", 1, ".")
    assert task["setup"] == "bash scripts/skypilot.sh setup" and task["run"] == "bash scripts/skypilot.sh run"
    assert task["envs"]["HF_REPO_ID"] == "alice/phoenix-d26" and task["envs"]["PREEMPTION_WATCH"] == "auto"
    assert task["secrets"] == ["HF_TOKEN"] and "HF_TOKEN" not in task["envs"]
    assert {gpu for r in task["resources"] for gpu in r["accelerators"]} >= {"H100", "A100-80GB"}
    for resources in task["resources"]:
        recovery = resources["job_recovery"]
        assert resources["use_spot"] and recovery["strategy"] == "EAGER_NEXT_REGION"
        assert recovery["recover_on_exit_codes"] == [PREEMPTED_EXIT]
        assert recovery["max_restarts_on_errors"] > 0
    assert "hf_" not in TASK.read_text()  # no token in the file, only the secret's name
    assert "'HF_REPO_ID' is None" in bare["error"]


def node_env(**skypilot: str) -> dict[str, str]:
    """What `scripts/skypilot.sh env` makes of SkyPilot's node variables."""
    done = subprocess.run(["bash", str(SCRIPT), "env"], capture_output=True, text=True, check=True,
                          env={"PATH": os.environ["PATH"], "HOME": "/home/sky", **skypilot})
    return dict(line.split("=", 1) for line in done.stdout.splitlines())


def test_skypilot_node_variables_become_torchrun_s_rendezvous():
    env = node_env(SKYPILOT_NUM_NODES="2", SKYPILOT_NODE_RANK="1", SKYPILOT_NODE_IPS="10.0.0.5\n10.0.0.6",
                   SKYPILOT_NUM_GPUS_PER_NODE="8", NANOCHAT_BASE_DIR="~/nanochat")
    assert env["NANOCHAT_BASE_DIR"] == "/home/sky/nanochat"
    command = " ".join(torchrun_command(RunConfig.from_env([], env), "trainer.train", 8, []))
    assert "--nnodes=2 --node_rank=1 --rdzv_backend=c10d --rdzv_endpoint=10.0.0.5:29500" in command
    assert env["NPROC_PER_NODE"] == "8"

    env = node_env(SKYPILOT_NUM_NODES="1", SKYPILOT_NODE_RANK="0", SKYPILOT_NODE_IPS="10.0.0.7",
                   SKYPILOT_NUM_GPUS_PER_NODE="0")  # a CPU box: phoenix picks the process count
    assert "NPROC_PER_NODE" not in env
    assert "--standalone" in torchrun_command(RunConfig.from_env([], env), "trainer.train", 1, [])


def run_section(env: dict[str, str], *train_args: str) -> subprocess.CompletedProcess:
    """skypilot.yaml's run, as SkyPilot starts it on a single node."""
    node = {"SKYPILOT_NUM_NODES": "1", "SKYPILOT_NODE_RANK": "0", "SKYPILOT_NODE_IPS": "127.0.0.1",
            "SKYPILOT_NUM_GPUS_PER_NODE": "0", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(SCRIPT), "run", *train_args], env={**env, **node}, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_the_run_section_succeeds_only_for_a_finished_run(hub, tmp_path):
    env, volume = tiny_job(hub, tmp_path, RUN_SFT="0")
    env = {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"}
    with FakeMetadata("aws") as fake:
        fake.announce(seconds=120)  # the box is taken before it trains: SkyPilot must recover, not finish
        done = run_section({**env, "PREEMPTION_WATCH": "aws", "PREEMPTION_METADATA_URL": fake.url,
                            "PREEMPTION_POLL_S": "0.1"})
    assert done.returncode == PREEMPTED_EXIT, done.stdout + done.stderr
    assert "event=preemption_notice source=aws" in done.stdout

    # A base stage finished earlier on this volume (as a relaunch after the last step finds it): the
    # launch has nothing left to train, ends as finished, and the sidecar pushes before the job ends.
    tmp = layout.new_tmp_dir(layout.stage_dir(volume, "base", MODEL_TAG), 7)
    save_file({"w": np.zeros(1024, dtype=np.float32)}, str(tmp / "model.safetensors"))
    fill_checkpoint(tmp, 7)
    layout.publish(tmp, 7, done=True, stage="base", model_tag=MODEL_TAG)
    done = run_section(env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "base stage already finished" in done.stdout and hub_steps(hub, env) == [7]
