"""What interruptions cost a run: per relaunch that resumed an unfinished stage, the steps lost, the
seconds from launch to the first step by phase and the GPU-seconds lost, one JSON line each in
runs/<MODEL_TAG>/interruptions.jsonl.

Torch-free: the trainer's rank 0 appends the line at its first step after a resume; SAVE_EVERY=auto
reads the stage's interruptions from it (trainer.save_policy); `phoenix status` and `phoenix report`
show them. `phoenix run` hands the trainer its own start time and phases (restore from the Hub,
tokenizer and shards) in PHOENIX_LAUNCH; a bare torchrun counts from the worker's process start.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from trainer.jsonl import read_records

NOTICE_FILE = "preemption.json"  # a cloud's notice, written by `phoenix run`'s watch (entrypoint.launch)
LAUNCH_ENV = "PHOENIX_LAUNCH"  # JSON: {"time": epoch seconds, "restore_s": ..., "data_s": ...}
# Launch to first step: restore (Hub, verify, load), data (tokenizer, shards, loader), compile (dynamo
# and inductor during the first step), first_step (the rest of it), other (imports, process start-up,
# process groups, building the model).
PHASES = ("restore_s", "data_s", "compile_s", "first_step_s", "other_s")


def history_path(base_dir: str | os.PathLike, model_tag: str) -> Path:
    return Path(base_dir) / "runs" / model_tag / "interruptions.jsonl"


def notice_path(base_dir: str | os.PathLike, model_tag: str) -> Path:
    return Path(base_dir) / "runs" / model_tag / NOTICE_FILE


def notice_deadline(base_dir: str | os.PathLike, model_tag: str) -> float | None:
    """When the machine goes (epoch seconds), if this launch received a preemption notice that says so:
    the launcher clears the file at start, so one that is there is this launch's."""
    try:
        record = json.loads(notice_path(base_dir, model_tag).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("kind") != "preemption":  # a warning has no deadline
        return None
    deadline = record.get("deadline")
    return float(deadline) if isinstance(deadline, int | float) else None


def read(base_dir: str | os.PathLike, model_tag: str, stage: str | None = None) -> list[dict[str, Any]]:
    """The interruptions recorded so far (of one stage, or all), oldest first; a torn last line is skipped."""
    records = read_records(history_path(base_dir, model_tag))
    return [record for record in records if stage is None or record.get("stage") == stage]


def append(base_dir: str | os.PathLike, model_tag: str, record: dict[str, Any]) -> None:
    path = history_path(base_dir, model_tag)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def stage_history(base_dir: str | os.PathLike, model_tag: str, stage: str) -> tuple[float, int]:
    """(seconds the stage's interruptions cost: lost steps plus relaunches to first step, how many)."""
    records = read(base_dir, model_tag, stage)
    lost = sum(r.get("lost_compute_s", 0.0) + r.get("launch_to_first_step_s", 0.0) for r in records)
    return lost, len(records)


def launch_env(start: float, **phases: float) -> dict[str, str]:
    """The environment a launcher hands the trainer: when it started and how long its own phases took."""
    return {LAUNCH_ENV: json.dumps({"time": start, **{k: round(v, 3) for k, v in phases.items()}})}


def process_start_time() -> float:
    """This process's start, in epoch seconds (Linux /proc; elsewhere: now)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, IndexError, ValueError):
        return time.time()


class StartupClock:
    """Seconds from launch to this process's first step, by phase (PHASES): the stage script calls
    lap(phase) after each stretch of start-up that belongs to a phase, lap() after one that does not."""

    def __init__(self) -> None:
        given = json.loads(os.environ.get(LAUNCH_ENV) or "{}")
        self.launch = float(given.pop("time", 0.0)) or process_start_time()
        self.phases = {name: float(given.get(name, 0.0)) for name in ("restore_s", "data_s")}
        self.mark = time.perf_counter()

    def lap(self, phase: str | None = None) -> None:
        """The time since the last lap goes to `phase` (None: to the rest, other_s)."""
        now = time.perf_counter()
        if phase is not None:
            self.phases[phase] += now - self.mark
        self.mark = now

    def first_step(self, step_s: float, compile_s: float, compile_in_step_s: float) -> dict[str, float]:
        """The breakdown once the first step is done: it took `step_s`, `compile_in_step_s` of it compiling;
        the process compiled `compile_s` in all (also before the step: the device batch's trial steps)."""
        total = time.time() - self.launch
        phases = {**self.phases, "compile_s": compile_s,
                  "first_step_s": max(0.0, step_s - compile_in_step_s)}
        phases["other_s"] = max(0.0, total - sum(phases.values()))
        return {"launch_to_first_step_s": round(total, 3), **{k: round(v, 3) for k, v in phases.items()}}


def last_logged_step(metrics_path: Path) -> dict[str, Any] | None:
    """The last step record ({"step", "elapsed", ...}) of a stage's metrics JSONL: where the previous
    process got to before it stopped or died."""
    return next((record for record in reversed(read_records(metrics_path)) if "loss" in record), None)


def interruption(stage: str, resumed: dict[str, Any], previous: dict[str, Any] | None,
                 startup: dict[str, float], world_size: int) -> dict[str, Any]:
    """One history line. `resumed`: the checkpoint's metadata (step, loop_state, world_size, stopped);
    `previous`: the last step the interrupted process logged; `startup`: StartupClock.first_step()."""
    step = resumed["step"]
    reached = previous["step"] if previous and previous["step"] > step else step
    lost_s = max(0.0, previous["elapsed"] - resumed["loop_state"]["train_time"]) if reached > step else 0.0
    # The lost steps ran on the world size that saved the checkpoint, the relaunch on this one.
    gpu_s = lost_s * resumed["world_size"] + startup["launch_to_first_step_s"] * world_size
    return {"stage": stage, "time": time.time(), "resumed_step": step, "reached_step": reached,
            "steps_lost": reached - step, "cause": "stopped" if resumed.get("stopped") else "killed",
            "lost_compute_s": round(lost_s, 3), **startup, "world_size": world_size,
            "gpu_s_lost": round(gpu_s, 1)}
