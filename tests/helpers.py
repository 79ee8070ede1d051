"""Helpers for tests that run the real trainer as processes: launch, watch the log, kill, compare."""

from __future__ import annotations

import hashlib
import json
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from entrypoint.demo.synthetic import write_shards
from entrypoint.launch.procs import descendants, signal_pids
from trainer import checkpoint_content as content
from trainer import checkpoint_layout as layout

DATASET_REPO = "karpathy/fineweb-edu-100b-shuffle"
MODEL_TAG = "test-tiny"


def publish_corpus(server, tmp_dir: Path, num_shards: int = 4, docs_per_shard: int = 300) -> None:
    """Generate tiny FineWeb-like shards and publish them on the local Hub under the real repo id."""
    paths = write_shards(tmp_dir, num_shards, docs_per_shard)
    server.publish_dataset(DATASET_REPO, {p.name: p for p in paths})


def client_env(server, root: Path) -> dict[str, str]:
    """The environment of a process whose Hub is the local `server` (cache under `root`), W&B offline."""
    import os

    return {**os.environ, "HF_ENDPOINT": server.url, "HF_HOME": str(root / "hf_home"),
            "HF_HUB_DISABLE_TELEMETRY": "1", "WANDB_MODE": "offline"}


def tiny_job(hub, tmp_path: Path, **extra: str) -> tuple[dict[str, str], Path]:
    """Environment of a tiny CPU `phoenix run` with Hub sync configured on `hub`, and its (empty) volume."""
    publish_corpus(hub.server, tmp_path / "shards")
    volume = tmp_path / "volume"
    volume.mkdir()
    env = {**hub.env, "NANOCHAT_BASE_DIR": str(volume), "MODEL_TAG": MODEL_TAG, "PRESET": "tiny",
           "DEVICE": "cpu", "RUN_SFT": "0", "HF_REPO_ID": f"{hub.user}/checkpoints", "WANDB_MODE": "offline",
           **extra}
    return env, volume


def checkpoint_meta(step: int, stage: str = "base", **extra: Any) -> dict[str, Any]:
    """A meta.json the checkpoint contract accepts (each key it asks for, blank): synthetic checkpoints."""
    return {**content.blank_meta(step, stage), **extra}


# What a synthetic checkpoint holds: the required files and the optimizer state in one gathered file.
SYNTHETIC_FILES = (*content.REQUIRED_FILES, content.GATHERED_OPTIMIZER)


def fill_checkpoint(tmp: Path, step: int, stage: str = "base", **meta: Any) -> None:
    """Make a synthetic checkpoint being written in `tmp` complete: meta.json (`checkpoint_meta`) and a small
    tensor file, unique to the file, step and stage, for each required one missing."""
    import numpy as np
    from safetensors.numpy import save_file

    for name in SYNTHETIC_FILES:
        if name.endswith(".safetensors") and not (tmp / name).exists():
            save_file({"t": np.full(4, step)}, str(tmp / name), {"stage": stage, "file": name})
    (tmp / layout.META_NAME).write_text(json.dumps(checkpoint_meta(step, stage, **meta)))


def rot_on_hub(hub, repo_id: str, path: str) -> None:
    """Bit rot behind the Hub's back: the tree still announces the right sha256, one byte is wrong."""
    from huggingface_hub import HfApi

    entry = next(f for f in HfApi(endpoint=hub.url, token=hub.token).list_repo_tree(repo_id, recursive=True)
                 if f.path == path)
    blob = hub.server.data_dir / "blobs" / entry.lfs.sha256
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))


def stage_command(module: str, nproc: int, *args: str) -> list[str]:
    """A stage script (trainer.train, trainer.sft) on the tiny preset, directly or under torchrun."""
    command = ["-m", module, "--preset", "tiny", *args]
    if nproc == 1:
        return [sys.executable, *command]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*launcher, *command]


def kill_tree(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """What an instance dying does: every process of the run gets SIGKILL at once."""
    signal_pids([proc.pid, *descendants(proc.pid)], sig)
    proc.wait()


def run_trainer(base: Path, env: dict[str, str], *args: str, nproc: int = 1, module: str = "trainer.train",
                **kill: Any) -> tuple[int | None, str]:
    """Run a stage script directly (as torchrun would); see run_process for the kill options."""
    env = {**env, "NANOCHAT_BASE_DIR": str(base), "MODEL_TAG": MODEL_TAG}
    # SIGTERM under torchrun goes to the workers, as `phoenix run` does for docker stop.
    return run_process(stage_command(module, nproc, *args), env, signal_workers=nproc > 1, **kill)


def run_sft(base: Path, env: dict[str, str], *args: str, **kw: Any) -> tuple[int | None, str]:
    return run_trainer(base, env, *args, module="trainer.sft", **kw)


def run_phoenix(env: dict[str, str], *args: str, **kill: Any) -> tuple[int | None, str]:
    """Run the `phoenix` CLI (e.g. "run", "--", trainer flags) as its own process."""
    return run_process([sys.executable, "-m", "entrypoint", *args], env, **kill)


def run_process(command: list[str], env: dict[str, str], kill_when: Callable[[str], bool] | None = None,
                kill_after_s: float | None = None, sig: int = signal.SIGKILL, signal_workers: bool = False,
                timeout: float = 240) -> tuple[int | None, str]:
    """Run `command`, reading its output; on a matching line or after a delay either SIGKILL the whole
    process tree (None is returned: what an instance dying does) or send `sig` and let it finish."""
    env = {**env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=lambda: [*map(lines.put, proc.stdout), lines.put(None)], daemon=True).start()
    seen: list[str] = []
    start = time.monotonic()
    while True:
        try:
            line = lines.get(timeout=0.02)
        except queue.Empty:
            line = ""
        if line is None:
            return proc.wait(), "".join(seen)
        if line:
            seen.append(line)
        if line and kill_when is not None and kill_when(line):
            if sig == signal.SIGKILL:
                kill_tree(proc)
                return None, "".join(seen)
            signal_pids(descendants(proc.pid) if signal_workers else [proc.pid], sig)
            kill_when = None
        elapsed = time.monotonic() - start
        if kill_after_s is not None and elapsed >= kill_after_s:
            kill_tree(proc)
            return None, "".join(seen)
        if elapsed > timeout:
            kill_tree(proc)
            raise TimeoutError("process did not finish in time:\n" + "".join(seen[-30:]))


def step_losses(base: Path, stage: str = "base") -> dict[int, float]:
    """Per-step global loss; a step logged again after a resume keeps its last value."""
    losses = {}
    for line in (base / "logs" / f"train_{stage}_{MODEL_TAG}.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            losses[record["step"]] = record["loss"]
    return losses


def checkpoint_dir(base: Path, stage: str = "base") -> Path:
    return layout.stage_dir(base, stage, MODEL_TAG)


def plant_edited_checkpoint(source: layout.Checkpoint, into: Path, edit: Callable[[dict[str, Any]], None]
                            ) -> None:
    """Copy a complete checkpoint into the stage folder `into` with its meta.json changed by `edit` and its
    manifest rewritten to match: a checkpoint as an older phoenix wrote it, complete and verified."""
    target = into / source.path.name
    shutil.copytree(source.path, target)
    meta = json.loads((target / layout.META_NAME).read_text())
    edit(meta)
    (target / layout.META_NAME).write_text(json.dumps(meta))
    manifest = layout.read_manifest(target)
    layout.write_manifest(target, manifest["step"],
                          **{k: v for k, v in manifest.items() if k not in ("format", "step", "files")})


def weights_sha256(base: Path, step: int, stage: str = "base") -> str:
    path = checkpoint_dir(base, stage) / layout.step_dir_name(step) / "model.safetensors"
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real small disk at `path` (root mounts a tmpfs), unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    assert mounted.returncode == 0, f"this test needs root to mount a small tmpfs: {mounted.stderr}"
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path) -> None:
    """Take every free byte of `disk` (a file named filler)."""
    with open(disk / "filler", "wb", buffering=0) as f, suppress(OSError):
        while f.write(bytes(65536)):
            pass


def seed_volume(template: Path, base: Path) -> None:
    """A volume that already has the tokenizer and shards (as after a first run), to save time."""
    import shutil

    base.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer", "base_data"):
        shutil.copytree(template / name, base / name)


# --- SFT stage ---------------------------------------------------------------------------------------

SFT_DATASET_REPO = "HuggingFaceTB/smol-smoltalk"
_THINGS = ("apple", "river", "garden", "planet", "engine", "forest", "signal", "bridge", "ocean", "cloud",
           "lesson", "market")
_COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black")
_WORDS = ("quiet", "rapid", "gentle", "heavy", "bright", "simple", "distant", "curious", "careful", "ancient")


def chat_conversations(count: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """Templated chats a tiny model can learn: every answer is a fixed function of its question.

    Some start with a system message and some have a second exchange, so masks cover every shape.
    """
    import random

    rng = random.Random(seed)
    conversations = []
    for _ in range(count):
        messages = []
        if rng.random() < 0.25:
            messages.append({"role": "system", "content": "You are a helpful assistant."})
        thing = rng.choice(_THINGS)
        if rng.random() < 0.5:
            color = _COLORS[_THINGS.index(thing) % len(_COLORS)]
            messages += [{"role": "user", "content": f"What color is the {thing}?"},
                         {"role": "assistant", "content": f"The {thing} is {color}."}]
        else:
            words = " ".join(rng.choices(_WORDS, k=3))
            messages += [{"role": "user", "content": f"Repeat after me: {words} {thing}"},
                         {"role": "assistant", "content": f"{words} {thing}"}]
        if rng.random() < 0.3:
            messages += [{"role": "user", "content": "Thank you!"},
                         {"role": "assistant", "content": "You are welcome."}]
        conversations.append(messages)
    return conversations


def publish_chat_dataset(server, count: int = 200) -> None:
    """Publish chat_conversations(count) as the SFT dataset, one parquet file as on the Hub."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.table({"messages": chat_conversations(count)}), buffer)
    server.publish_dataset(SFT_DATASET_REPO, {"data/train-00000-of-00001.parquet": buffer.getvalue()})


def train_chat_model(server, root: Path, base_steps: int, sft_steps: int,
                     base_env: dict[str, str] | None = None, base_args: tuple[str, ...] = (),
                     sft_args: tuple[str, ...] = ()) -> tuple[dict[str, str], Path, str, str]:
    """A volume (root/volume) with a finished tiny base stage and a finished SFT stage, trained on corpus and
    chats published on `server`: (client env, volume, base output, SFT output)."""

    publish_corpus(server, root / "shards")
    publish_chat_dataset(server)
    env = client_env(server, root)
    volume = root / "volume"
    code, base_out = run_trainer(volume, {**env, **(base_env or {})}, "--num-iterations", str(base_steps),
                                 "--eval-every", "0", *base_args)
    assert code == 0, base_out
    # The tiny base has seen few steps: a larger lr fraction than nanochat's 0.02 shows learning quickly.
    code, sft_out = run_sft(volume, env, "--num-iterations", str(sft_steps), "--init-lr-frac", "0.2",
                            "--eval-every", "0", *sft_args)
    assert code == 0, sft_out
    return env, volume, base_out, sft_out
