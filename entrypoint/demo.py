"""`phoenix demo`: the whole story on a laptop CPU, offline: train, die, come back, same numbers.

A local Hub serves FineWeb-like shards (generated, or your own parquet folder); the tiny preset
trains once uninterrupted, then again with a kill -9 in the middle and a relaunch; the demo prints
the loss going down, tok/s, where the second run resumed, and whether both ended bit-identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from entrypoint.localhub import LocalHub
from entrypoint.procs import descendants, signal_pids
from entrypoint.synthetic import write_shards
from trainer import checkpoint_layout as layout

DATASET_REPO = "karpathy/fineweb-edu-100b-shuffle"
MODEL_TAG = "demo-tiny"


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
def demo_command(workdir: Path | None, shards: Path | None, steps: int, kill_at: int) -> None:
    """Train a tiny GPT on CPU, kill -9 it mid-run, resume, and check it ends bit-identical."""
    workdir = workdir or Path(tempfile.mkdtemp(prefix="phoenix-demo-"))
    with LocalHub(workdir / "hub") as hub:
        if shards is None:
            shards = workdir / "generated_shards"
            write_shards(shards, num_shards=4, docs_per_shard=400)
        files = sorted(shards.glob("shard_*.parquet"))
        hub.publish_dataset(DATASET_REPO, {p.name: p for p in files})
        click.echo(f"local Hub at {hub.url} serving {len(files)} shards as {DATASET_REPO}; workdir {workdir}")
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "WANDB_MODE": "offline",
               "HF_HOME": str(workdir / "hf_home"), "HF_HUB_DISABLE_TELEMETRY": "1"}

        click.echo("\n1) uninterrupted run")
        reference = workdir / "volume_reference"
        code, seconds = _train(reference, env, steps, None)
        if code != 0:
            raise click.ClickException(f"the reference run failed (exit {code})")
        click.echo(f"\n2) same run, killed with SIGKILL at step {kill_at}, then relaunched")
        volume = workdir / "volume_killed"
        _train(volume, env, steps, kill_at)
        survivor = layout.latest(layout.stage_dir(volume, "base", MODEL_TAG))
        click.echo(f"    -- killed; latest complete checkpoint: step {survivor.step if survivor else 0}")
        code, _ = _train(volume, env, steps, None)
        if code != 0:
            raise click.ClickException(f"the resumed run failed (exit {code})")

    metrics = _metrics(reference)
    same = _weights_sha(reference, steps) == _weights_sha(volume, steps)
    resumed = {m["step"]: m["loss"] for m in _metrics(volume)}
    click.echo("\nsummary")
    click.echo(f"  loss            {metrics[0]['loss']:.3f} (step 1) -> {metrics[-1]['loss']:.3f} "
               f"(step {steps})")
    click.echo(f"  tok/s (median)  {statistics.median(m['tok_per_sec'] for m in metrics):,.0f} on CPU")
    click.echo(f"  reference run   {seconds:.1f} s including start-up")
    same_losses = resumed == {m["step"]: m["loss"] for m in metrics}
    click.echo(f"  per-step losses identical after resume: {'yes' if same_losses else 'NO'}")
    click.echo(f"  final weights bit-identical (sha256):   {'yes' if same else 'NO'}")
    if not (same and same_losses):
        raise click.ClickException("the resumed run diverged from the uninterrupted one")
