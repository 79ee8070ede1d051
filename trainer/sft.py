"""Chat SFT after base pretraining, resumable bit for bit: `torchrun ... -m trainer.sft --preset d26`.

Starts from the weights of the finished base stage (its final checkpoint, marked done) with a fresh
optimizer, and fine-tunes on a Hub chat dataset (`messages` column), taking the loss on assistant tokens
only. The learning rates are a fraction (--init-lr-frac) of the base run's, decaying linearly to 0, as
nanochat's chat_sft does. Checkpoints follow the base contract under sft_checkpoints/<MODEL_TAG>/: every
SAVE_EVERY steps, at the end (marked done) and on SIGTERM; resuming from one, on any world size,
continues the same run. The order of this file follows trainer/train.py, whose pieces it reuses.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainer import checkpoint_layout as layout
from trainer.chat_data import (
    DEFAULT_SFT_DATASET,
    ChatLoader,
    dataset_fetch,
    eval_batches,
    load_chat_dataset,
)
from trainer.checkpoint import AsyncCheckpointer, CheckpointWriteError, load_tensors
from trainer.data import DataError
from trainer.model import GPT, GPTConfig, peak_flops
from trainer.optim import HybridOptimizer
from trainer.tokenizer import load_tokenizer
from trainer.train import (
    PRESETS,
    ConfigError,
    Dist,
    Heartbeat,
    TrainConfig,
    broadcast,
    find_resume_checkpoint,
    gather,
    init_distributed,
    rng_state,
    run_identity,
    seed_everything,
    set_rng_state,
)

log = logging.getLogger("phoenix.sft")
STAGE = "sft"
BASE_STAGE = "base"

# SFT settings per preset, on top of the base preset's max_seq_len and device_batch_size.
# nanochat's chat_sft takes 32 conversations per step and evaluates every 100 steps.
SFT_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(conversations_per_step=8, eval_every=20, eval_conversations=32),
    "d20": dict(conversations_per_step=32, eval_every=100, eval_conversations=1024),
    "d26": dict(conversations_per_step=32, eval_every=100, eval_conversations=1024),
}


@dataclass
class SFTConfig:
    preset: str = "d26"
    max_seq_len: int = 2048  # conversations are cut to this many input tokens
    device_batch_size: int = 16
    conversations_per_step: int = 32  # the global batch, for any world size
    num_epochs: int = 1
    num_iterations: int = -1  # -1: num_epochs passes over the training conversations
    init_lr_frac: float = 0.02  # of the base run's learning rates
    eval_every: int = 100
    eval_conversations: int = 1024  # held out: the last rows of the split
    seed: int = 42
    save_every: int = 250
    keep_last: int = 3
    model_tag: str = "d26-hyperbolic"
    base_dir: str = "~/.cache/nanochat"
    sft_dataset: str = DEFAULT_SFT_DATASET
    sft_split: str = "train"
    wandb_run: str = ""
    compile: bool = True
    device: str = "auto"
    allow_fresh_start: bool = False


def parse_sft_config(argv: list[str] | None = None) -> SFTConfig:
    """Defaults < preset < environment (the names base training reads, plus SFT_DATASET) < flags."""
    parser = argparse.ArgumentParser(prog="trainer.sft", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=os.environ.get("PRESET", "d26"))
    for field in fields(SFTConfig):
        if field.name in ("preset", "compile", "allow_fresh_start"):
            continue
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=None)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (CUDA only anyway)")
    parser.add_argument("--allow-fresh-start", action="store_true",
                        help="start from the base weights though SFT checkpoints exist and none is valid")
    args = parser.parse_args(argv)
    if args.preset not in PRESETS:
        raise ConfigError(f"unknown preset {args.preset!r}: choose one of {', '.join(PRESETS)}")
    geometry = {k: PRESETS[args.preset][k] for k in ("max_seq_len", "device_batch_size")}
    cfg = SFTConfig(preset=args.preset, **geometry, **SFT_PRESETS[args.preset])
    env = {"save_every": "SAVE_EVERY", "keep_last": "KEEP_LAST", "model_tag": "MODEL_TAG", "device": "DEVICE",
           "base_dir": "NANOCHAT_BASE_DIR", "sft_dataset": "SFT_DATASET", "wandb_run": "WANDB_RUN"}
    for name, var in env.items():
        if os.environ.get(var):
            setattr(cfg, name, type(getattr(cfg, name))(os.environ[var]))
    for field in fields(SFTConfig):
        value = getattr(args, field.name, None)
        if value is not None and field.name != "preset":
            setattr(cfg, field.name, value)
    cfg.compile = not args.no_compile
    cfg.allow_fresh_start = args.allow_fresh_start
    cfg.base_dir = str(Path(cfg.base_dir).expanduser())
    for name in ("save_every", "conversations_per_step", "device_batch_size", "max_seq_len", "num_epochs"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.eval_conversations < 0:
        raise ConfigError(f"--eval-conversations must be >= 0, got {cfg.eval_conversations}")
    return cfg


def finished_base_checkpoint(base_dir: Path, model_tag: str) -> layout.Checkpoint:
    """The base stage's final checkpoint (sha256-verified), or ConfigError if base training is not done."""
    directory = layout.stage_dir(base_dir, BASE_STAGE, model_tag)
    ckpt = layout.latest(directory, full_hash=True)
    if ckpt is None or not ckpt.done:
        found = f"latest is step {ckpt.step}, not marked done" if ckpt else "no complete checkpoint"
        raise ConfigError(f"base stage not finished: run base training first ({found} in {directory})")
    return ckpt


def prepare_sft_data(cfg: SFTConfig) -> None:
    """Download the SFT dataset onto the volume (idempotent), for a launcher to call before torchrun so
    that no rank waits in a barrier while rank 0 downloads."""
    load_chat_dataset(cfg.sft_dataset, cfg.sft_split, Path(cfg.base_dir) / "sft_data")


# ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s",
                        stream=sys.stdout)
    for chatty in ("httpx", "httpx2", "huggingface_hub", "datasets", "filelock"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        cfg = parse_sft_config(argv)
        d = init_distributed(cfg.device)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        return sft(cfg, d)
    except (ConfigError, DataError, CheckpointWriteError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], d: Dist,
                  autocast: Any) -> float:
    """Mean loss per assistant token over every rank's held-out batches."""
    totals = torch.zeros(2, dtype=torch.float64, device=d.device)  # summed loss, assistant tokens
    for x, y in batches:
        x, y = x.to(d.device), y.to(d.device)
        with autocast:
            totals[0] += model(x, y, loss_reduction="sum").double()
        totals[1] += (y != -1).sum()
    if d.world_size > 1:
        dist.all_reduce(totals)
    return (totals[0] / totals[1].clamp(min=1)).item()


def sft(cfg: SFTConfig, d: Dist) -> int:
    if not d.is_main:
        logging.getLogger("phoenix").setLevel(logging.WARNING)
    base_dir = Path(cfg.base_dir)
    ckpt_dir = layout.stage_dir(base_dir, STAGE, cfg.model_tag)
    logs_dir = base_dir / "logs"

    stop_requested = False  # docker stop / preemption notice: acted on at the end of the current step

    def request_stop(signum: int, _frame: Any) -> None:
        nonlocal stop_requested
        stop_requested = True
        log.warning("received %s: will write an emergency checkpoint after this step",
                    signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    # --- what to start from: our own latest checkpoint, else the finished base; decided on rank 0 -------
    decision: tuple[str | None, str | None] = (None, None)
    if d.is_main:
        ckpt = find_resume_checkpoint(ckpt_dir, cfg.allow_fresh_start)
        # Only a fresh start needs the base weights, so pruned or moved base checkpoints do not block resume.
        base_ckpt = None if ckpt else finished_base_checkpoint(base_dir, cfg.model_tag)
        decision = (str(ckpt.path) if ckpt else None, str(base_ckpt.path) if base_ckpt else None)
    resume_path, base_path = broadcast(decision, d)
    ckpt = layout.verify(Path(resume_path)) if resume_path else None
    meta = ckpt.meta() if ckpt else None
    if ckpt is not None and ckpt.done:
        log.info("sft stage already finished at step %d: nothing to do", ckpt.step)
        return 0
    if cfg.conversations_per_step % d.world_size:
        raise ConfigError(f"{cfg.conversations_per_step} conversations per step do not split over "
                          f"{d.world_size} processes: set NPROC_PER_NODE to a divisor of them")
    base_ckpt = layout.verify(Path(base_path)) if base_path else None
    base_meta = base_ckpt.meta() if base_ckpt else None
    # What SFT keeps of the base run; carried in every SFT checkpoint so resume never reads base again.
    origin = meta["base"] if meta else {"step": base_meta["step"], "run_id": base_meta["run_id"],
                                       "model_config": base_meta["model_config"],
                                       "lrs": {k: base_meta["config"][k] for k in
                                               ("embedding_lr", "unembedding_lr", "matrix_lr")}}

    # --- data and tokenizer (the one base training made) ------------------------------------------------
    tokenizer = load_tokenizer(base_dir / "tokenizer")
    data_cache = base_dir / "sft_data"
    # Rank 0 downloads; the others then load the same files from the cache on the volume.
    dataset = load_chat_dataset(cfg.sft_dataset, cfg.sft_split, data_cache) if d.is_main else None
    if d.world_size > 1:
        dist.barrier()
    if dataset is None:
        dataset = load_chat_dataset(cfg.sft_dataset, cfg.sft_split, data_cache)
    fetch = dataset_fetch(dataset)
    num_train = len(dataset) - cfg.eval_conversations
    if num_train < cfg.conversations_per_step:
        raise ConfigError(f"SFT dataset {cfg.sft_dataset!r} has {len(dataset)} conversations: too few for "
                          f"{cfg.eval_conversations} held out plus one step of {cfg.conversations_per_step}")
    # Everything that fixes which conversation comes when: a resume must see the same.
    data_identity = {"dataset": cfg.sft_dataset, "split": cfg.sft_split, "num_rows": len(dataset),
                     "num_train": num_train, "seed": cfg.seed,
                     "conversations_per_step": cfg.conversations_per_step, "max_seq_len": cfg.max_seq_len}
    if meta is not None and meta["data"] != data_identity:
        changed = sorted(k for k in data_identity if meta["data"].get(k) != data_identity[k])
        raise ConfigError(f"{ckpt.path} was trained on {meta['data']}; this run has {data_identity} (differs "
                          f"in {', '.join(changed)}): keep them to resume exactly")

    # --- model, from the base weights or our checkpoint --------------------------------------------------
    model_config = GPTConfig(**origin["model_config"])
    if model_config.vocab_size != tokenizer.vocab_size:
        raise ConfigError(f"the model has vocab {model_config.vocab_size}, {base_dir / 'tokenizer'} has "
                          f"{tokenizer.vocab_size}: the tokenizer is not the one base training used")
    seed_everything(cfg.seed)
    with torch.device("meta"):
        model = GPT(model_config)
    model.to_empty(device=d.device)
    model.init_weights()  # sets the rotary buffers, which are not part of any checkpoint
    if cfg.max_seq_len > model.rotary_seq_len:
        raise ConfigError(f"--max-seq-len {cfg.max_seq_len} exceeds the model's rotary cache of "
                          f"{model.rotary_seq_len}")
    lrs = {name: lr * cfg.init_lr_frac for name, lr in origin["lrs"].items()}
    # warmdown_ratio=1: the lr decays linearly from the first step to 0 at the last, as in nanochat.
    optimizer = HybridOptimizer(model, **lrs, weight_decay=0.0, warmdown_ratio=1.0, final_lr_frac=0.0)
    num_iterations = cfg.num_iterations
    if num_iterations <= 0:
        num_iterations = cfg.num_epochs * num_train // cfg.conversations_per_step
    if meta is not None and meta["num_iterations"] != num_iterations:
        if meta["step"] >= num_iterations:
            raise ConfigError(f"{ckpt.path} is at step {meta['step']}, past the new horizon of "
                              f"{num_iterations} steps: set --num-iterations above {meta['step']}")
        log.warning("horizon changed from %d to %d steps: the schedule follows the new horizon",
                    meta["num_iterations"], num_iterations)

    # --- batch geometry: the global batch is fixed; accumulation absorbs the world size ---------------
    # Micro-batches need not divide a rank's share: the loss is normalised per step, not per micro-batch.
    device_batch_size = min(cfg.device_batch_size, cfg.conversations_per_step // d.world_size)

    # --- restore the trajectory state -----------------------------------------------------------------
    step = 0
    loop_state = {"smooth_loss": 0.0, "min_val_loss": float("inf"), "train_time": 0.0}
    loader_state = None
    identity = broadcast(run_identity(TrainConfig(model_tag=cfg.model_tag, base_dir=cfg.base_dir))
                         if d.is_main else None, d)
    # A W&B run of its own (steps restart at 0), with an id derived from the run's, stable across restarts.
    identity = {**identity, "wandb_run_id": f"{identity['wandb_run_id']}-sft"}
    if ckpt is not None:
        model.load_state_dict(load_tensors(ckpt, "model.safetensors"))
        optimizer.load_state_tensors({k: v.to(d.device) if v.dim() else v
                                      for k, v in load_tensors(ckpt, "optimizer.safetensors").items()})
        step = meta["step"]
        loop_state = meta["loop_state"]
        loader_state = meta["loader"]
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
        model.load_state_dict(load_tensors(base_ckpt, "model.safetensors"))
        log.info("fresh start from the base weights of step %d: %s", base_ckpt.step, base_ckpt.path)

    loader = ChatLoader(fetch, num_train, tokenizer, cfg.conversations_per_step, device_batch_size,
                        cfg.max_seq_len, d.rank, d.world_size, cfg.seed, loader_state)
    val_batches = eval_batches(fetch, range(num_train, len(dataset)), tokenizer, device_batch_size,
                               cfg.max_seq_len, d.rank, d.world_size)

    # --- compute setup ----------------------------------------------------------------------------------
    autocast: Any = nullcontext()
    if d.device.type == "cuda" and torch.cuda.get_device_capability(d.device)[0] >= 8:
        autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    train_model: torch.nn.Module = model
    if d.world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    if cfg.compile and d.device.type == "cuda":
        # Batches are as long as their longest conversation: dynamic shapes, not a recompile per length.
        train_model = torch.compile(train_model, dynamic=True)
    flops_per_token = model.estimate_flops_per_token()
    peak = peak_flops(torch.cuda.get_device_name(d.device)) if d.device.type == "cuda" else None

    wandb_run = None
    if d.is_main and cfg.wandb_run and cfg.wandb_run != "dummy":
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        wandb_run = wandb.init(project=os.environ.get("WANDB_PROJECT", "phoenix"),
                               name=f"{cfg.wandb_run}-sft", id=identity["wandb_run_id"], resume="allow",
                               mode=mode, dir=str(logs_dir),
                               config={**asdict(cfg), "base_step": origin["step"]})
        log.info("wandb run_id=%s mode=%s", identity["wandb_run_id"], mode)

    checkpointer = AsyncCheckpointer(ckpt_dir, cfg.keep_last, stage=STAGE, model_tag=cfg.model_tag,
                                     run_id=identity["run_id"])
    heartbeat = Heartbeat(logs_dir / f"heartbeat_{cfg.model_tag}.json")
    logs_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = logs_dir / f"train_{STAGE}_{cfg.model_tag}.jsonl"
    metrics_file = open(metrics_path, "a") if d.is_main else None  # noqa: SIM115
    log.info("sft dataset=%s split=%s conversations=%d train=%d held_out=%d horizon=%d steps of %d "
             "conversations world_size=%d device_batch=%d device=%s", cfg.sft_dataset, cfg.sft_split,
             len(dataset), num_train, cfg.eval_conversations, num_iterations, cfg.conversations_per_step,
             d.world_size, device_batch_size, d.device)

    def save(step: int, done: bool) -> float:
        """Every rank contributes its RNG; rank 0 writes (weights, optimizer and loader are replicated)."""
        rng_json, rng_tensors = rng_state()
        contributions = gather({"rng": rng_json, "rng_tensors": rng_tensors}, d)
        if not d.is_main:
            return 0.0
        meta = {"step": step, "stage": STAGE, "num_iterations": num_iterations, "world_size": d.world_size,
                "model_config": asdict(model_config), "config": asdict(cfg), "base": origin,
                "data": data_identity, "loop_state": loop_state, "loader": loader.state_dict(),
                "rng": [entry["rng"] for entry in contributions], "run_id": identity["run_id"],
                "wandb_run_id": identity["wandb_run_id"], "torch_version": torch.__version__,
                "saved_at": time.time()}
        rng_file = {f"rank{r}.{name}": tensor for r, entry in enumerate(contributions)
                    for name, tensor in entry["rng_tensors"].items()}
        files = {"model.safetensors": model.state_dict(), "optimizer.safetensors": optimizer.state_tensors(),
                 "rng.safetensors": rng_file}
        return checkpointer.save(step, files, meta, done=done)

    def evaluate() -> None:
        val_loss = evaluate_loss(model, val_batches, d, autocast)
        loop_state["min_val_loss"] = min(loop_state["min_val_loss"], val_loss)
        log.info("step %05d | val loss %.6f", step, val_loss)
        if metrics_file:
            metrics_file.write(json.dumps({"step": step, "val_loss": val_loss}) + "\n")
        if wandb_run:
            wandb_run.log({"val/loss": val_loss}, step=step)

    # --- the loop ------------------------------------------------------------------------------------
    evaluating = cfg.eval_every > 0 and cfg.eval_conversations > 0
    if step == 0 and evaluating:
        evaluate()
    stop_now = False
    train_start = time.time() - loop_state["train_time"]
    while step < num_iterations and not stop_now:
        t0 = time.perf_counter()
        optimizer.set_schedule(step, num_iterations)
        batch = loader.next_step()
        # The loss is a mean over the assistant tokens of the GLOBAL batch, so every rank needs their total
        # first; then any world size (and micro-batch split) gives the same objective.
        counts = torch.tensor([batch.num_targets, batch.num_tokens], dtype=torch.float64, device=d.device)
        if d.world_size > 1:
            dist.all_reduce(counts)
        # DDP averages gradients over ranks: scale by world_size so they come out as the global sum / count.
        scale = d.world_size / max(counts[0].item(), 1.0)
        loss_sum = torch.zeros((), device=d.device)
        for micro, (x, y) in enumerate(batch.micro_batches):
            x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
            sync = micro == len(batch.micro_batches) - 1 or d.world_size == 1
            with (nullcontext() if sync else train_model.no_sync()), autocast:
                loss = train_model(x, y, loss_reduction="sum") * scale
            loss.backward()
            loss_sum += loss.detach() / d.world_size
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        # One small all-reduce per step: the global loss, and whether any rank must stop.
        flags = torch.stack([loss_sum.float(), torch.tensor(float(stop_requested), device=d.device),
                             torch.tensor(float(checkpointer.failed), device=d.device)])
        if d.world_size > 1:
            dist.all_reduce(flags)
        train_loss = flags[0].item()
        stop_now, write_failed = flags[1].item() > 0, flags[2].item() > 0
        dt = time.perf_counter() - t0
        loop_state["train_time"] = time.time() - train_start
        loop_state["smooth_loss"] = 0.9 * loop_state["smooth_loss"] + 0.1 * train_loss
        debiased = loop_state["smooth_loss"] / (1 - 0.9**step)
        tok_per_sec = counts[1].item() / dt
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
        if evaluating and (step % cfg.eval_every == 0 or step == num_iterations):
            evaluate()
        if step % cfg.save_every == 0 or stop_now or step == num_iterations:
            # The final checkpoint is marked done: a relaunch skips the finished stage.
            stall = save(step, done=step == num_iterations)
            log.info("checkpoint step=%d stall_ms=%.1f", step, stall * 1000)

    checkpointer.wait()
    if stop_now:
        log.info("emergency checkpoint published at step %d: exiting for resume", step)
    else:
        log.info("sft stage finished at step %d", step)
    if metrics_file:
        metrics_file.close()
    if wandb_run:
        wandb_run.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
