"""The trainer as users run it: real processes on CPU, killed with real signals, resumed, compared.

A module-scoped reference run (tiny preset, uninterrupted) downloads the shards from the local Hub,
trains the tokenizer, and records the per-step losses and final weights every scenario must match.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
from pathlib import Path

import pytest

from entrypoint.demo.localhub import LocalHub
from tests.helpers import (
    checkpoint_dir,
    plant_edited_checkpoint,
    publish_corpus,
    run_trainer,
    seed_volume,
    step_losses,
    weights_sha256,
)
from trainer import checkpoint_layout as layout

STEPS = 96
ARGS = ("--num-iterations", str(STEPS), "--save-every", "3", "--eval-every", "24")


class Corpus:
    def __init__(self, env: dict[str, str], reference: Path) -> None:
        self.env = env
        self.reference = reference  # volume of the uninterrupted run: tokenizer, shards, losses, weights

    def volume(self, path: Path) -> Path:
        seed_volume(self.reference, path)
        return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    root = tmp_path_factory.mktemp("corpus")
    with LocalHub(root / "hub") as server:
        publish_corpus(server, root / "shards")
        env = {**os.environ, "HF_ENDPOINT": server.url,
               "HF_HOME": str(root / "hf_home"), "HF_HUB_DISABLE_TELEMETRY": "1", "WANDB_MODE": "offline"}
        reference = root / "reference"
        code, out = run_trainer(reference, env, *ARGS)
        assert code == 0, out
        # The start-of-run line, once; on CPU the time estimate waits for this run's measured tok/s.
        assert out.count(" plan params=") == 1 and " steps=96 total_batch=1,024 tokens=98,304 " in out, out
        assert "basis=none_until_measured" in out, out
        assert " eta steps_left=75 " in out and "basis=measured" in out, out
        yield Corpus(env, reference)


def test_reference_run_trains_on_hub_shards_and_loss_falls(corpus):
    shards = sorted(p.name for p in (corpus.reference / "base_data").glob("shard_*.parquet"))
    assert shards and shards[-1] == "shard_00003.parquet"  # the validation shard came down too
    losses = step_losses(corpus.reference)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert sum(list(losses.values())[-5:]) / 5 < 0.6 * sum(list(losses.values())[:5]) / 5
    final = layout.latest(checkpoint_dir(corpus.reference), full_hash=True)
    assert final.step == STEPS and final.done
    # KEEP_LAST defaults to 3: older checkpoints are pruned.
    assert [c.step for c in layout.complete_checkpoints(checkpoint_dir(corpus.reference))] == [96, 93, 90]


def test_kill9_at_random_instants_then_resume_is_bitwise_exact(corpus, tmp_path):
    base = corpus.volume(tmp_path / "volume")
    rng = random.Random(2026)
    kills = mid_save_kills = attempt = 0
    while kills < 12:  # four of each kind
        latest = layout.latest(checkpoint_dir(base))
        done_step = latest.step if latest else 0
        mode = ("save", "step", "time")[attempt % 3]
        attempt += 1
        if mode == "save":  # the background writer has just started on this checkpoint
            code, out = run_trainer(base, corpus.env, *ARGS,
                                    kill_when=lambda line: "checkpoint step=" in line)
        elif mode == "step":
            target = f"step {min(STEPS, done_step + rng.randint(1, 3)):05d}/"
            code, out = run_trainer(base, corpus.env, *ARGS, kill_when=lambda line, t=target: t in line)
        else:
            code, out = run_trainer(base, corpus.env, *ARGS, kill_after_s=rng.uniform(0.5, 2.5))
        assert code is None, f"the run finished after only {kills} kills:\n{out}"
        kills += 1
        mid_save_kills += mode == "save"
    code, out = run_trainer(base, corpus.env, *ARGS)
    assert code == 0, out
    assert not [p for p in checkpoint_dir(base).iterdir() if p.name.startswith(layout.TMP_PREFIX)]
    assert weights_sha256(base, STEPS) == weights_sha256(corpus.reference, STEPS)
    assert step_losses(base) == step_losses(corpus.reference)


def test_kill9_of_a_two_process_run_resumes_bitwise(corpus, tmp_path):
    reference = corpus.volume(tmp_path / "reference2")
    assert run_trainer(reference, corpus.env, *ARGS, nproc=2)[0] == 0
    base = corpus.volume(tmp_path / "volume")
    kills = 0
    for target in (4, 41, 88):
        code, out = run_trainer(base, corpus.env, *ARGS, nproc=2,
                                kill_when=lambda line, t=f"step {target:05d}/": t in line)
        assert code is None, out
        kills += 1
    code, out = run_trainer(base, corpus.env, *ARGS, nproc=2)
    assert code == 0, out
    assert "world_size=2" in out and " | tok/sec " in out
    assert kills == 3
    assert weights_sha256(base, STEPS) == weights_sha256(reference, STEPS)
    assert step_losses(base) == step_losses(reference)


def test_sigterm_checkpoints_then_resume_on_1_2_1_processes_matches(corpus, tmp_path):
    base = corpus.volume(tmp_path / "volume")
    code, out = run_trainer(base, corpus.env, *ARGS, kill_when=lambda line: "step 00007/" in line,
                            sig=signal.SIGTERM)
    assert code == 0, out  # docker stop: finish the step, emergency checkpoint, exit 0
    assert "emergency checkpoint published" in out
    first_stop = layout.latest(checkpoint_dir(base)).step
    assert first_stop % 3 and first_stop >= 7  # not a regular SAVE_EVERY checkpoint

    code, out = run_trainer(base, corpus.env, *ARGS, nproc=2, kill_when=lambda line: "step 00019/" in line,
                            sig=signal.SIGTERM)
    assert code == 0, out
    assert f"resuming from step={first_stop}" in out and "saved_world_size=1 world_size=2" in out

    code, out = run_trainer(base, corpus.env, *ARGS)
    assert code == 0, out
    assert "saved_world_size=2 world_size=1" in out
    reference, resumed = step_losses(corpus.reference), step_losses(base)
    assert sorted(resumed) == sorted(reference)
    # Across world sizes only the reduction order may differ; on CPU/gloo we observe exact equality.
    assert max(abs(reference[s] - resumed[s]) for s in reference) < 1e-5


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_damaged_latest_falls_back_and_a_bad_volume_refuses_to_start(corpus, tmp_path):
    base = corpus.volume(tmp_path / "volume")
    code, out = run_trainer(base, corpus.env, *ARGS, kill_when=lambda line: "step 00008/" in line,
                            sig=signal.SIGTERM)
    assert code == 0, out
    newest = layout.latest(checkpoint_dir(base))
    _flip_byte(newest.path / "model.safetensors")

    code, out = run_trainer(base, corpus.env, *ARGS, kill_when=lambda line: "resuming from" in line)
    assert f"{newest.path / 'model.safetensors'}: sha256 does not match" in out
    assert "resuming from step=6 " in out

    for step_dir in checkpoint_dir(base).iterdir():
        (step_dir / layout.MANIFEST_NAME).unlink(missing_ok=True)
    code, out = run_trainer(base, corpus.env, *ARGS)
    assert code == 2
    assert out.strip().splitlines()[-1].startswith("error: ") and "--allow-fresh-start" in out
    assert "Traceback" not in out

    code, out = run_trainer(base, corpus.env, *ARGS, "--allow-fresh-start",
                            kill_when=lambda line: "step 00001/" in line)
    assert "fresh start" in out


def test_full_disk_fails_the_save_clearly_and_keeps_earlier_checkpoints(corpus, tmp_path):
    mount = tmp_path / "small_volume"
    mount.mkdir()
    seeded = sum(f.stat().st_size for f in corpus.reference.rglob("*") if f.is_file()
                 and f.parts[len(corpus.reference.parts)] in ("tokenizer", "base_data"))
    ckpt_bytes = layout.latest(checkpoint_dir(corpus.reference)).total_bytes
    size_kib = (seeded + int(2.5 * ckpt_bytes)) // 1024 + 256
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(mount)],
                             capture_output=True, text=True)
    assert mounted.returncode == 0, f"this test needs root to mount a small tmpfs: {mounted.stderr}"
    try:
        base = corpus.volume(mount / "volume")
        code, out = run_trainer(base, corpus.env, *ARGS)
        assert code == 1, out
        assert "disk full writing checkpoint step 9" in out and "earlier checkpoints are intact" in out
        assert "Traceback" not in out
        complete = layout.complete_checkpoints(checkpoint_dir(base), full_hash=True)
        assert [c.step for c in complete] == [6, 3]
        assert not [p for p in checkpoint_dir(base).iterdir() if p.name.startswith(layout.TMP_PREFIX)]
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("extra_args,env,expected_code,message", [
    (("--preset", "d99"), {}, 2, "unknown preset 'd99'"),
    (("--total-batch-size", "1000"), {}, 2, "is not a multiple of --max-seq-len"),
    ((), {"DATASET_REPO": "nobody/missing-data"}, 1, "'nobody/missing-data' not found on the Hub"),
])
def test_bad_input_is_one_clear_line(corpus, tmp_path, extra_args, env, expected_code, message):
    base = tmp_path / "volume"
    code, out = run_trainer(base, {**corpus.env, **env}, *ARGS, *extra_args)
    assert code == expected_code, out
    last = out.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last
    assert "Traceback" not in out


def test_a_checkpoint_of_the_older_model_is_refused_in_one_line(corpus, tmp_path):
    """A volume trained before the model grew windows and value embeddings: its meta.json's model config
    has neither `window_pattern` nor `architecture` (rewritten here, with a valid manifest)."""
    base = corpus.volume(tmp_path / "volume")
    old = next(c for c in layout.complete_checkpoints(checkpoint_dir(corpus.reference)) if not c.done)

    def older_model(meta: dict) -> None:
        del meta["model_config"]["architecture"], meta["model_config"]["window_pattern"]

    plant_edited_checkpoint(old, checkpoint_dir(base), older_model)
    code, out = run_trainer(base, corpus.env, *ARGS)
    assert code == 2, out
    last = out.strip().splitlines()[-1]
    assert last.startswith("error: ") and "architecture" in last and "another MODEL_TAG" in last, last
    assert "Traceback" not in out


def test_a_relaunched_run_continues_the_same_wandb_run(corpus, tmp_path):
    base = corpus.volume(tmp_path / "volume")
    env = {**corpus.env, "WANDB_RUN": "phoenix-test", "WANDB_MODE": "offline"}
    code, first = run_trainer(base, env, *ARGS, kill_when=lambda line: "step 00010/" in line)
    assert code is None
    code, second = run_trainer(base, env, *ARGS)
    assert code == 0, second
    run_id = json.loads((base / "runs" / "test-tiny" / "run.json").read_text())["wandb_run_id"]
    assert f"wandb run_id={run_id} mode=offline" in first and f"wandb run_id={run_id} mode=offline" in second
    # W&B offline never merges runs; what phoenix owns is handing the same id (resume="allow") each time.
    runs = sorted((base / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs)
    assert layout.latest(checkpoint_dir(base)).meta()["wandb_run_id"] == run_id


def test_save_every_auto_changes_its_interval_and_a_kill9_still_resumes_bitwise(corpus, tmp_path):
    """SAVE_EVERY=auto: a first save 10 steps in measures the stall, then Young/Daly picks the interval
    (logged with its inputs); a kill -9 between saves is recorded as an interruption, and the run ends
    exactly as the reference with its fixed interval."""
    base = corpus.volume(tmp_path / "volume")
    auto = ("--num-iterations", str(STEPS), "--eval-every", "24", "--save-every", "auto")
    code, first = run_trainer(base, corpus.env, *auto, kill_when=lambda line: "step 00040/" in line)
    assert code is None, first
    saved = sorted(c.step for c in layout.complete_checkpoints(checkpoint_dir(base)))
    # The first save 10 steps in (none at SAVE_EVERY's 3, 6, 9), then more before the kill.
    assert "checkpoint step=10 " in first and "checkpoint step=3 " not in first and 10 < max(saved) < 40
    code, second = run_trainer(base, corpus.env, *auto)
    assert code == 0, second
    changes = [line for line in (first + second).splitlines() if "event=save_interval" in line]
    assert changes and " previous=10 " in changes[0]
    assert all(f" {key}=" in changes[0] for key in ("save_every", "save_cost_s", "mtbi_s", "interruptions",
                                                     "step_s", "min_interval_s", "max_interval_s"))
    assert weights_sha256(base, STEPS) == weights_sha256(corpus.reference, STEPS)
    assert step_losses(base) == step_losses(corpus.reference)
    # The relaunch recorded what the kill cost: from the step it resumed at to the last step logged.
    (record,) = [json.loads(line) for line in (base / "runs" / "test-tiny" / "interruptions.jsonl").open()]
    assert record["cause"] == "killed" and record["resumed_step"] == max(saved)
    assert 39 <= record["reached_step"] <= 40 and record["steps_lost"] == record["reached_step"] - max(saved)
    assert record["launch_to_first_step_s"] >= record["restore_s"] + record["data_s"] > 0
    assert "event=interruption stage=base cause=killed" in second
    startup = next(line for line in second.splitlines() if "event=startup stage=base" in line)
    assert all(f" {phase}=" in startup for phase in ("launch_to_first_step_s", "restore_s", "data_s",
                                                     "compile_s", "first_step_s", "other_s"))
