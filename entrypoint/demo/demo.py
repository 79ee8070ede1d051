"""`phoenix demo`: the whole story on a CPU, offline: train, die, lose the volume, come back, same numbers.

A local Hub serves FineWeb-like shards (generated, or your own parquet folder); the tiny preset trains
once uninterrupted. Then again with a sidecar pushing checkpoints to the local Hub's Storage Bucket through
Xet (keeping the last 2; a delete frees storage at once): the trainer is killed with SIGKILL and relaunched
(it resumes from the volume), then the whole instance is lost (trainer and sidecar killed, volume wiped)
and a redeploy restores from the Hub and trains to the end. The demo prints the loss going down, tok/s,
where each run resumed, the storage the Hub counted at its peak and at the end, and whether the runs ended
bit-identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from entrypoint.demo.localhub import LocalHub
from entrypoint.demo.synthetic import write_shards
from entrypoint.launch.procs import descendants, signal_pids
from trainer import checkpoint_layout as layout

DATASET_REPO = "karpathy/fineweb-edu-100b-shuffle"
MODEL_TAG = "demo-tiny"
CHECKPOINT_REPO = "demo/phoenix-demo"
TOKEN = "hf_demoLocalHubToken"  # the local Hub's only token: it never leaves this machine
PHOENIX = [sys.executable, "-m", "entrypoint"]


def _train(base: Path, env: dict[str, str], steps: int, kill_at_step: int | None) -> tuple[int | None, float]:
    """Run the trainer; with `kill_at_step`, SIGKILL the whole process tree when it logs that step."""
    command = [sys.executable, "-m", "trainer.train", "--preset", "tiny", "--num-iterations", str(steps),
               "--save-every", "10", "--eval-every", str(steps // 2)]
    env = {**env, "NANOCHAT_BASE_DIR": str(base), "MODEL_TAG": MODEL_TAG, "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        shown = line.split(" phoenix.train ", 1)[-1].rstrip()
        every_tenth = " | loss " in line and shown.startswith("step ") and shown[9] == "0"
        if every_tenth or "val bpb" in line or "resuming" in line or "error" in line:
            click.echo("    " + shown)
        if kill_at_step is not None and f"step {kill_at_step:05d}/" in line:
            signal_pids([proc.pid, *descendants(proc.pid)], signal.SIGKILL)
            proc.wait()
            return None, time.monotonic() - start
    return proc.wait(), time.monotonic() - start


def _sidecar(base: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    """`phoenix sync` on `base`: pushes every complete checkpoint to the local Hub every 2 seconds."""
    env = {**env, "NANOCHAT_BASE_DIR": str(base), "MODEL_TAG": MODEL_TAG, "HF_SYNC_INTERVAL": "2",
           "HF_KEEP_LAST": "2", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        return subprocess.Popen([*PHOENIX, "sync"], env=env, stdout=out, stderr=subprocess.STDOUT)


def _wait_for_push(log: Path, step: int, timeout: float = 60.0) -> None:
    """Until the sidecar has logged the push of base checkpoint `step` (or `timeout` passes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if f"event=push_done stage=base step={step} " in log.read_text():
            return
        time.sleep(0.2)


def _counted(log: Path) -> tuple[list[int], int]:
    """The storage the Hub counted after each sync pass, and how many checkpoints the sidecar pruned."""
    counted, pruned = [], 0
    for line in log.read_text().splitlines():
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        pruned += fields.get("event") == "pruned"
        if fields.get("event") == "pass_done" and fields.get("counted_bytes", "").isdigit():
            counted.append(int(fields["counted_bytes"]))
    return counted, pruned


def _metrics(base: Path) -> list[dict]:
    path = base / "logs" / f"train_base_{MODEL_TAG}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if '"loss"' in line]


def _weights_sha(base: Path, step: int) -> str:
    path = layout.stage_dir(base, "base", MODEL_TAG) / layout.step_dir_name(step) / "model.safetensors"
    return hashlib.sha256(path.read_bytes()).hexdigest()


@click.command("demo")
@click.option("--workdir", type=click.Path(path_type=Path), default=None,
              help="Where the volumes and the local Hub live (default: a temporary folder).")
@click.option("--shards", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A folder of shard_NNNNN.parquet files (a `text` column) to serve instead.")
@click.option("--steps", default=60, show_default=True, help="Training steps of the tiny model.")
@click.option("--kill-at", default=27, show_default=True, help="Step at which the second run is killed.")
@click.option("--lose-at", default=45, show_default=True, help="Step at which the instance is lost.")
def demo_command(workdir: Path | None, shards: Path | None, steps: int, kill_at: int, lose_at: int) -> None:
    """Train a tiny GPT on CPU, kill -9 it, lose the instance, restore from the Hub, end bit-identical."""
    started = time.monotonic()
    workdir = workdir or Path(tempfile.mkdtemp(prefix="phoenix-demo-"))
    with LocalHub(workdir / "hub", tokens={TOKEN: CHECKPOINT_REPO.split("/")[0]}) as hub:
        if shards is None:
            shards = workdir / "generated_shards"
            write_shards(shards, num_shards=4, docs_per_shard=400)
        files = sorted(shards.glob("shard_*.parquet"))
        hub.publish_dataset(DATASET_REPO, {p.name: p for p in files})
        click.echo(f"local Hub at {hub.url} serving {len(files)} shards as {DATASET_REPO}; workdir {workdir}")
        env = {**os.environ, "HF_ENDPOINT": hub.url, "WANDB_MODE": "offline", "HF_TOKEN": TOKEN,
               "HF_REPO_ID": CHECKPOINT_REPO, "HF_HOME": str(workdir / "hf_home"),
               "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        env.pop("HF_HUB_DISABLE_XET", None)  # checkpoints go up and come back through Xet

        click.echo("\n1) uninterrupted run")
        reference = workdir / "volume_reference"
        code, seconds = _train(reference, env, steps, None)
        if code != 0:
            raise click.ClickException(f"the reference run failed (exit {code})")
        click.echo(f"\n2) same run with a sidecar pushing to the Hub; trainer killed with SIGKILL at step "
                   f"{kill_at}, then relaunched")
        volume = workdir / "volume_lost"
        sidecar_log = workdir / "sidecar.log"
        sidecar = _sidecar(volume, env, sidecar_log)
        _train(volume, env, steps, kill_at)
        survivor = layout.latest(layout.stage_dir(volume, "base", MODEL_TAG))
        click.echo(f"    -- killed; latest complete checkpoint: step {survivor.step if survivor else 0}")
        _train(volume, env, steps, lose_at)
        # The tiny steps outrun a 2 s sync interval; a GPU step does not. Let the sidecar catch up with the
        # newest checkpoint, as it would have on a GPU, so that the redeploy has something recent to restore.
        newest = layout.latest(layout.stage_dir(volume, "base", MODEL_TAG))
        _wait_for_push(sidecar_log, newest.step if newest else 0)
        sidecar.kill()  # the instance is lost: every process dies at once, the volume goes with it
        sidecar.wait()
        shutil.rmtree(volume)
        click.echo(f"    -- instance lost at step {lose_at}: trainer and sidecar killed, volume wiped")

        click.echo("\n3) redeploy on an empty volume: phoenix restore from the Hub, then train to the end")
        restored = subprocess.run([*PHOENIX, "restore"], env={**env, "NANOCHAT_BASE_DIR": str(volume),
                                  "MODEL_TAG": MODEL_TAG}, capture_output=True, text=True)
        back = layout.latest(layout.stage_dir(volume, "base", MODEL_TAG), full_hash=True)
        if restored.returncode != 0 or back is None:
            raise click.ClickException(f"the restore failed: {(restored.stdout + restored.stderr)[-800:]}")
        click.echo(f"    -- restored step {back.step} from the Hub, every sha256 verified")
        code, _ = _train(volume, env, steps, None)
        if code != 0:
            raise click.ClickException(f"the redeployed run failed (exit {code})")
        # The new instance's sidecar pushes the final checkpoint, and prunes (and squashes) the older ones.
        with open(sidecar_log, "a") as out:
            subprocess.run([*PHOENIX, "sync", "--once"], env={**env, "NANOCHAT_BASE_DIR": str(volume),
                           "MODEL_TAG": MODEL_TAG, "HF_KEEP_LAST": "2"}, stdout=out, stderr=subprocess.STDOUT)
        counted, pruned = _counted(sidecar_log)

    metrics = _metrics(reference)
    same = _weights_sha(reference, steps) == _weights_sha(volume, steps)
    resumed = {m["step"]: m["loss"] for m in _metrics(volume)}
    click.echo("\nsummary")
    click.echo(f"  loss            {metrics[0]['loss']:.3f} (step 1) -> {metrics[-1]['loss']:.3f} "
               f"(step {steps})")
    click.echo(f"  tok/s (median)  {statistics.median(m['tok_per_sec'] for m in metrics):,.0f} on CPU")
    click.echo(f"  reference run   {seconds:.1f} s including start-up")
    storage = (f"peak {max(counted) / 1e6:.1f} MB before pruning, now {counted[-1] / 1e6:.1f} MB" if counted
               else "no sync pass finished")
    click.echo(f"  Hub storage     {storage} (HF_KEEP_LAST=2, {pruned} checkpoints pruned)")
    reference_losses = {m["step"]: m["loss"] for m in metrics}
    # The redeployed volume logs only the steps it ran itself (the old volume's logs were lost with it).
    same_losses = bool(resumed) and all(reference_losses.get(step) == loss for step, loss in resumed.items())
    click.echo(f"  per-step losses identical after redeploy: {'yes' if same_losses else 'NO'}")
    click.echo(f"  final weights bit-identical (sha256):    {'yes' if same else 'NO'}")
    click.echo(f"  whole demo      {time.monotonic() - started:.1f} s")
    if not (same and same_losses):
        raise click.ClickException("the resumed run diverged from the uninterrupted one")
