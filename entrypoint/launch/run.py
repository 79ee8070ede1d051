"""`phoenix run`: the trainer container's entrypoint; running it again is the whole recovery procedure.

In order: preflight (one line per problem, before any download or launch), an exclusive lock on the
volume for MODEL_TAG, a generation on the Hub (claimed unless this volume's is already the newest),
damaged checkpoints moved to quarantine; then, in a child process that a stop ends at once
(entrypoint.launch.prepare), restore from the Hub when the volume lacks the latest checkpoint (waiting for
the Hub rather than starting over when the volume has nothing to resume), tokenizer and first shards;
then base pretraining and (RUN_SFT=1) SFT under torchrun, each skipped once its final checkpoint is marked
done. SIGTERM/SIGINT, and a cloud's preemption notice (launch.preemption), go to the workers, which write
an emergency checkpoint and exit 0. The trainer status file tells the sidecar when to do its last push.

How a launch ends, for `restart: on-failure` (compose.yaml): exit 0 when finished, stopped, or held by
the crash-loop guard (the same failure PHOENIX_MAX_FAILURES launches in a row with the same settings and
no new checkpoint: Docker stops relaunching); exit 1 on a crash (relaunched, resumes); exit 2 on an error
the user must fix, printed as one `error:` line (relaunched with Docker's backoff until the guard holds).
A stage that runs out of GPU memory is relaunched here, with half the device batch, not by Docker.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import click

from entrypoint.hub.client import Hub
from entrypoint.hub.config import local_generation
from entrypoint.hub.errors import HubError, HubFatal, RepoMissing
from entrypoint.hub.stores import claim_generation
from entrypoint.launch.config import PreflightError, RunConfig, nproc_for
from entrypoint.launch.preemption import start_watch
from entrypoint.launch.preflight import gpu_inventory, preflight, visible_gpus
from entrypoint.launch.prepare import EXIT_KINDS, HUB_WAIT_FIRST_S, HUB_WAIT_MAX_S, PHASES_ENV
from entrypoint.launch.torchrun import Launcher, torchrun_command
from entrypoint.launch.volume import (
    DeviceBatchRecord,
    FailureLog,
    LockHeld,
    StatusFile,
    VolumeLock,
    lock_path,
    node0_is_live,
)
from entrypoint.logs import kv, redact, setup_logging
from trainer import checkpoint_layout as layout
from trainer import fencing, recovery

log = logging.getLogger("phoenix.run")

EXIT_CRASH, EXIT_ERROR = 1, 2
# Kinds of failure whose cause a plain relaunch cannot change (they are in the checkpoint or the data,
# not on the machine): a held guard refuses these outright; the others are cheap to check again.
_REFUSED_KINDS = ("stage", "crash")


class RunFailed(Exception):
    """The launch ends on a failure. `kind`: preflight | volume | hub | memory (the machine's) | stage
    (user-fixable) | crash."""

    def __init__(self, line: str, kind: str, printed: bool = False) -> None:
        super().__init__(line)
        self.line, self.kind, self.printed = line, kind, printed


def stage_done(cfg: RunConfig, stage: str) -> bool:
    ckpt = layout.latest(layout.stage_dir(cfg.base_dir, stage, cfg.model_tag))
    return ckpt is not None and ckpt.done


def stopped_elsewhere(cfg: RunConfig, stage: str) -> bool:
    """The stage's newest checkpoint is an emergency one: the workers were stopped, wherever the signal
    came from."""
    ckpt = layout.latest(layout.stage_dir(cfg.base_dir, stage, cfg.model_tag))
    return ckpt is not None and not ckpt.done and bool(ckpt.meta().get("stopped"))


def volume_progress(cfg: RunConfig) -> str:
    """The volume's newest checkpoint per stage: a failure after progress is not "the same" failure."""
    steps = []
    for stage in layout.STAGES:
        ckpt = layout.latest(layout.stage_dir(cfg.base_dir, stage, cfg.model_tag))
        steps.append(f"{stage}={ckpt.step if ckpt else '-'}")
    return ",".join(steps)


# ---------------------------------------------------------------------------------------------------
# The story


def run(cfg: RunConfig) -> int:
    """One launch, with the crash-loop guard around it; returns the exit code."""
    failures = FailureLog(cfg.base_dir, cfg.model_tag, cfg.max_failures, cfg.node_rank)
    held = failures.read()
    if (held and held.get("held") and held.get("kind") in _REFUSED_KINDS
            and held.get("fingerprint") == cfg.fingerprint and held.get("progress") == volume_progress(cfg)):
        click.echo(f"error: {held['error']} (the last {held['count']} launches ended so, with these settings "
                   "and no new checkpoint: not relaunching; fix it, then relaunch)", err=True)
        return 0
    try:
        code = _launch(cfg)
    except PreflightError as exc:
        lines = [redact(line) for line in str(exc).splitlines()]
        for line in lines:
            click.echo(f"error: {line}", err=True)
        return _failed(failures, cfg, RunFailed(lines[0], "preflight", printed=True))
    except HubFatal as exc:
        return _failed(failures, cfg, RunFailed(redact(str(exc)), "preflight"))
    except RunFailed as exc:
        return _failed(failures, cfg, exc)
    failures.clear()
    return code


def _failed(failures: FailureLog, cfg: RunConfig, failure: RunFailed) -> int:
    if not failure.printed:
        click.echo(f"error: {failure.line}", err=True)
    record = failures.record(failure.line, failure.kind, cfg.fingerprint, volume_progress(cfg))
    if record["held"]:
        log.warning(kv(event="crash_loop_guard", failures_in_a_row=record["count"], exit_code=0,
                       action="not relaunching until the settings or the volume change; phoenix status "
                              "and phoenix health show it"))
        return 0
    return EXIT_CRASH if failure.kind == "crash" else EXIT_ERROR


def _launch(cfg: RunConfig) -> int:
    problems = preflight(cfg)
    if problems:
        raise PreflightError("\n".join(problems))
    lock = VolumeLock(lock_path(cfg.base_dir, cfg.model_tag, cfg.node_rank))
    try:
        lock.acquire()  # waits for a `phoenix restore` to end
    except LockHeld as exc:
        raise PreflightError(f"another {exc.command} is training this MODEL_TAG on this volume "
                             f"({exc.description}): stop it first, or use another MODEL_TAG") from None
    launcher = Launcher(_log_file(cfg.base_dir))
    signal.signal(signal.SIGTERM, launcher.on_signal)
    signal.signal(signal.SIGINT, launcher.on_signal)
    # A cloud's preemption notice stops the launch as SIGTERM does, whatever phase it is in.
    watch = start_watch(cfg.preemption_watch, cfg.base_dir, cfg.model_tag, launcher.stop,
                        fresh=cfg.node_rank == 0)
    if cfg.nnodes > 1 and cfg.node_rank != 0:
        _wait_for_node0(cfg, launcher)
    status = StatusFile(cfg, local_generation(cfg.hub))
    _take_generation(cfg, status, launcher)
    status.start()
    outcome, error = "failed", None
    try:
        code = _stages(cfg, launcher, status, lock)
        outcome = {"done": "finished", "fenced": "fenced"}.get(status.state["phase"], "stopped")
        return code
    except RunFailed as exc:
        outcome, error = ("stopped", None) if launcher.stop_requested else ("failed", exc.line)
        if launcher.stop_requested:
            return 0
        raise
    finally:
        if watch is not None:
            watch.close()
        status.set(error=error)
        status.close(outcome)
        lock.release()
        log.info("phoenix run %s", outcome)


def _wait_for_node0(cfg: RunConfig, launcher: Launcher) -> None:
    """A node other than 0 needs node 0's volume (checkpoints, data): see node 0's status file on ours."""
    wait_s = float(os.environ.get("PHOENIX_SHARED_WAIT_S", "60"))
    deadline = time.monotonic() + wait_s
    while not node0_is_live(cfg.base_dir, cfg.model_tag):
        if time.monotonic() > deadline:
            raise PreflightError(f"NANOCHAT_BASE_DIR={cfg.base_dir} is not shared with node 0 (no live "
                                 f"status of node 0 there after {wait_s:.0f}s): mount the same shared folder "
                                 "on every node, and start node 0")
        if launcher.stopping.wait(1.0):
            return


def _take_generation(cfg: RunConfig, status: StatusFile, launcher: Launcher) -> None:
    """Fence off older launches: claim a new generation unless this volume's is already the Hub's newest
    (a relaunch on the same volume then adds no Hub commit). A claim the Hub does not answer is retried
    in the background, so the sidecar is not left fenced for the whole run."""
    if not cfg.hub.repo_id or cfg.node_rank != 0:
        return
    try:
        hub = Hub(cfg.hub)
        if status.generation:
            try:
                newest = hub.generation(hub.snapshot())
            except RepoMissing:
                newest = -1
            if newest == status.generation:
                log.info(kv(event="generation_kept", generation=newest, reason="still the Hub's newest"))
                return
        status.generation = claim_generation(cfg.hub, hub)
    except HubFatal:
        raise
    except HubError as exc:
        log.warning(kv(event="generation_claim_failed", error=redact(str(exc)),
                       action="retrying in the background; the sidecar waits for it"))
        threading.Thread(target=_claim_until_it_lands, args=(cfg, status, launcher), daemon=True,
                         name="claim").start()


def _claim_until_it_lands(cfg: RunConfig, status: StatusFile, launcher: Launcher) -> None:
    wait = HUB_WAIT_FIRST_S
    while not launcher.stopping.wait(wait):
        try:
            status.generation = claim_generation(cfg.hub)
        except HubError as exc:
            wait = min(2 * wait, HUB_WAIT_MAX_S)
            log.warning(kv(event="generation_claim_failed", error=redact(str(exc)), retry_in_s=round(wait)))
            continue
        status.set()
        return


def _stages(cfg: RunConfig, launcher: Launcher, status: StatusFile, lock: VolumeLock) -> int:
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(cfg.base_dir), "MODEL_TAG": cfg.model_tag,
           "DEVICE": cfg.device, "RUN_SFT": str(int(cfg.run_sft))}
    # This launch's own phases, handed to the first stage it starts, which then counts its time to first
    # step from this process's start (trainer.recovery).
    phases, launched = {"restore_s": 0.0, "data_s": 0.0}, recovery.process_start_time()
    if cfg.node_rank == 0:
        status.set(phase="verify")
        for stage in layout.STAGES:
            # A damaged step the run would save again (or a damaged final one) blocks it forever.
            layout.latest_or_quarantine(layout.stage_dir(cfg.base_dir, stage, cfg.model_tag))
        if launcher.stop_requested:  # a stop (a preemption notice) before the restore: nothing to save
            return 0
        if cfg.hub.repo_id or not stage_done(cfg, "base"):
            status.set(phase="prepare")  # restore from the Hub, then the base stage's data
            phases = _prepare(cfg, launcher, lock, env, "base", cfg.train_args)
        if not cfg.hub.repo_id:
            log.info("HF_REPO_ID not set: Hub sync and restore are off")
    nproc = nproc_for(cfg, visible_gpus())
    stages = [("base", "trainer.train", cfg.train_args)] + ([("sft", "trainer.sft", cfg.sft_args)]
                                                            if cfg.run_sft else [])
    for stage, module, args in stages:
        if launcher.stop_requested:
            return 0
        if stage_done(cfg, stage):
            log.info("%s stage already finished: skipping it", stage)
            _evaluate_if_asked(cfg, stage, status)
            continue
        status.set(phase=stage)
        if stage == "sft" and cfg.node_rank == 0:
            phases["data_s"] += _prepare(cfg, launcher, lock, env, "sft", args)["data_s"]
            if launcher.stop_requested:
                return 0
        stage_env = env
        if launched:  # the first stage of this launch; a later one counts from its own start
            stage_env, launched = {**env, **recovery.launch_env(launched, **phases)}, 0.0
        code = _launch_stage(cfg, launcher, lock, stage_env, stage, module, nproc, args)
        if launcher.stop_requested:
            return 0
        if fencing.fenced_by(cfg.base_dir, cfg.model_tag) is not None:
            # The workers printed the one line; exit 0, since a relaunch would take the run back.
            status.set(phase="fenced")
            return 0
        if code != 0 and launcher.error is not None:
            raise RunFailed(launcher.error, "stage", printed=True)
        if code != 0:
            raise RunFailed(launcher.last_exception or f"{stage} stage exited with code {code}", "crash")
        if stopped_elsewhere(cfg, stage):
            # A stop that reached another node (or process) first: the ranks agreed on an emergency
            # checkpoint, and this node's entrypoint ends as stopped too, to resume with the others.
            log.info("%s stage stopped with an emergency checkpoint: exiting for resume", stage)
            return 0
        if not stage_done(cfg, stage):
            raise RunFailed(f"{stage} stage exited 0 without a final checkpoint", "crash")
        _evaluate_if_asked(cfg, stage, status)
    status.set(phase="done")
    return 0


def _launch_stage(cfg: RunConfig, launcher: Launcher, lock: VolumeLock, env: dict[str, str], stage: str,
                  module: str, nproc: int, args: list[str]) -> int:
    """torchrun for one stage; its exit code. After a CUDA out-of-memory the stage is relaunched here, from
    its newest checkpoint, with half the device batch (no Docker round-trip, and nothing for the crash-loop
    guard: each halving is progress), which runs/<tag>/device_batch.json keeps for later launches on the
    same GPUs and settings. Out of memory at one sequence: RunFailed, one line."""
    record = DeviceBatchRecord(cfg.base_dir, cfg.model_tag)
    key = {"gpus": gpu_inventory(cfg.device), "nproc": nproc, "nnodes": cfg.nnodes, "preset": cfg.preset,
           "fp8": env.get("FP8", ""), "args": list(args)}
    size = record.get(stage, key)
    while True:
        launch_args = [*args, "--device-batch-size", str(size)] if size else list(args)
        code = launcher.run(torchrun_command(cfg, module, nproc, launch_args), env, lock)
        oom = launcher.out_of_memory
        if code == 0 or oom is None or launcher.stop_requested:
            return code
        if oom.device_batch_size <= 1:
            usable = f", {oom.card_gib:.1f} GiB usable" if oom.card_gib else ""
            raise RunFailed(f"the {stage} stage ran out of GPU memory at device batch "
                            f"{oom.device_batch_size} (step {oom.step}{usable}): not even one sequence at a "
                            "time fits: use GPUs with more memory, more GPUs (NPROC_PER_NODE: each holds 1/N "
                            "of the optimizer state), a smaller PRESET or a shorter --max-seq-len", "memory")
        size = oom.device_batch_size // 2  # halves every time: the loop ends at 1 at the latest
        record.keep(stage, key, size, oom)
        newest = layout.latest(layout.stage_dir(cfg.base_dir, stage, cfg.model_tag))
        log.warning(kv(event="oom_relaunch", stage=stage, step=oom.step,
                       device_batch_size=oom.device_batch_size, next_device_batch_size=size,
                       resume_from_step=newest.step if newest else 0))


def _prepare(cfg: RunConfig, launcher: Launcher, lock: VolumeLock, env: dict[str, str], stage: str,
             args: list[str]) -> dict[str, float]:
    """Restore (base), resume check and data download in a child process: a stop ends it at once, an error
    is one line, and its exit code says how the crash-loop guard counts it. Returns its phase times."""
    command = [sys.executable, "-m", "entrypoint.launch.prepare", stage, "--preset", cfg.preset, *args]
    with tempfile.TemporaryDirectory(prefix="phoenix-prepare-") as tmp:
        times = Path(tmp) / "phases.json"
        code = launcher.run(command, {**env, PHASES_ENV: str(times)}, lock, to_workers=False)
        phases = json.loads(times.read_text()) if times.is_file() else {"restore_s": 0.0, "data_s": 0.0}
    if code != 0 and not launcher.stop_requested:
        if launcher.error is not None:
            raise RunFailed(launcher.error, EXIT_KINDS.get(code, "stage"), printed=True)
        crash = launcher.last_exception or f"preparing the {stage} stage failed (code {code})"
        raise RunFailed(crash, "crash")
    return phases


def _evaluate_if_asked(cfg: RunConfig, stage: str, status: StatusFile) -> None:
    """EVAL=1: phoenix eval base/chat on a finished stage, once (see entrypoint.tools.eval)."""
    if os.environ.get("EVAL") == "1" and cfg.node_rank == 0:
        from entrypoint.tools.eval import evaluate_finished_stage

        status.set(phase=f"eval_{stage}")
        evaluate_finished_stage(cfg.base_dir, cfg.model_tag, stage, cfg.device)


@click.command("run", context_settings={"ignore_unknown_options": True})
@click.option("--model-tag", help="[env MODEL_TAG; default: d26-hyperbolic]")
@click.option("--preset", help="[env PRESET; default: d26]")
@click.option("--nproc-per-node", help="Processes per node [env NPROC_PER_NODE; default: all visible GPUs]")
@click.option("--run-sft/--no-sft", default=None, help="[env RUN_SFT; default: --run-sft]")
@click.option("--device", help="auto, cuda or cpu [env DEVICE; default: auto]")
@click.argument("train_args", nargs=-1, type=click.UNPROCESSED)
def run_command(model_tag: str | None, preset: str | None, nproc_per_node: str | None, run_sft: bool | None,
                device: str | None, train_args: tuple[str, ...]) -> None:
    """Preflight, lock, restore, then base pretraining and SFT under torchrun.

    Base trainer flags go after --; SFT flags in the SFT_ARGS variable."""
    # Flags override the environment. Values are checked by RunConfig and preflight, not by click, so a
    # malformed one is one `error:` line the crash-loop guard counts.
    flags = {"MODEL_TAG": model_tag, "PRESET": preset, "NPROC_PER_NODE": nproc_per_node, "DEVICE": device,
             "RUN_SFT": None if run_sft is None else str(int(run_sft))}
    environ = {**os.environ, **{name: value for name, value in flags.items() if value is not None}}
    try:
        cfg = RunConfig.from_env(list(train_args), environ)
    except PreflightError as exc:  # an unsafe MODEL_TAG: said before anything is written anywhere
        click.echo(f"error: {redact(str(exc))}", err=True)
        sys.exit(EXIT_ERROR)
    setup_logging(_log_file(cfg.base_dir))
    code = run(cfg)
    # The launch is over: a late stop has nothing left to stop, and Python's own handlers are gone while
    # it exits, so a SIGTERM then would end this process with 143 instead of `code`.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    sys.exit(code)


def _log_file(base: Path) -> Path | None:
    # A missing or read-only volume is for preflight to report, not for the log set-up to crash on.
    return base / "logs" / "phoenix_run.log" if base.is_dir() and os.access(base, os.W_OK) else None
