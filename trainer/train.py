"""Base pretraining, resumable bit for bit: `torchrun --nproc_per_node=N -m trainer.train --preset d26`.

Read top to bottom: configuration, distributed setup, resume decision, model/optimizer/data, then the
loop. Every SAVE_EVERY steps (and at the end, and on SIGTERM) the full trajectory state goes into a
checkpoint: weights, optimizer, step, the loader's exact position on every lane, RNG, loop state and
the W&B run id. Resuming from it, on any world size, continues the same run.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
import uuid
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from trainer import checkpoint_layout as layout
from trainer.checkpoint import AsyncCheckpointer, CheckpointWriteError, load_tensors
from trainer.data import (
    DEFAULT_DATASET_REPO,
    DataError,
    DistributedTokenLoader,
    DocumentSource,
    ShardStore,
    validation_rows,
)
from trainer.model import GPT, config_for_depth, peak_flops
from trainer.optim import HybridOptimizer
from trainer.tokenizer import ensure_tokenizer, load_tokenizer

log = logging.getLogger("phoenix.train")
STAGE = "base"

# Presets: tiny trains on 2 CPU cores in seconds; d20 / d26 are nanochat's speedrun sizes.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(depth=2, aspect_ratio=32, head_dim=32, max_seq_len=128, device_batch_size=4,
                 total_batch_size=1024, vocab_size=2048, num_iterations=200, eval_every=50,
                 eval_tokens=4096, tokenizer_chars=2_000_000),
    "d20": dict(depth=20, aspect_ratio=64, head_dim=128, max_seq_len=2048, device_batch_size=32,
                total_batch_size=524288, vocab_size=32768, num_iterations=-1, eval_every=250,
                eval_tokens=10 * 524288, tokenizer_chars=2_000_000_000),
    "d26": dict(depth=26, aspect_ratio=64, head_dim=128, max_seq_len=2048, device_batch_size=16,
                total_batch_size=524288, vocab_size=32768, num_iterations=-1, eval_every=250,
                eval_tokens=10 * 524288, tokenizer_chars=2_000_000_000),
}


@dataclass
class TrainConfig:
    preset: str = "d26"
    depth: int = 26
    aspect_ratio: int = 64
    head_dim: int = 128
    max_seq_len: int = 2048
    vocab_size: int = 32768
    device_batch_size: int = 16
    total_batch_size: int = 524288
    num_iterations: int = -1  # -1: derive from target_param_data_ratio
    target_param_data_ratio: float = 20.0
    eval_every: int = 250
    eval_tokens: int = 10 * 524288
    tokenizer_chars: int = 2_000_000_000
    embedding_lr: float = 0.2
    unembedding_lr: float = 0.004
    matrix_lr: float = 0.02
    weight_decay: float = 0.0
    warmdown_ratio: float = 0.2
    seed: int = 42
    save_every: int = 250
    keep_last: int = 3
    model_tag: str = "d26-hyperbolic"
    base_dir: str = "~/.cache/nanochat"
    dataset_repo: str = DEFAULT_DATASET_REPO
    wandb_run: str = ""
    compile: bool = True
    device: str = "auto"
    allow_fresh_start: bool = False


class ConfigError(ValueError):
    """Bad input the user can fix: printed as one line, exit code 2."""


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Defaults < preset < environment (the seed script's names) < flags."""
    parser = argparse.ArgumentParser(prog="trainer.train", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=os.environ.get("PRESET", "d26"))
    for field in fields(TrainConfig):
        if field.name in ("preset", "compile", "allow_fresh_start"):
            continue
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=None)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (CUDA only anyway)")
    parser.add_argument("--allow-fresh-start", action="store_true",
                        help="start from step 0 even though checkpoints exist and none is valid")
    args = parser.parse_args(argv)
    if args.preset not in PRESETS:
        raise ConfigError(f"unknown preset {args.preset!r}: choose one of {', '.join(PRESETS)}")
    cfg = TrainConfig(preset=args.preset, **PRESETS[args.preset])
    env = {"save_every": "SAVE_EVERY", "keep_last": "KEEP_LAST", "model_tag": "MODEL_TAG", "device": "DEVICE",
           "base_dir": "NANOCHAT_BASE_DIR", "dataset_repo": "DATASET_REPO", "wandb_run": "WANDB_RUN"}
    for name, var in env.items():
        if os.environ.get(var):
            setattr(cfg, name, type(getattr(cfg, name))(os.environ[var]))
    for field in fields(TrainConfig):
        value = getattr(args, field.name, None)
        if value is not None and field.name != "preset":
            setattr(cfg, field.name, value)
    cfg.compile = not args.no_compile
    cfg.allow_fresh_start = args.allow_fresh_start
    cfg.base_dir = str(Path(cfg.base_dir).expanduser())
    if cfg.total_batch_size % cfg.max_seq_len:
        raise ConfigError(f"--total-batch-size {cfg.total_batch_size} is not a multiple of --max-seq-len "
                          f"{cfg.max_seq_len}: pick a multiple")
    if cfg.save_every <= 0:
        raise ConfigError(f"SAVE_EVERY must be positive, got {cfg.save_every}")
    return cfg


# ---------------------------------------------------------------------------------------------------
# Distributed setup


@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_flag: str) -> Dist:
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    use_cuda = torch.cuda.is_available() if device_flag == "auto" else device_flag == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if "TORCHELASTIC_RUN_ID" in os.environ:
        exit_when_orphaned()
    if world_size > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return Dist(rank, local_rank, world_size, device)


def exit_when_orphaned(poll_s: float = 1.0) -> None:
    """Under torchrun, die with the launcher: workers sit in sessions of their own, so a killed torchrun
    would leave them training (and checkpointing) next to its replacement."""
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="orphan-watchdog", daemon=True).start()


def broadcast(value: Any, d: Dist) -> Any:
    if d.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any, d: Dist) -> list[Any]:
    if d.world_size == 1:
        return [value]
    out: list[Any] = [None] * d.world_size
    dist.all_gather_object(out, value)
    return out


# ---------------------------------------------------------------------------------------------------
# Resume state


def prepare_data(cfg: TrainConfig) -> None:
    """The tokenizer and the first train and validation shards on the volume (idempotent).

    `phoenix run` calls this before launching torchrun, so GPU processes never sit in a barrier (and
    its NCCL timeout) while rank 0 trains a tokenizer.
    """
    store = ShardStore(Path(cfg.base_dir) / "base_data", cfg.dataset_repo)
    ensure_tokenizer(Path(cfg.base_dir) / "tokenizer", lambda: store.iter_texts(cfg.tokenizer_chars),
                     cfg.vocab_size)
    store.path(store.train_shards[0])
    store.path(store.val_shard)


def find_resume_checkpoint(directory: Path, allow_fresh_start: bool) -> layout.Checkpoint | None:
    """The latest complete checkpoint (sha256-verified), None for a fresh run; refuses a bad volume."""
    layout.clean_tmp(directory)
    ckpt = layout.latest(directory, full_hash=True)
    if ckpt is None and layout.step_dirs(directory) and not allow_fresh_start:
        raise ConfigError(f"{directory} has checkpoint directories but none is complete (see warnings "
                          "above): restore from the Hub (phoenix restore) or pass --allow-fresh-start")
    return ckpt


def run_identity(cfg: TrainConfig) -> dict[str, str]:
    """The run's ids (run id, W&B run id), created once per MODEL_TAG and kept on the volume."""
    path = Path(cfg.base_dir) / "runs" / cfg.model_tag / "run.json"
    if path.exists():
        return json.loads(path.read_text())
    identity = {"run_id": uuid.uuid4().hex, "wandb_run_id": uuid.uuid4().hex[:12], "model_tag": cfg.model_tag}
    layout.write_json_atomic(path, identity)
    return identity


def rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    json_part = {"python": [py_version, list(py_state), py_gauss],
                 "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    return json_part, tensors


def set_rng_state(json_part: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    version, state, gauss = json_part["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, *rest = json_part["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------------
# Evaluation and logging


@torch.no_grad()
def evaluate_bpb(model: torch.nn.Module, rows: torch.Tensor, token_bytes: torch.Tensor, batch_size: int,
                 d: Dist, autocast: Any) -> float:
    """Validation bits per byte: vocab-independent, so runs with different tokenizers compare."""
    nats = torch.zeros((), dtype=torch.float64, device=d.device)
    nbytes = torch.zeros((), dtype=torch.float64, device=d.device)
    mine = rows[d.rank::d.world_size]
    for start in range(0, len(mine), batch_size):
        batch = mine[start:start + batch_size].to(d.device)
        x, y = batch[:, :-1], batch[:, 1:]
        with autocast:
            loss = model(x, y, loss_reduction="none").view(-1).double()
        counted = token_bytes[y.reshape(-1)]
        nats += (loss * (counted > 0)).sum()
        nbytes += counted.sum()
    if d.world_size > 1:
        dist.all_reduce(nats)
        dist.all_reduce(nbytes)
    return (nats / (math.log(2) * nbytes)).item()


class Heartbeat:
    """A small file the container HEALTHCHECK and `phoenix status` read; rewritten at most every 30 s."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.last = 0.0

    def beat(self, **fields: Any) -> None:
        now = time.time()
        if now - self.last >= 30 or fields.get("event"):
            layout.write_json_atomic(self.path, {"time": now, "pid": os.getpid(), **fields})
            self.last = now


# ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s",
                        stream=sys.stdout)
    for chatty in ("httpx", "httpx2", "huggingface_hub"):  # one line per HTTP request drowns the step log
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        cfg = parse_config(argv)
        d = init_distributed(cfg.device)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        return train(cfg, d)
    except (ConfigError, DataError, CheckpointWriteError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(cfg: TrainConfig, d: Dist) -> int:
    if not d.is_main:
        logging.getLogger("phoenix").setLevel(logging.WARNING)
    base_dir = Path(cfg.base_dir)
    ckpt_dir = layout.stage_dir(base_dir, STAGE, cfg.model_tag)
    logs_dir = base_dir / "logs"

    # Stop requests (docker stop, preemption notice) are acted on at the end of the current step.
    stop_requested = False

    def request_stop(signum: int, _frame: Any) -> None:
        nonlocal stop_requested
        stop_requested = True
        log.warning("received %s: will write an emergency checkpoint after this step",
                    signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    # --- what to resume from: decided once on rank 0 (hashing is not free), then broadcast -----------
    resume_path = None
    if d.is_main:
        ckpt = find_resume_checkpoint(ckpt_dir, cfg.allow_fresh_start)
        resume_path = str(ckpt.path) if ckpt else None
    resume_path = broadcast(resume_path, d)
    ckpt = layout.verify(Path(resume_path)) if resume_path else None
    meta = ckpt.meta() if ckpt else None
    if ckpt is not None and ckpt.done:
        log.info("base stage already finished at step %d: nothing to do", ckpt.step)
        return 0

    # --- data and tokenizer ---------------------------------------------------------------------------
    if d.is_main:
        prepare_data(cfg)
    if d.world_size > 1:
        dist.barrier()
    store = ShardStore(base_dir / "base_data", cfg.dataset_repo)
    tokenizer = load_tokenizer(base_dir / "tokenizer")

    # --- model ----------------------------------------------------------------------------------------
    model_config = config_for_depth(cfg.depth, tokenizer.vocab_size, cfg.max_seq_len, cfg.aspect_ratio,
                                    cfg.head_dim)
    if meta is not None and meta["model_config"] != asdict(model_config):
        raise ConfigError(f"{ckpt.path} holds a model {meta['model_config']}, this run asks for "
                          f"{asdict(model_config)}: use the same preset/flags or another MODEL_TAG")
    seed_everything(cfg.seed)
    with torch.device("meta"):
        model = GPT(model_config)
    model.to_empty(device=d.device)
    model.init_weights()
    optimizer = HybridOptimizer(model, unembedding_lr=cfg.unembedding_lr, embedding_lr=cfg.embedding_lr,
                                matrix_lr=cfg.matrix_lr, weight_decay=cfg.weight_decay,
                                warmdown_ratio=cfg.warmdown_ratio)
    num_params = model.num_params()
    flops_per_token = model.estimate_flops_per_token()
    num_iterations = cfg.num_iterations
    if num_iterations <= 0:
        num_iterations = int(cfg.target_param_data_ratio * num_params) // cfg.total_batch_size
    if meta is not None and meta["num_iterations"] != num_iterations:
        if meta["step"] >= num_iterations:
            raise ConfigError(f"{ckpt.path} is at step {meta['step']}, past the new horizon of "
                              f"{num_iterations} steps: set --num-iterations above {meta['step']}")
        log.warning("horizon changed from %d to %d steps: the schedule follows the new horizon",
                    meta["num_iterations"], num_iterations)

    # --- batch geometry: the global batch is fixed; accumulation absorbs the world size ---------------
    num_lanes = cfg.total_batch_size // cfg.max_seq_len
    if num_lanes % d.world_size:
        raise ConfigError(f"{num_lanes} sequences per step do not split over {d.world_size} processes: "
                          f"set NPROC_PER_NODE to a divisor of {num_lanes}")
    per_rank = num_lanes // d.world_size
    # Largest micro-batch <= the requested one that divides this rank's rows (a GPU count change).
    device_batch_size = max(b for b in range(1, min(cfg.device_batch_size, per_rank) + 1) if not per_rank % b)
    if device_batch_size != cfg.device_batch_size:
        log.info("device batch %d -> %d so that %d sequences per rank split evenly", cfg.device_batch_size,
                 device_batch_size, per_rank)

    # --- restore the trajectory state -----------------------------------------------------------------
    step = 0
    loop_state = {"smooth_loss": 0.0, "min_val_bpb": float("inf"), "train_time": 0.0}
    lane_state = None
    identity = broadcast(run_identity(cfg) if d.is_main else None, d)
    if ckpt is not None:
        model.load_state_dict(load_tensors(ckpt, "model.safetensors"))
        optimizer.load_state_tensors({k: v.to(d.device) if v.dim() else v
                                      for k, v in load_tensors(ckpt, "optimizer.safetensors").items()})
        if meta["total_batch_size"] != cfg.total_batch_size or meta["max_seq_len"] != cfg.max_seq_len:
            raise ConfigError(f"{ckpt.path} was trained with total batch {meta['total_batch_size']} x seq "
                              f"{meta['max_seq_len']}; keep them to resume exactly")
        step = meta["step"]
        loop_state = meta["loop_state"]
        lane_state = [tuple(p) for p in meta["loader"]["lanes"]]
        identity = {**identity, "wandb_run_id": meta["wandb_run_id"], "run_id": meta["run_id"]}
        rng_tensors = load_tensors(ckpt, "rng.safetensors")
        if d.rank < meta["world_size"]:
            set_rng_state(meta["rng"][d.rank], {k.split(".", 1)[1]: v for k, v in rng_tensors.items()
                                                 if k.startswith(f"rank{d.rank}.")})
        else:  # a rank that did not exist before: its RNG is unused by training, seed it reproducibly
            seed_everything(cfg.seed + 1000 * step + d.rank)
        log.info("resuming from step=%d path=%s saved_world_size=%d world_size=%d", step, ckpt.path,
                 meta["world_size"], d.world_size)
    else:
        log.info("fresh start: no checkpoint in %s", ckpt_dir)

    docs = DocumentSource(store, tokenizer, num_lanes, range(d.rank * per_rank, (d.rank + 1) * per_rank))
    loader = DistributedTokenLoader(docs, cfg.max_seq_len, device_batch_size, num_lanes, d.rank,
                                    d.world_size, lane_state, pin_memory=d.device.type == "cuda")
    val_rows = validation_rows(store, tokenizer, cfg.max_seq_len, max(1, cfg.eval_tokens // cfg.max_seq_len))
    token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.float64, device=d.device)

    # --- compute setup ----------------------------------------------------------------------------------
    autocast: Any = nullcontext()
    if d.device.type == "cuda" and torch.cuda.get_device_capability(d.device)[0] >= 8:
        autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    train_model: torch.nn.Module = model
    if d.world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    if cfg.compile and d.device.type == "cuda":
        train_model = torch.compile(train_model)
    peak = peak_flops(torch.cuda.get_device_name(d.device)) if d.device.type == "cuda" else None

    # --- W&B: the same run id across restarts, so the dashboard shows one curve -------------------------
    wandb_run = None
    if d.is_main and cfg.wandb_run and cfg.wandb_run != "dummy":
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        wandb_run = wandb.init(project=os.environ.get("WANDB_PROJECT", "phoenix"), name=cfg.wandb_run,
                               id=identity["wandb_run_id"], resume="allow", mode=mode,
                               dir=str(logs_dir), config={**asdict(cfg), "num_params": num_params})
        log.info("wandb run_id=%s mode=%s", identity["wandb_run_id"], mode)

    checkpointer = AsyncCheckpointer(ckpt_dir, cfg.keep_last, stage=STAGE, model_tag=cfg.model_tag,
                                     run_id=identity["run_id"])
    heartbeat = Heartbeat(logs_dir / f"heartbeat_{cfg.model_tag}.json")
    logs_dir.mkdir(parents=True, exist_ok=True)
    # Per-step numbers for `phoenix status` and the tests; kept open for the whole run.
    metrics_path = logs_dir / f"train_{STAGE}_{cfg.model_tag}.jsonl"
    metrics_file = open(metrics_path, "a") if d.is_main else None  # noqa: SIM115
    log.info("model params=%s flops_per_token=%.3e horizon=%d steps tokens=%s world_size=%d grad_accum=%d "
             "device=%s", f"{num_params:,}", flops_per_token, num_iterations,
             f"{num_iterations * cfg.total_batch_size:,}", d.world_size, loader.grad_accum_steps, d.device)

    def save(step: int, done: bool) -> float:
        """Every rank contributes its lanes and RNG; rank 0 writes (weights and optimizer are replicated)."""
        rng_json, rng_tensors = rng_state()
        contributions = gather({"lanes": loader.state_dict(), "rng": rng_json, "rng_tensors": rng_tensors}, d)
        if not d.is_main:
            return 0.0
        lanes = {lane: pos for entry in contributions for lane, pos in entry["lanes"].items()}
        meta = {"step": step, "stage": STAGE, "num_iterations": num_iterations, "world_size": d.world_size,
                "total_batch_size": cfg.total_batch_size, "max_seq_len": cfg.max_seq_len,
                "model_config": asdict(model_config), "config": asdict(cfg), "loop_state": loop_state,
                "loader": {"lanes": [list(lanes[i]) for i in range(num_lanes)]},
                "rng": [entry["rng"] for entry in contributions], "run_id": identity["run_id"],
                "wandb_run_id": identity["wandb_run_id"], "torch_version": torch.__version__,
                "saved_at": time.time()}
        rng_file = {f"rank{r}.{name}": tensor for r, entry in enumerate(contributions)
                    for name, tensor in entry["rng_tensors"].items()}
        files = {"model.safetensors": model.state_dict(), "optimizer.safetensors": optimizer.state_tensors(),
                 "rng.safetensors": rng_file}
        return checkpointer.save(step, files, meta, done=done)

    def evaluate() -> None:
        val_bpb = evaluate_bpb(model, val_rows, token_bytes, device_batch_size, d, autocast)
        loop_state["min_val_bpb"] = min(loop_state["min_val_bpb"], val_bpb)
        log.info("step %05d | val bpb %.6f", step, val_bpb)
        if metrics_file:
            metrics_file.write(json.dumps({"step": step, "val_bpb": val_bpb}) + "\n")
        if wandb_run:
            wandb_run.log({"val/bpb": val_bpb}, step=step)

    # --- the loop ------------------------------------------------------------------------------------
    if step == 0 and cfg.eval_every > 0:
        evaluate()
    stop_now = False
    train_start = time.time() - loop_state["train_time"]
    while step < num_iterations and not stop_now:
        t0 = time.perf_counter()
        optimizer.set_schedule(step, num_iterations)
        micro_batches = loader.next_step()
        loss_sum = torch.zeros((), device=d.device)
        for micro, (x, y) in enumerate(micro_batches):
            x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
            sync = micro == len(micro_batches) - 1 or d.world_size == 1
            with (nullcontext() if sync else train_model.no_sync()), autocast:
                loss = train_model(x, y) / len(micro_batches)
            loss.backward()
            loss_sum += loss.detach()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        # One small all-reduce per step: the global loss, and whether any rank must stop.
        flags = torch.stack([loss_sum.float(), torch.tensor(float(stop_requested), device=d.device),
                             torch.tensor(float(checkpointer.failed), device=d.device)])
        if d.world_size > 1:
            dist.all_reduce(flags)
        train_loss = flags[0].item() / d.world_size
        stop_now, write_failed = flags[1].item() > 0, flags[2].item() > 0
        dt = time.perf_counter() - t0
        loop_state["train_time"] = time.time() - train_start
        loop_state["smooth_loss"] = 0.9 * loop_state["smooth_loss"] + 0.1 * train_loss
        debiased = loop_state["smooth_loss"] / (1 - 0.9**step)
        tok_per_sec = cfg.total_batch_size / dt
        mfu = 100 * flops_per_token * tok_per_sec / (peak * d.world_size) if peak else None
        lrm = optimizer.groups[0].lr / optimizer.groups[0].initial_lr
        log.info("step %05d/%05d (%.2f%%) | loss %.6f | lrm %.2f | dt %.2fms | tok/sec %s | mfu %s | "
                 "total time %.2fm", step, num_iterations, 100 * step / num_iterations, debiased, lrm,
                 dt * 1000, f"{tok_per_sec:,.0f}", f"{mfu:.2f}" if mfu is not None else "-",
                 loop_state["train_time"] / 60)
        if metrics_file:
            metrics_file.write(json.dumps({"step": step, "loss": train_loss, "lrm": lrm, "dt": dt,
                                           "tok_per_sec": tok_per_sec, "mfu": mfu,
                                           "elapsed": loop_state["train_time"]}) + "\n")
            metrics_file.flush()
        if wandb_run:
            wandb_run.log({"train/loss": train_loss, "train/lrm": lrm, "train/tok_per_sec": tok_per_sec,
                           "train/mfu": mfu}, step=step)
        if d.is_main:
            heartbeat.beat(step=step, num_iterations=num_iterations, stage=STAGE, tok_per_sec=tok_per_sec)
        if write_failed:
            checkpointer.poll()  # raises the write error on rank 0
            raise CheckpointWriteError("a checkpoint write failed on rank 0 (see its log); stopping")
        if cfg.eval_every > 0 and (step % cfg.eval_every == 0 or step == num_iterations):
            evaluate()
        if step % cfg.save_every == 0 or stop_now or step == num_iterations:
            # The final checkpoint is marked done: a relaunch skips the finished stage.
            stall = save(step, done=step == num_iterations)
            log.info("checkpoint step=%d stall_ms=%.1f", step, stall * 1000)

    checkpointer.wait()
    loader.close()
    if stop_now:
        log.info("emergency checkpoint published at step %d: exiting for resume", step)
    else:
        log.info("base stage finished at step %d", step)
    if metrics_file:
        metrics_file.close()
    if wandb_run:
        wandb_run.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
