"""What both stage scripts (train.py, sft.py) need around their loop: config, processes, logging.

Each stage stays a top-to-bottom script; this module holds the parts that must behave the same in
both: how flags and environment fill a config, the model's compute set-up, stop signals, the one
all-reduce per step and the log line. Which checkpoint to resume from, how it comes back and how every
rank's share is saved live in trainer.resume; process groups and the sharded optimizer step in
trainer.distributed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import fields
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from trainer import checkpoint_layout as layout
from trainer import fencing, recovery
from trainer.checkpoint import AsyncCheckpointer, CheckpointWriteError
from trainer.data import DataError
from trainer.distributed import Dist, init_distributed
from trainer.out_of_memory import OUT_OF_MEMORY_EXIT_CODE, OutOfMemory
from trainer.recovery import StartupClock
from trainer.save_policy import parse_save_every

log = logging.getLogger("phoenix.train")

# The seed script's variable names, for the config fields they set.
ENV_NAMES = {"save_every": "SAVE_EVERY", "keep_last": "KEEP_LAST", "model_tag": "MODEL_TAG",
             "device": "DEVICE", "base_dir": "NANOCHAT_BASE_DIR", "wandb_run": "WANDB_RUN"}


class ConfigError(ValueError):
    """Bad input the user can fix: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse refuses a flag with a usage block and `prog: error: ...`: one ConfigError line instead, which
    the stage (or `phoenix run`'s prepare step) prints as its `error:` line and exits 2."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{self.prog}: {message}: see python -m {self.prog} --help")


def config_from_flags(config_class: type, argv: list[str] | None, prog: str,
                      presets: dict[str, dict[str, Any]], env_names: dict[str, str]) -> Any:
    """Defaults < preset < environment (the seed script's names) < flags, for a stage's config dataclass.

    Every field but preset/compile/allow_fresh_start becomes a `--field-name` flag of its own type.
    """
    parser = _Parser(prog=prog)
    parser.add_argument("--preset", default=os.environ.get("PRESET", "d26"))
    for field in fields(config_class):
        if field.name not in ("preset", "compile", "allow_fresh_start"):
            parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=None)
    compile_flags = parser.add_mutually_exclusive_group()
    compile_flags.add_argument("--compile", dest="compile", action="store_const", const="on",
                               help="torch.compile on CPU too (default: where it pays: on CUDA, and on CPU "
                                    "from depth-4-sized models up; a tiny run would spend longer compiling "
                                    "than training)")
    compile_flags.add_argument("--no-compile", dest="compile", action="store_const", const="off",
                               help="skip torch.compile, on CUDA too")
    parser.add_argument("--allow-fresh-start", action="store_true",
                        help="start over even though checkpoints exist and none is valid")
    args = parser.parse_args(argv)
    if args.preset not in presets:
        raise ConfigError(f"unknown preset {args.preset!r}: choose one of {', '.join(presets)}")
    cfg = config_class(preset=args.preset, **presets[args.preset])
    for name, var in env_names.items():
        if os.environ.get(var):
            kind = type(getattr(cfg, name))
            try:
                setattr(cfg, name, kind(os.environ[var]))
            except ValueError:
                raise ConfigError(f"{var}={os.environ[var]!r} is not a {kind.__name__}: fix it") from None
    for field in fields(config_class):
        value = getattr(args, field.name, None)
        if value is not None and field.name != "preset":
            setattr(cfg, field.name, value)
    cfg.compile = args.compile or "auto"
    cfg.allow_fresh_start = args.allow_fresh_start
    cfg.base_dir = str(Path(cfg.base_dir).expanduser())
    try:
        parse_save_every(cfg.save_every)
    except ValueError as exc:
        raise ConfigError(f"{exc}: set SAVE_EVERY (or --save-every) to e.g. 250, or auto") from None
    return cfg


# ---------------------------------------------------------------------------------------------------
# Processes


def stage_main(parse: Callable[[list[str] | None], Any], body: Callable[[Any, Dist], int],
               argv: list[str] | None = None) -> int:
    """Run a stage: user errors become one `error:` line (exit 2 for config, 1 otherwise), not a trace; an
    out-of-memory its report line (trainer.out_of_memory)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s",
                        stream=sys.stdout)
    for chatty in ("httpx", "httpx2", "huggingface_hub", "datasets", "filelock"):
        logging.getLogger(chatty).setLevel(logging.WARNING)  # one line per request drowns the step log
    try:
        cfg = parse(argv)
        keep_compile_caches(cfg.base_dir)
        d = init_distributed(cfg.device)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if not d.is_main:
            logging.getLogger("phoenix").setLevel(logging.WARNING)
        return body(cfg, d)
    except (ConfigError, DataError, CheckpointWriteError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    except fencing.FencedStop as exc:
        if d.is_main:
            print(f"error: {exc}", file=sys.stderr)
        return fencing.FENCED_EXIT_CODE
    except OutOfMemory as exc:  # on any rank: the first report `phoenix run` reads decides the relaunch
        log.error("%s rank=%d", exc.report(), d.rank)
        return OUT_OF_MEMORY_EXIT_CODE
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class StopSignal:
    """SIGTERM/SIGINT (docker stop, or `phoenix run` relaying a cloud's preemption notice) set a flag the
    loop acts on after the step: an emergency checkpoint, then exit."""

    def __init__(self) -> None:
        self.requested = False
        self.requested_at: float | None = None  # time.time() of the first signal
        self.reason = ""
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        if not self.requested:
            self.requested_at, self.reason = time.time(), signal.Signals(signum).name
        self.requested = True
        log.warning("received %s: will write an emergency checkpoint after this step",
                    signal.Signals(signum).name)

    def report_saved(self, step: int, checkpointer: AsyncCheckpointer) -> None:
        """The emergency save's one line: how long it took, and what was left of the preemption notice's
        window (runs/<tag>/preemption.json) when it was published."""
        now, timing = time.time(), checkpointer.timing
        stage_dir = checkpointer.directory  # <base_dir>/<stage>_checkpoints/<model_tag>
        deadline = recovery.notice_deadline(stage_dir.parent.parent, stage_dir.name)
        since_stop = f"{now - self.requested_at:.2f}" if self.requested_at else "-"
        left = f"{deadline - now:.1f}" if deadline else "-"
        log.info("event=emergency_save step=%d reason=%s emergency_save_s=%.2f since_stop_s=%s "
                 "deadline_left_s=%s %s", step, "preemption_notice" if deadline else self.reason,
                 timing.get("total_s", 0.0), since_stop, left,
                 " ".join(f"{k}={v:.2f}" for k, v in timing.items() if k != "total_s"))


# On the CPU, compiling costs about a minute (inductor's C++ builds on 2 cores) and saves a few percent of
# every step from depth 4 up (bench/throughput.py, bench/vs_nanochat.py): that pays for models whose CPU
# runs last hours (depth 4, width 256: 3.4e7 FLOPs per token), never for the tiny preset (1.6e6), whose
# whole demo run is shorter than its compile.
CPU_COMPILE_MIN_FLOPS_PER_TOKEN = 1e7


def compiles(compile_mode: str, device: torch.device, flops_per_token: float = 0.0) -> bool:
    """--compile (on) / --no-compile (off) / neither (auto): compile where it pays, i.e. on CUDA, and on
    the CPU for models of at least CPU_COMPILE_MIN_FLOPS_PER_TOKEN training FLOPs per token."""
    if compile_mode != "auto":
        return compile_mode == "on"
    return device.type == "cuda" or flops_per_token >= CPU_COMPILE_MIN_FLOPS_PER_TOKEN


def compiles_update(compile_mode: str, device: torch.device, flops_per_token: float = 0.0) -> bool:
    """Whether the optimizer's per-parameter update is compiled: with the model, and on the CPU only from
    CPU_COMPILE_MIN_FLOPS_PER_TOKEN up even under --compile. There its graphs (one per parameter shape)
    cost ~55 s of compiling to save ~25 % of the update, which at 512-token CPU batches is half the step
    (depth 4): it pays over a CPU run of hours, not in a tiny run or the tests' compile probes."""
    cpu_pays = device.type == "cuda" or flops_per_token >= CPU_COMPILE_MIN_FLOPS_PER_TOKEN
    return cpu_pays and compiles(compile_mode, device, flops_per_token)


def keep_compile_caches(base_dir: str) -> None:
    """inductor's cache (and Triton's, which inductor keeps inside it per GPU) on the volume, unless the
    user chose a folder: a relaunch on the same volume loads the compiled kernels instead of compiling them
    again. Importing torch._dynamo already set the variable to torch's default (/tmp/torchinductor_<user>,
    lost with the instance), so that value counts as unset; inductor reads it at every compile."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        default = default_cache_dir()
    except ImportError:
        default = None
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(base_dir) / "cache" / "torchinductor")


def compile_seconds() -> float:
    """Wall seconds this process has spent compiling (dynamo and inductor, forward and backward)."""
    try:
        from torch._dynamo.utils import calculate_time_spent

        return float(calculate_time_spent().get("total_wall_time", 0.0))
    except (ImportError, AttributeError):  # a private API: without it the compile counts as the step
        return 0.0


def compute_setup(model: torch.nn.Module, d: Dist, compile_mode: str, dynamic: bool = False
                  ) -> tuple[torch.nn.Module, Any]:
    """(the module to train through, the autocast context): bf16 autocast on CUDA, torch.compile where
    it pays. No DDP wrapper: ranks meet in the optimizer step (trainer.distributed.ShardedOptimizer)."""
    autocast: Any = nullcontext()
    if d.device.type == "cuda" and torch.cuda.get_device_capability(d.device)[0] >= 8:
        autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    compiled = compiles(compile_mode, d.device, model.estimate_flops_per_token())
    train_model = torch.compile(model, dynamic=dynamic) if compiled else model
    return train_model, autocast


def agree(loss_sum: torch.Tensor, stop: StopSignal, checkpointer: AsyncCheckpointer, d: Dist,
          save_due: bool) -> tuple[float, bool, bool]:
    """The one all-reduce per step: (sum of the ranks' losses, whether every rank must stop now, whether
    every rank saves now: rank 0's `save_due`, see trainer.save_policy).

    A failed background checkpoint write on any rank stops every rank, instead of training on unprotected.
    """
    flags = torch.tensor([float(stop.requested), float(checkpointer.failed), float(d.is_main and save_due)],
                         device=d.device)
    flags = torch.cat([loss_sum.float().reshape(1), flags])
    if d.world_size > 1:
        dist.all_reduce(flags)
    if flags[2].item() > 0:
        # The writer threads finish their exchanges first (the process group must outlive them), then the
        # write error is raised where it happened and on rank 0, which publishes.
        checkpointer.wait()
        raise CheckpointWriteError("a checkpoint write failed on another rank (see rank 0's log); stopping")
    return flags[0].item(), flags[1].item() > 0, flags[3].item() > 0


# ---------------------------------------------------------------------------------------------------
# Reporting


class Heartbeat:
    """A small file the container HEALTHCHECK and `phoenix status` read; rewritten at most every 30 s."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.last = 0.0

    def beat(self, **fields: Any) -> None:
        now = time.time()
        if now - self.last >= 30:
            layout.write_json_atomic(self.path, {"time": now, "pid": os.getpid(), **fields})
            self.last = now


class StepReporter:
    """Rank 0's outputs per step: the nanochat-style log line, the metrics JSONL, the heartbeat, W&B."""

    def __init__(self, stage: str, base_dir: str, model_tag: str, d: Dist, flops_per_token: float,
                 wandb_name: str, wandb_id: str, wandb_config: dict[str, Any], startup: StartupClock,
                 resumed: dict[str, Any] | None) -> None:
        """startup: this process's clock since launch; resumed: the metadata of the checkpoint it resumed
        from (None for a fresh start). Its first step logs the start-up and records the interruption."""
        self.stage = stage
        self.base_dir, self.model_tag = base_dir, model_tag
        self.startup, self.resumed = startup, resumed
        self.compiled_before = compile_seconds()  # built just before the loop: what the first step adds
        self.enabled = d.is_main
        self.world_size = d.world_size
        self.flops_per_token = flops_per_token
        self.peak = None
        if d.device.type == "cuda":
            from trainer.hardware import peak_flops

            self.peak = peak_flops(torch.cuda.get_device_name(d.device))
        logs_dir = Path(base_dir) / "logs"
        logs_dir.mkdir(parents=True, exist_ok=True)
        self.heartbeat = Heartbeat(logs_dir / f"heartbeat_{model_tag}.json")
        # Per-step numbers for `phoenix status` and the tests; kept open for the whole run.
        metrics_path = logs_dir / f"train_{stage}_{model_tag}.jsonl"
        self.previous = recovery.last_logged_step(metrics_path) if self.enabled and resumed else None
        self.metrics = open(metrics_path, "a") if self.enabled else None  # noqa: SIM115
        self.first_step = True
        self.wandb = None
        self.sample_rows: list[list[Any]] = []
        if self.enabled and wandb_name and wandb_name != "dummy":
            import wandb

            online = "online" if os.environ.get("WANDB_API_KEY") else "offline"
            mode = os.environ.get("WANDB_MODE") or online
            # The same id on every restart with resume="allow": the dashboard shows one curve per run.
            try:
                self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "phoenix"), name=wandb_name,
                                        id=wandb_id, resume="allow", mode=mode, dir=str(logs_dir),
                                        config=wandb_config)
            except (wandb.errors.AuthenticationError, wandb.errors.UsageError) as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise ConfigError(f"W&B refused the run ({first}): fix WANDB_API_KEY (or WANDB_PROJECT), "
                                  "or unset WANDB_RUN to train without W&B") from None
            log.info("wandb run_id=%s mode=%s", wandb_id, mode)

    def step(self, step: int, num_iterations: int, loss: float, loop_state: dict[str, Any], lrm: float,
             dt: float, tokens: float) -> None:
        loop_state["smooth_loss"] = 0.9 * loop_state["smooth_loss"] + 0.1 * loss
        if not self.enabled:
            return
        debiased = loop_state["smooth_loss"] / (1 - 0.9**step)
        tok_per_sec = tokens / dt
        mfu = 100 * self.flops_per_token * tok_per_sec / (self.peak * self.world_size) if self.peak else None
        log.info("step %05d/%05d (%.2f%%) | loss %.6f | lrm %.2f | dt %.2fms | tok/sec %s | mfu %s | "
                 "total time %.2fm", step, num_iterations, 100 * step / num_iterations, debiased, lrm,
                 dt * 1000, f"{tok_per_sec:,.0f}", f"{mfu:.2f}" if mfu is not None else "-",
                 loop_state["train_time"] / 60)
        now = time.time()
        if self.first_step:
            self._first_step(step, dt)
            if self.resumed:  # this process resumed from the checkpoint of step - 1
                self.metrics.write(json.dumps({"step": step - 1, "event": "resume", "time": now}) + "\n")
        self.first_step = False
        # Wall-clock time lets `phoenix report` line steps up with the sidecar's pushes (sync lag).
        self.metrics.write(json.dumps({"step": step, "loss": loss, "lrm": lrm, "dt": dt,
                                       "tok_per_sec": tok_per_sec, "mfu": mfu,
                                       "elapsed": loop_state["train_time"], "time": now}) + "\n")
        self.metrics.flush()
        if self.wandb:
            self.wandb.log({"train/loss": loss, "train/lrm": lrm, "train/tok_per_sec": tok_per_sec,
                            "train/mfu": mfu}, step=step)
        self.heartbeat.beat(step=step, num_iterations=num_iterations, stage=self.stage,
                            tok_per_sec=tok_per_sec)

    def _first_step(self, step: int, dt: float) -> None:
        """Launch to first step by phase; after a resume, the interruption's cost in the run's history."""
        compiled = compile_seconds()
        startup = self.startup.first_step(dt, compiled, compiled - self.compiled_before)
        log.info("event=startup stage=%s step=%d %s", self.stage, step,
                 " ".join(f"{key}={value:.2f}" for key, value in startup.items()))
        if self.resumed:
            record = recovery.interruption(self.stage, self.resumed, self.previous, startup, self.world_size)
            recovery.append(self.base_dir, self.model_tag, record)
            log.info("event=interruption stage=%s cause=%s resumed_step=%d steps_lost=%d lost_compute_s=%.1f "
                     "gpu_s_lost=%.1f", self.stage, record["cause"], record["resumed_step"],
                     record["steps_lost"], record["lost_compute_s"], record["gpu_s_lost"])

    def value(self, step: int, name: str, value: float) -> None:
        """An evaluation result, e.g. ("val_bpb", 0.81)."""
        log.info("step %05d | %s %.6f", step, name.replace("_", " "), value)
        if self.metrics:
            self.metrics.write(json.dumps({"step": step, name: value}) + "\n")
        if self.wandb:
            self.wandb.log({name.replace("_", "/", 1): value}, step=step)

    def samples(self, step: int, completions: list[tuple[str, str]]) -> None:
        """Completions of the fixed sample prompts: one line each (JSON-quoted, so newlines stay on it)."""
        for prompt, completion in completions:
            log.info("step %05d | sample %s -> %s", step, json.dumps(prompt), json.dumps(completion))
        if self.wandb:
            import wandb

            # A W&B table is immutable: log the whole history so the latest one shows every step so far.
            self.sample_rows += [[step, prompt, completion] for prompt, completion in completions]
            self.wandb.log({"samples": wandb.Table(columns=["step", "prompt", "completion"],
                                                   data=self.sample_rows)}, step=step)

    def close(self) -> None:
        if self.metrics:
            self.metrics.close()
        if self.wandb:
            self.wandb.finish()
