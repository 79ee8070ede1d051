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
import fcntl
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from entrypoint.hub import (
    TRAINER_STATUS_FILE,
    HubConfig,
    HubError,
    HubFatal,
    claim_generation,
    local_generation,
)
from entrypoint.logs import redact, setup_logging
from entrypoint.procs import descendants, signal_pids
from trainer import checkpoint_layout as layout

log = logging.getLogger("phoenix.run")

# Presets' model geometry, for the disk-space estimate without importing torch.
_PRESET_GEOMETRY = {"tiny": (2, 32, 2048), "d20": (20, 64, 32768), "d24": (24, 64, 32768),
                    "d26": (26, 64, 32768)}


class PreflightError(Exception):
    """One or more set-up problems, one line each; nothing has been downloaded or launched."""


@dataclass
class RunConfig:
    base_dir: Path
    model_tag: str
    preset: str
    nproc_per_node: int | None  # None: all visible GPUs
    run_sft: bool
    device: str  # auto | cuda | cpu
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int
    wandb_run: str
    hub: HubConfig
    train_args: list[str] = field(default_factory=list)  # base trainer flags (after `--`)
    sft_args: list[str] = field(default_factory=list)  # SFT flags (SFT_ARGS), e.g. "--num-epochs 2"

    @classmethod
    def from_env(cls, train_args: list[str], environ: dict[str, str] | None = None) -> RunConfig:
        env = os.environ if environ is None else environ
        nproc = env.get("NPROC_PER_NODE", "").strip()
        try:
            return cls(
                base_dir=Path(env.get("NANOCHAT_BASE_DIR", "~/.cache/nanochat")).expanduser(),
                model_tag=env.get("MODEL_TAG", "d26-hyperbolic"),
                preset=env.get("PRESET", "d26"),
                nproc_per_node=int(nproc) if nproc else None,
                run_sft=env.get("RUN_SFT", "1").strip().lower() not in ("0", "false", "no", ""),
                device=env.get("DEVICE", "auto"),
                nnodes=int(env.get("NNODES", "1")),
                node_rank=int(env.get("NODE_RANK", "0")),
                master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                master_port=int(env.get("MASTER_PORT", "29500")),
                wandb_run=env.get("WANDB_RUN", ""),
                hub=HubConfig.from_env(env),
                train_args=list(train_args),
                sft_args=shlex.split(env.get("SFT_ARGS", "")),
            )
        except ValueError as exc:
            raise PreflightError(f"bad number in the environment ({exc}): fix NPROC_PER_NODE, NNODES, "
                                 "NODE_RANK or MASTER_PORT") from None


# ---------------------------------------------------------------------------------------------------
# Preflight


def visible_gpus() -> int:
    """GPUs this container can use, without initialising CUDA (nvidia-smi, else torch)."""
    if (visible := os.environ.get("CUDA_VISIBLE_DEVICES")) is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    if shutil.which("nvidia-smi"):
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
        return sum(line.startswith("GPU ") for line in listing.stdout.splitlines())
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def checkpoint_bytes_estimate(cfg: RunConfig) -> int:
    """Bytes of one checkpoint: from the volume if it has one, else from the preset's geometry."""
    for stage in layout.STAGES:
        if ckpt := layout.latest(layout.stage_dir(cfg.base_dir, stage, cfg.model_tag)):
            return ckpt.total_bytes
    depth, aspect, vocab = _PRESET_GEOMETRY.get(cfg.preset, _PRESET_GEOMETRY["d26"])
    width = depth * aspect
    matrices, embeddings = 12 * depth * width**2, 2 * vocab * width
    # fp32 weights + Muon momentum (matrices) + AdamW's two moments (embedding and head).
    return 4 * (matrices + embeddings) + 4 * matrices + 8 * embeddings


def nproc_for(cfg: RunConfig, gpus: int) -> int:
    if cfg.nproc_per_node is not None:
        return cfg.nproc_per_node
    return gpus if gpus and cfg.device != "cpu" else 1


def preflight(cfg: RunConfig, check_hub: bool = True) -> list[str]:
    """Every set-up problem, one line each saying what to do; empty when the run can start."""
    problems = []
    base = cfg.base_dir
    if not base.is_dir():
        problems.append(f"NANOCHAT_BASE_DIR={base} does not exist: mount the persistent volume there "
                        "(or create the folder)")
    elif not os.access(base, os.W_OK | os.X_OK):
        problems.append(f"NANOCHAT_BASE_DIR={base} is not writable by uid {os.getuid()}: fix its ownership "
                        "or permissions")
    else:
        need = 2 * checkpoint_bytes_estimate(cfg)
        free = shutil.disk_usage(base).free
        if free < need:
            problems.append(f"{base} has {free / 2**30:.1f} GiB free, two checkpoints need "
                            f"{need / 2**30:.1f} GiB: free space, lower KEEP_LAST or grow the volume")
    if cfg.preset not in _PRESET_GEOMETRY:
        problems.append(f"PRESET={cfg.preset} is unknown: use one of {', '.join(_PRESET_GEOMETRY)}")
    gpus = visible_gpus()
    if cfg.device == "cuda" and not gpus:
        problems.append("DEVICE=cuda but no GPU is visible: check the NVIDIA runtime / GPU reservation")
    if cfg.device != "cpu" and cfg.nproc_per_node is not None and gpus and cfg.nproc_per_node > gpus:
        problems.append(f"NPROC_PER_NODE={cfg.nproc_per_node} but only {gpus} GPUs are visible: unset it "
                        "to use all of them (resume works on any GPU count)")
    if cfg.device == "auto" and not gpus and cfg.preset != "tiny":
        problems.append(f"no GPU visible for PRESET={cfg.preset}: check the NVIDIA runtime, or set "
                        "DEVICE=cpu to train on the CPU anyway")
    if cfg.nnodes > 1 and not 0 <= cfg.node_rank < cfg.nnodes:
        problems.append(f"NODE_RANK={cfg.node_rank} is outside 0..{cfg.nnodes - 1}: set it per node")
    mode = os.environ.get("WANDB_MODE", "")
    wants_wandb = cfg.wandb_run and cfg.wandb_run != "dummy"
    if wants_wandb and mode == "online" and not os.environ.get("WANDB_API_KEY"):
        problems.append("WANDB_MODE=online but WANDB_API_KEY is not set: add it to .env, or unset WANDB_MODE "
                        "to log offline")
    if check_hub and cfg.hub.repo_id:
        on_volume = base.is_dir() and any(layout.latest(layout.stage_dir(base, stage, cfg.model_tag))
                                          for stage in layout.STAGES)
        problems.extend(hub_problems(cfg.hub, volume_has_checkpoint=on_volume))
    return problems


def hub_problems(hub: HubConfig, volume_has_checkpoint: bool) -> list[str]:
    """Token present and valid, and allowed to write HF_REPO_ID's namespace.

    An unreachable Hub only stops a launch whose volume is empty: then the Hub may hold the run's
    progress and starting over would waste the GPUs. With a checkpoint on the volume training goes on
    and the sidecar catches up later.
    """
    if not hub.token:
        return [f"HF_REPO_ID={hub.repo_id} is set but HF_TOKEN is not: add a write token to .env "
                "(or unset HF_REPO_ID to run without the Hub)"]
    from huggingface_hub import HfApi

    try:
        me = HfApi(endpoint=hub.endpoint, token=hub.token).whoami()
    except Exception as exc:  # one line, whatever the client raised
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            return ["the Hub rejected HF_TOKEN (401): create a write token at huggingface.co/settings/tokens"]
        if volume_has_checkpoint:
            log.warning("cannot reach the Hub (%s): training from the volume; the sidecar pushes later",
                        redact(exc.__class__.__name__))
            return []
        return [f"cannot reach the Hub ({redact(exc.__class__.__name__)}) and the volume has no checkpoint "
                "to resume from: check the network or HF_ENDPOINT (or unset HF_REPO_ID to start without it)"]
    namespace = hub.repo_id.split("/")[0]
    orgs = {org.get("name"): org for org in me.get("orgs", [])}
    if namespace != me.get("name") and namespace not in orgs:
        return [f"HF_TOKEN belongs to {me.get('name')!r}, which cannot write to {hub.repo_id}: use that "
                "namespace or a token of its owner"]
    role = me.get("auth", {}).get("accessToken", {}).get("role")
    if role == "read":
        return ["HF_TOKEN is read-only: create a token with write access"]
    return []


# ---------------------------------------------------------------------------------------------------
# Lock, status, launch


class VolumeLock:
    """flock on the volume: the kernel drops it when its holder dies, so a stale lock is never a problem."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: Any = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held for the life of the run
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown holder"
            handle.close()
            raise PreflightError(f"another phoenix run is training this MODEL_TAG on this volume ({holder}): "
                                 "stop it first, or use another MODEL_TAG") from None
        handle.seek(0)
        handle.truncate()
        since = time.strftime("%Y-%m-%dT%H:%M:%S")
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {since}")
        handle.flush()
        self._file = handle

    def fileno(self) -> int:
        return self._file.fileno()

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class StatusFile:
    """runs/<tag>/trainer_status.json: what the sidecar and `phoenix health` read; refreshed while alive."""

    def __init__(self, cfg: RunConfig, generation: int) -> None:
        self.path = cfg.base_dir / "runs" / cfg.model_tag / TRAINER_STATUS_FILE
        self.generation = generation
        self.state = {"status": "running", "phase": "preflight"}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh, daemon=True, name="status")

    def set(self, **fields: Any) -> None:
        new_phase = fields.get("phase", self.state["phase"]) != self.state["phase"]
        if new_phase or "phase_started" not in self.state:
            self.state["phase_started"] = time.time()
        self.state.update(fields)
        layout.write_json_atomic(self.path, {**self.state, "generation": self.generation,
                                             "updated": time.time(), "pid": os.getpid()})

    def _refresh(self) -> None:
        while not self._stop.wait(30):
            self.set()

    def start(self) -> None:
        self.set()
        self._thread.start()

    def close(self, status: str) -> None:
        self._stop.set()
        self.set(status=status)


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
            _evaluate_if_asked(cfg, stage, status)
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
        _evaluate_if_asked(cfg, stage, status)
    status.set(phase="done")
    return 0


def _evaluate_if_asked(cfg: RunConfig, stage: str, status: StatusFile) -> None:
    """EVAL=1: phoenix eval base/chat on a finished stage, once (see entrypoint.eval)."""
    if os.environ.get("EVAL") == "1" and cfg.node_rank == 0:
        from entrypoint.eval import evaluate_finished_stage

        status.set(phase=f"eval_{stage}")
        evaluate_finished_stage(cfg.base_dir, cfg.model_tag, stage, cfg.device)


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


@click.command("doctor")
def doctor_command() -> None:
    """Check the set-up (volume, GPUs, Hub token, W&B; the Docker engine when run on the host)."""
    from entrypoint.host import docker_problems

    try:
        cfg = RunConfig.from_env([])
        problems = preflight(cfg) + docker_problems(cfg.base_dir)
    except (PreflightError, HubFatal) as exc:
        problems = str(exc).splitlines()
    for line in problems:
        click.echo(f"error: {redact(line)}", err=True)
    if problems:
        sys.exit(2)
    click.echo("ok: volume, GPUs, Hub and W&B settings look right")


@click.command("health")
@click.option("--max-age", default=900, show_default=True, help="Seconds without news before unhealthy.")
def health_command(max_age: int) -> None:
    """Container HEALTHCHECK: the entrypoint is alive and, while training, steps keep coming."""
    base = Path(os.environ.get("NANOCHAT_BASE_DIR", "~/.cache/nanochat")).expanduser()
    tag = os.environ.get("MODEL_TAG", "d26-hyperbolic")
    try:
        status = json.loads((base / "runs" / tag / TRAINER_STATUS_FILE).read_text())
    except (FileNotFoundError, ValueError):
        click.echo("unhealthy: no trainer status yet")
        sys.exit(1)
    now = time.time()
    news = status.get("updated", 0)
    if status.get("phase") in ("base", "sft"):
        # A stage's first step can take a while (compile, shards): count from the phase start.
        heartbeat = base / "logs" / f"heartbeat_{tag}.json"
        beat = json.loads(heartbeat.read_text()).get("time", 0) if heartbeat.exists() else 0
        news = max(beat, status.get("phase_started", 0))
    if status.get("status") == "running" and now - news > max_age:
        click.echo(f"unhealthy: phase {status.get('phase')} silent for {now - news:.0f}s")
        sys.exit(1)
    click.echo(f"healthy: {status.get('status')} phase={status.get('phase')}")


def _log_file() -> Path | None:
    base = Path(os.environ.get("NANOCHAT_BASE_DIR", "~/.cache/nanochat")).expanduser()
    # A missing or read-only volume is for preflight to report, not for the log set-up to crash on.
    return base / "logs" / "phoenix_run.log" if base.is_dir() and os.access(base, os.W_OK) else None
