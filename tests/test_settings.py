"""Bad settings end `phoenix run` in one line: `error:`, exit 2, counted by the crash-loop guard (so
`restart: on-failure` stops relaunching), never a traceback and exit 1; an unsafe MODEL_TAG before
anything is written anywhere.

Real `phoenix run` processes on an empty volume, Hub off unless the case is about the Hub.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.helpers import MODEL_TAG, run_phoenix

TRAIN = ("--", "--num-iterations", "2", "--eval-every", "0")


@pytest.fixture
def job(tmp_path) -> tuple[dict[str, str], Path]:
    volume = tmp_path / "volume"
    volume.mkdir()
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(volume), "MODEL_TAG": MODEL_TAG, "PRESET": "tiny",
           "DEVICE": "cpu", "RUN_SFT": "0", "WANDB_MODE": "offline", "HF_REPO_ID": ""}
    return env, volume


def errors(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("error: ")]


@pytest.mark.parametrize("change,args,message", [
    ({"HF_REPO_ID": "not a repo"}, (), "HF_REPO_ID='not a repo' is not a valid repo id"),
    ({"HF_SYNC_INTERVAL": "soon"}, (), "HF_SYNC_INTERVAL='soon' is not a positive number"),
    ({"PHOENIX_MAX_FAILURES": "many"}, (), "PHOENIX_MAX_FAILURES='many' is not an integer"),
    ({"SAVE_EVERY": "abc"}, (), "SAVE_EVERY='abc' is neither a positive number of steps nor 'auto'"),
    ({"KEEP_LAST": "abc"}, (), "KEEP_LAST='abc' is not a positive number"),
    ({"NPROC_PER_NODE": "0"}, (), "NPROC_PER_NODE='0' is not an integer of at least 1"),
    ({"DEVICE": "gpu"}, (), "DEVICE='gpu' is unknown"),
    ({"RUN_SFT": "maybe"}, (), "RUN_SFT='maybe' is not a switch"),
    ({}, ("--", "--num-iterations", "2", "--no-such-flag"),
     "trainer.train: unrecognized arguments: --no-such-flag"),
])
def test_a_bad_setting_is_one_line_exit_2_and_counted(job, change, args, message):
    env, volume = job
    code, out = run_phoenix({**env, **change}, "run", *(args or TRAIN), timeout=120)
    assert code == 2 and "Traceback" not in out, out
    assert len(errors(out)) == 1 and message in errors(out)[0], out
    failures = json.loads((volume / "runs" / MODEL_TAG / "failures.json").read_text())
    assert failures["count"] == 1 and message in failures["error"]
    assert "torch.distributed.run" not in out


def test_the_guard_holds_a_bad_setting_after_three_launches(job):
    env, _ = job
    bad = {**env, "HF_SYNC_INTERVAL": "soon"}
    codes = [run_phoenix(bad, "run", *TRAIN)[0] for _ in range(3)]
    assert codes == [2, 2, 0]  # held: Docker's on-failure policy stops relaunching
    code, out = run_phoenix(bad, "health")
    assert code == 1 and "not relaunching after 3 identical failures: HF_SYNC_INTERVAL='soon'" in out


def test_an_unsafe_model_tag_is_refused_before_anything_is_written(job, tmp_path):
    env, volume = job
    for tag in ("../../escaped", "a/b", "x" * 65):
        code, out = run_phoenix({**env, "MODEL_TAG": tag}, "run", *TRAIN)
        assert code == 2 and "Traceback" not in out, out
        assert len(errors(out)) == 1 and f"MODEL_TAG={tag!r} is not a safe name" in errors(out)[0], out
    # Every command that writes under runs/<tag>/ refuses it too.
    for command in (("sync", "--once"), ("status", "--no-hub"), ("report",), ("eval", "chat")):
        code, out = run_phoenix({**env, "MODEL_TAG": "../../escaped"}, *command)
        assert code == 2 and errors(out) and "is not a safe name" in errors(out)[0], (command, out)
    assert list(volume.iterdir()) == [] and not (volume / "../../escaped").exists()
