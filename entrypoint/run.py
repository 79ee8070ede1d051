"""`phoenix run`: the trainer container's entrypoint; running it again is the whole recovery procedure.

In order: preflight (one line per problem, before any download or launch), an exclusive lock on the
volume for MODEL_TAG, a new generation on the Hub, restore from the Hub when the volume lacks the
latest checkpoint, tokenizer and first shards, then base pretraining and (RUN_SFT=1) SFT under
torchrun, each skipped once its final checkpoint is marked done. SIGTERM/SIGINT go to the workers,
which write an emergency checkpoint and exit 0. The trainer status file tells the sidecar when to do
its last push.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import click

from entrypoint.hub import HubError, HubFatal, claim_generation, local_generation
from entrypoint.logs import redact, setup_logging
from entrypoint.preflight import PreflightError, RunConfig, nproc_for, preflight, visible_gpus
from entrypoint.procs import descendants, signal_pids
from entrypoint.volume import StatusFile, VolumeLock
from trainer import checkpoint_layout as layout

log = logging.getLogger("phoenix.run")


# ---------------------------------------------------------------------------------------------------
# Launch


def torchrun_command(cfg: RunConfig, module: str, nproc: int, args: list[str]) -> list[str]:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if cfg.nnodes > 1:
        # c10d rendezvous; node 0 hosts the store so the others always know where it is.
        command += [f"--nnodes={cfg.nnodes}", f"--node_rank={cfg.node_rank}", "--rdzv_backend=c10d",
                    f"--rdzv_endpoint={cfg.master_addr}:{cfg.master_port}", f"--rdzv_id={cfg.model_tag}",
                    f"--rdzv_conf=is_host={int(cfg.node_rank == 0)}"]
    else:
        command += ["--standalone"]
    return [*command, "-m", module, "--preset", cfg.preset, *args]


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the parent (this entrypoint) dies, however it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Launcher:
    """Runs torchrun; a stop signal goes to the workers (not torchrun, which would SIGKILL them in 30 s)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.stop_requested = False

    def on_signal(self, signum: int, _frame: Any) -> None:
        self.stop_requested = True
        log.warning("received %s: asking the workers for an emergency checkpoint",
                    signal.Signals(signum).name)
        if self.proc is not None and self.proc.poll() is None:
            signal_pids(descendants(self.proc.pid), signal.SIGTERM)

    def run(self, command: list[str], env: dict[str, str], lock: VolumeLock) -> int:
        log.info("launch %s", " ".join(command))
        # torchrun inherits the lock (held until it exits, even if we die first) and dies with us; its
        # workers exit when it does (trainer.train's orphan watchdog).
        self.proc = subprocess.Popen(command, env=env, pass_fds=(lock.fileno(),), preexec_fn=_die_with_parent)
        try:
            return self.proc.wait()
        finally:
            self.proc = None


def stage_done(cfg: RunConfig, stage: str) -> bool:
    ckpt = layout.latest(layout.stage_dir(cfg.base_dir, stage, cfg.model_tag))
    return ckpt is not None and ckpt.done


def run(cfg: RunConfig) -> int:
    problems = preflight(cfg)
    if problems:
        raise PreflightError("\n".join(problems))
    lock = VolumeLock(cfg.base_dir / "runs" / cfg.model_tag / f"trainer.node{cfg.node_rank}.lock")
    lock.acquire()
    launcher = Launcher()
    signal.signal(signal.SIGTERM, launcher.on_signal)
    signal.signal(signal.SIGINT, launcher.on_signal)
    generation = local_generation(cfg.hub)
    if cfg.hub.repo_id and cfg.node_rank == 0:
        try:
            generation = claim_generation(cfg.hub)
        except HubError as exc:
            log.warning("could not claim a generation on the Hub (%s): the sidecar stays fenced until a "
                        "relaunch claims one", redact(str(exc)))
    status = StatusFile(cfg, generation)
    status.start()
    outcome = "failed"
    try:
        code = _stages(cfg, launcher, status, lock)
        outcome = "stopped" if launcher.stop_requested else ("finished" if code == 0 else "failed")
        return code
    finally:
        status.close(outcome)
        lock.release()
        log.info("phoenix run %s", outcome)


def _stages(cfg: RunConfig, launcher: Launcher, status: StatusFile, lock: VolumeLock) -> int:
    if cfg.node_rank == 0:
        if cfg.hub.repo_id:
            status.set(phase="restore")
            from entrypoint.restore import restore

            try:
                restore(cfg.hub)
            except HubFatal:
                raise
            except HubError as exc:
                log.warning("Hub unreachable for restore (%s): continuing from the volume", redact(str(exc)))
        else:
            log.info("HF_REPO_ID not set: Hub sync and restore are off")
        status.set(phase="prepare")
        from trainer.train import parse_config, prepare_data

        prepare_data(parse_config(["--preset", cfg.preset, *cfg.train_args]))
    nproc = nproc_for(cfg, visible_gpus())
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(cfg.base_dir), "MODEL_TAG": cfg.model_tag,
           "DEVICE": cfg.device}
    stages = [("base", "trainer.train", cfg.train_args)] + ([("sft", "trainer.sft", cfg.sft_args)]
                                                            if cfg.run_sft else [])
    for stage, module, args in stages:
        if launcher.stop_requested:
            return 0
        if stage_done(cfg, stage):
            log.info("%s stage already finished: skipping it", stage)
            continue
        status.set(phase=stage)
        if stage == "sft" and cfg.node_rank == 0:
            from trainer.sft import parse_sft_config, prepare_sft_data

            prepare_sft_data(parse_sft_config(["--preset", cfg.preset, *args]))
        code = launcher.run(torchrun_command(cfg, module, nproc, args), env, lock)
        if code != 0 or launcher.stop_requested:
            return code
        if not stage_done(cfg, stage):
            log.error("%s stage exited 0 without a final checkpoint", stage)
            return 1
    status.set(phase="done")
    return 0


@click.command("run", context_settings={"ignore_unknown_options": True})
@click.option("--model-tag", envvar="MODEL_TAG", default="d26-hyperbolic", show_default=True)
@click.option("--preset", envvar="PRESET", default="d26", show_default=True)
@click.option("--nproc-per-node", envvar="NPROC_PER_NODE", type=int, default=None,
              help="Processes per node [default: all visible GPUs]")
@click.option("--run-sft/--no-sft", envvar="RUN_SFT", default=True, show_default=True)
@click.option("--device", envvar="DEVICE", type=click.Choice(["auto", "cuda", "cpu"]), default="auto")
@click.argument("train_args", nargs=-1, type=click.UNPROCESSED)
def run_command(model_tag: str, preset: str, nproc_per_node: int | None, run_sft: bool, device: str,
                train_args: tuple[str, ...]) -> None:
    """Preflight, lock, restore, then base pretraining and SFT under torchrun.

    Base trainer flags go after --; SFT flags in the SFT_ARGS variable."""
    setup_logging(_log_file())
    # Flags override the environment (click already read it as their default): fold them back in.
    environ = {**os.environ, "MODEL_TAG": model_tag, "PRESET": preset, "RUN_SFT": str(int(run_sft)),
               "DEVICE": device, "NPROC_PER_NODE": "" if nproc_per_node is None else str(nproc_per_node)}
    try:
        sys.exit(run(RunConfig.from_env(list(train_args), environ)))
    except (PreflightError, HubFatal) as exc:
        for line in str(exc).splitlines():
            click.echo(f"error: {redact(line)}", err=True)
        sys.exit(2)


def _log_file() -> Path | None:
    base = Path(os.environ.get("NANOCHAT_BASE_DIR", "~/.cache/nanochat")).expanduser()
    # A missing or read-only volume is for preflight to report, not for the log set-up to crash on.
    return base / "logs" / "phoenix_run.log" if base.is_dir() and os.access(base, os.W_OK) else None
