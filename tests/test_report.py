"""`phoenix report` on a real run's files: a tiny base run killed with SIGKILL mid-interval and resumed.

The report must show the resume (in its table and in the data it plots) and what the interruption cost
(as `phoenix status` does), draw real PNGs, line up the sidecar's pushes with the steps (sync lag) and
list the evaluations; readable without W&B.
"""

from __future__ import annotations

import json
import os
import re
import time

from click.testing import CliRunner

from entrypoint.cli import main
from entrypoint.demo.localhub import LocalHub
from entrypoint.tools.report import read_stage, write_report
from tests.helpers import MODEL_TAG, publish_corpus, run_trainer

ARGS = ("--num-iterations", "12", "--save-every", "4", "--eval-every", "6")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_report_of_a_killed_and_resumed_run(tmp_path):
    base = tmp_path / "volume"
    with LocalHub(tmp_path / "hub") as server:
        publish_corpus(server, tmp_path / "shards", num_shards=2, docs_per_shard=200)
        env = {**os.environ, "HF_ENDPOINT": server.url,
               "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_TELEMETRY": "1", "WANDB_MODE": "offline"}
        # Killed after step 10 is logged: the checkpoint of step 8 is the newest, steps 9-10 are redone.
        code, out = run_trainer(base, env, *ARGS, kill_when=lambda line: "step 00010/" in line)
        assert code is None, out
        code, out = run_trainer(base, env, *ARGS)
        assert code == 0 and "resuming from step=8" in out, out

    logs = base / "logs"
    stepped_at = {r["step"]: r["time"] for r in map(json.loads, (logs / f"train_base_{MODEL_TAG}.jsonl")
                                                    .read_text().splitlines()) if "loss" in r}
    # What the sidecar would have logged: step 8 reached the Hub 90 s after training passed it.
    pushed = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(stepped_at[8] + 90))
    (logs / "hf_sync.log").write_text(f"{pushed} INFO phoenix.sync event=push_done stage=base step=8 "
                                      "bytes=1 seconds=0.1 mb_s=0.0 extras=0 commit=abc\n")
    # And what `phoenix run` logs when it brings a checkpoint back from the Hub before relaunching.
    with open(logs / "phoenix_run.log", "a") as f:
        f.write(f"{pushed} INFO phoenix.restore event=restore_start stage=base step=8 files=3 bytes=10\n")
    eval_dir = base / "runs" / MODEL_TAG / "eval"
    eval_dir.mkdir(parents=True)
    (eval_dir / "base_step000012.json").write_text(json.dumps(
        {"stage": "base", "step": 12, "eval": "core", "core_metric": 0.125, "accuracy": {"hellaswag": 0.3}}))

    series = read_stage(logs, "base", MODEL_TAG)
    assert series.resumes == [8]
    assert sorted(series.train) == list(range(1, 13))  # the redone steps 9-10 counted once
    assert sorted(series.val) == [0, 6, 12]

    volume_env = {"NANOCHAT_BASE_DIR": str(base), "MODEL_TAG": MODEL_TAG}
    result = CliRunner().invoke(main, ["report"], env=volume_env)  # the real CLI, in this process
    assert result.exit_code == 0 and "base=12" in result.output, result.output
    report_dir = base / "runs" / MODEL_TAG / "report"
    page = (report_dir / "report.md").read_text()
    assert "| resumed from checkpoint steps | 8 |" in page
    assert "| restored from the Hub at steps | 8 |" in page
    assert "| pushed to the Hub | 1 checkpoint, last step 8, median lag 1.5 min after the step |" in page
    assert "| base step 12 | CORE | 0.1250 |" in page
    for name in ("base_loss", "base_val", "base_tok_per_sec", "base_sync_lag"):
        assert f"![{name}]({name}.png)" in page
        assert (report_dir / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
    assert not (report_dir / "base_mfu.png").exists()  # no MFU on a CPU: no empty plot
    assert "- (CPU or unknown GPU)" in page
    # What the kill cost, as the relaunch recorded it: steps 9-10 (or 9, if the kill beat step 10's
    # record) redone, and the relaunch's time to its first step, by phase.
    row = re.search(r"\| base \| killed \| 8 \| (9|10) \| ([12]) \| ([\d.]+) s \| ([\d.]+) s \| "
                    r"([\d.]+) s \| 0\.0 s \| ([\d.]+) s \| ([\d.]+) s \| ([\d,]+) \|", page)
    assert "## Interruptions" in page and row, page
    assert int(row[1]) - 8 == int(row[2]) and float(row[3]) >= float(row[4]) + float(row[5]) > 0
    status = CliRunner().invoke(main, ["status", "--no-hub"], env=volume_env)
    assert status.exit_code == 0, status.output
    assert f"interruptions: 1, {row[2]} steps lost" in status.output
    assert re.search(rf"base +killed +8 +{row[2]} +{row[3]}s", status.output), status.output

    # The same report in-process, to another folder: what it plotted includes the resume.
    _, stages = write_report(base, MODEL_TAG, tmp_path / "elsewhere")
    assert stages["base"].resumes == [8] and stages["base"].restores == [8]
    assert stages["base"].pushes[0][0] == 8
