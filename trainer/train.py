"""Base pretraining, resumable bit for bit: `torchrun --nproc_per_node=N -m trainer.train --preset d26`.

Read top to bottom: configuration, distributed setup, resume decision, model/optimizer/data, then the
loop. Every SAVE_EVERY steps (and at the end, and on SIGTERM) the full trajectory state goes into a
checkpoint: weights, optimizer, step, the loader's exact position on every lane, RNG, loop state and
the W&B run id. Resuming from it, on any world size, continues the same run.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainer import checkpoint_layout as layout
from trainer.autobatch import (
    TrialSteps,
    exit_on_out_of_memory,
    inject_oom,
    parse_device_batch,
    resolve_device_batch,
)
from trainer.checkpoint import AsyncCheckpointer
from trainer.data import DEFAULT_DATASET_REPO, ShardStore, dataset_dir
from trainer.dataloader import (
    DistributedTokenLoader,
    DocumentSource,
    lane_state,
    loader_meta,
    validation_rows,
)
from trainer.distributed import Dist, ShardedOptimizer, broadcast
from trainer.engine import Engine
from trainer.fp8 import convert_to_fp8, fp8_unavailable
from trainer.gc_freeze import FrozenGC
from trainer.model import GPT, build_model, config_for_depth, config_from_dict, fa3_attention
from trainer.recipe import ASSUMED_MFU, REFERENCE_BATCH, REFERENCE_DEPTH, Plan, plan, scaling_params
from trainer.recovery import StartupClock, stage_history
from trainer.resume import (
    check_horizon,
    check_optimizer_recipe,
    find_resume_checkpoint,
    restore_trajectory,
    run_identity,
    save_checkpoint,
    seed_everything,
)
from trainer.runtime import (
    ENV_NAMES,
    ConfigError,
    StepReporter,
    StopSignal,
    agree,
    compiles_update,
    compute_setup,
    config_from_flags,
    stage_main,
)
from trainer.save_policy import SaveSchedule
from trainer.tokenizer import ensure_tokenizer, load_tokenizer, tokenizer_sha256

log = logging.getLogger("phoenix.train")
STAGE = "base"
# Completed greedily during training (nanochat's choice of prompts): a glance at what the model knows.
SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is",
                  "If yesterday was Friday, then tomorrow will be", "The opposite of hot is"]
SAMPLE_TOKENS = 16

# Presets: tiny trains on 2 CPU cores in seconds and is its own reference (its lrs and weight decay are
# used as given); d20 / d24 / d26 are nanochat's sizes with its defaults: 12 tokens per scaling parameter,
# the batch derived from that (2^20 tokens for all three). The device batch is `auto` (trainer.autobatch).
_GPU = dict(aspect_ratio=64, head_dim=128, max_seq_len=2048, total_batch_size=-1, vocab_size=32768,
            num_iterations=-1, target_param_data_ratio=12.0, eval_every=250, sample_every=250,
            eval_tokens=10 * 524288, tokenizer_chars=2_000_000_000)
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(depth=2, aspect_ratio=32, head_dim=32, max_seq_len=128, total_batch_size=1024,
                 vocab_size=2048, num_iterations=200, eval_every=50, sample_every=50, eval_tokens=4096,
                 tokenizer_chars=2_000_000, reference_depth=2, reference_batch_size=1024),
    "d20": dict(depth=20, **_GPU),
    "d24": dict(depth=24, **_GPU),
    "d26": dict(depth=26, **_GPU),
}
# What `auto` means on the CPU, where nothing is measured: nanochat's device batches for these sizes.
CPU_DEVICE_BATCH = {"tiny": 4, "d20": 32, "d24": 16, "d26": 16}
ETA_AFTER_STEPS = 20  # steps this process times before it logs a measured time estimate


@dataclass
class TrainConfig:
    preset: str = "d26"
    depth: int = 26
    aspect_ratio: int = 64
    head_dim: int = 128
    window_pattern: str = "SSSL"  # attention windows tiled over the layers: S a quarter context, L all
    max_seq_len: int = 2048
    vocab_size: int = 32768
    device_batch_size: str = "auto"  # rows per forward: auto (the largest that fits: trainer.autobatch) or N
    total_batch_size: int = -1  # -1: nanochat's batch for the horizon (trainer.recipe)
    num_iterations: int = -1  # -1: target_param_data_ratio x scaling parameters / total batch
    target_param_data_ratio: float = 12.0  # tokens per scaling parameter (nanochat's default)
    eval_every: int = 250
    sample_every: int = 250  # complete SAMPLE_PROMPTS every this many steps and at the end; 0 = off
    eval_tokens: int = 10 * 524288
    tokenizer_chars: int = 2_000_000_000
    # Learning rates and weight decay as tuned at the reference (d12, 2^19-token batches); the run
    # scales them to its batch and horizon.
    embedding_lr: float = 0.3
    unembedding_lr: float = 0.008
    matrix_lr: float = 0.02
    scalar_lr: float = 0.5
    weight_decay: float = 0.28  # Muon's cautious weight decay
    warmup_steps: int = 40
    warmdown_ratio: float = 0.65
    final_lr_frac: float = 0.05
    reference_depth: int = REFERENCE_DEPTH
    reference_batch_size: int = REFERENCE_BATCH
    seed: int = 42
    save_every: str = "250"  # steps between checkpoints, or auto (trainer.save_policy)
    keep_last: int = 3
    model_tag: str = "d26-hyperbolic"
    base_dir: str = "~/.cache/nanochat"
    dataset_repo: str = DEFAULT_DATASET_REPO
    wandb_run: str = ""
    compile: str = "auto"  # auto (runtime.compiles) | on (--compile) | off (--no-compile)
    device: str = "auto"
    fp8: int = 0  # 1: FP8 matmuls on GPUs of compute capability >= 8.9 (trainer.fp8)
    allow_fresh_start: bool = False


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Defaults < preset < environment (the seed script's names) < flags."""
    env_names = {**ENV_NAMES, "dataset_repo": "DATASET_REPO", "fp8": "FP8"}
    cfg = config_from_flags(TrainConfig, argv, "trainer.train", PRESETS, env_names)
    parse_device_batch(cfg.device_batch_size)
    if cfg.fp8 not in (0, 1):
        raise ConfigError(f"FP8 / --fp8 is {cfg.fp8}: use 1 (FP8 matmuls) or 0 (bf16)")
    if cfg.total_batch_size > 0 and cfg.total_batch_size % cfg.max_seq_len:
        raise ConfigError(f"--total-batch-size {cfg.total_batch_size} is not a multiple of --max-seq-len "
                          f"{cfg.max_seq_len}: pick a multiple")
    if not cfg.window_pattern or set(cfg.window_pattern.upper()) - {"S", "L"}:
        raise ConfigError(f"--window-pattern {cfg.window_pattern!r}: use the letters S (a quarter of the "
                          f"context) and L (all of it), e.g. SSSL or L")
    return cfg


def prepare_data(cfg: TrainConfig) -> ShardStore:
    """The tokenizer and the first train and validation shards on the volume (idempotent).

    `phoenix run` calls this before launching torchrun, so GPU processes never sit in a barrier (and
    its NCCL timeout) while rank 0 trains a tokenizer.
    """
    store = ShardStore(dataset_dir(Path(cfg.base_dir), cfg.dataset_repo), cfg.dataset_repo)
    ensure_tokenizer(Path(cfg.base_dir) / "tokenizer", lambda: store.iter_texts(cfg.tokenizer_chars),
                     cfg.vocab_size)
    store.path(store.train_shards[0])
    store.path(store.val_shard)
    return store


# Settings that fix the trajectory: a resume with any of them changed is refused, never silently reshaped.
RESUME_KEYS = ("depth", "aspect_ratio", "head_dim", "max_seq_len", "vocab_size", "dataset_repo")


def check_resume(cfg: TrainConfig, ckpt: layout.Checkpoint, tokenizer_sha: str | None) -> None:
    """ConfigError (one line) if this config or tokenizer cannot continue `ckpt`'s run exactly.

    `phoenix run` calls it before launching torchrun too, so a changed PRESET costs no GPU start-up.
    """
    meta = ckpt.meta()
    saved = meta.get("config", {})
    changed = [key for key in RESUME_KEYS if key in saved and saved[key] != getattr(cfg, key)]
    # A derived batch (-1) is checked by the trainer once it has the plan; an explicit one here.
    trained_batch = meta.get("total_batch_size", cfg.total_batch_size)
    if cfg.total_batch_size > 0 and trained_batch != cfg.total_batch_size:
        changed.append("total_batch_size")
        saved = {**saved, "total_batch_size": trained_batch}
    if changed:
        was = ", ".join(f"{key}={saved[key]}" for key in changed)
        now = ", ".join(f"{key}={getattr(cfg, key)}" for key in changed)
        raise ConfigError(f"{ckpt.path} was trained with PRESET={saved.get('preset')} {was}; this launch has "
                          f"PRESET={cfg.preset} {now}: set PRESET and the flags back, or use a new MODEL_TAG")
    saved_sha = meta.get("tokenizer_sha256")
    if tokenizer_sha is not None and saved_sha is not None and saved_sha != tokenizer_sha:
        raise ConfigError(f"{ckpt.path} was trained with another tokenizer (sha256 {saved_sha[:12]}, the "
                          f"volume has {tokenizer_sha[:12]}): bring back the run's tokenizer/tokenizer.json "
                          "(phoenix restore) or use a new MODEL_TAG")


# ---------------------------------------------------------------------------------------------------
# Evaluation


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


def log_plan(run_plan: Plan, num_params: int, flops_per_token: int, step: int, train_time: float,
             peak_flops: float | None, world_size: int) -> None:
    """The start-of-run line: what the run will cost before paying for it. The time estimate uses this run's
    own tok/s when resuming, else ASSUMED_MFU of the GPU's peak; on CPU the measured `eta` line follows."""
    tokens_left = (run_plan.num_iterations - step) * run_plan.total_batch_size
    if step > 0 and train_time > 0:
        tok_per_sec, basis = step * run_plan.total_batch_size / train_time, "measured_before_resume"
    elif peak_flops:
        tok_per_sec = ASSUMED_MFU * peak_flops * world_size / flops_per_token
        basis = f"assumed_mfu_{ASSUMED_MFU:.0%}"
    else:
        tok_per_sec, basis = None, "none_until_measured"
    log.info("plan params=%s scaling_params=%s steps=%d total_batch=%s tokens=%s "
             "tokens_per_scaling_param=%.2f flops=%.3e lr_scale=%.4f muon_weight_decay=%.4f "
             "est_hours_left=%s est_tok_per_sec=%s basis=%s",
             f"{num_params:,}", f"{run_plan.scaling_params:,}", run_plan.num_iterations,
             f"{run_plan.total_batch_size:,}", f"{run_plan.tokens:,}",
             run_plan.tokens / run_plan.scaling_params,
             flops_per_token * run_plan.tokens, run_plan.lr_scale, run_plan.weight_decay,
             f"{tokens_left / tok_per_sec / 3600:.2f}" if tok_per_sec else "-",
             f"{tok_per_sec:,.0f}" if tok_per_sec else "-", basis)


# ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    return stage_main(parse_config, train, argv)


def train(cfg: TrainConfig, d: Dist) -> int:
    base_dir = Path(cfg.base_dir)
    ckpt_dir = layout.stage_dir(base_dir, STAGE, cfg.model_tag)
    if cfg.fp8 and (why := fp8_unavailable(d.device)):
        raise ConfigError(f"FP8=1 asks for FP8 training but {why}: unset FP8 (or --fp8 0) to train in bf16")
    stop = StopSignal()
    startup = StartupClock()

    # --- what to resume from: decided once on rank 0 (hashing is not free), then broadcast -----------
    resume_path = None
    if d.is_main:
        ckpt = find_resume_checkpoint(ckpt_dir, cfg.allow_fresh_start)
        resume_path = str(ckpt.path) if ckpt else None
    resume_path = broadcast(resume_path, d)
    ckpt = layout.verify(Path(resume_path)) if resume_path else None
    meta = ckpt.meta() if ckpt else None
    startup.lap("restore_s")
    if ckpt is not None and ckpt.done:
        log.info("base stage already finished at step %d: nothing to do", ckpt.step)
        return 0

    # --- data and tokenizer ---------------------------------------------------------------------------
    if d.is_main:
        store = prepare_data(cfg)
    if d.world_size > 1:
        dist.barrier()
    if not d.is_main:  # reads the listing rank 0 cached; an offline fallback is announced by rank 0 alone
        store = ShardStore(dataset_dir(base_dir, cfg.dataset_repo), cfg.dataset_repo, announce=False)
    tokenizer = load_tokenizer(base_dir / "tokenizer")
    tokenizer_sha = tokenizer_sha256(base_dir / "tokenizer")
    startup.lap("data_s")
    if ckpt is not None:
        check_resume(cfg, ckpt, tokenizer_sha)

    # --- model ----------------------------------------------------------------------------------------
    model_config = config_for_depth(cfg.depth, tokenizer.vocab_size, cfg.max_seq_len, cfg.aspect_ratio,
                                    cfg.head_dim, cfg.window_pattern)
    if meta is not None:
        try:
            config_from_dict(meta["model_config"])
        except ValueError as exc:
            raise ConfigError(f"{ckpt.path}: {exc}") from None
    if meta is not None and meta["model_config"] != asdict(model_config):
        raise ConfigError(f"{ckpt.path} holds a model {meta['model_config']}, this run asks for "
                          f"{asdict(model_config)}: use the same preset/flags or another MODEL_TAG")
    if meta is not None:
        check_optimizer_recipe(ckpt, meta)
    if d.device.type == "cuda" and fa3_attention is None and "S" in cfg.window_pattern.upper():
        log.warning("attention=sdpa_window_mask: FlashAttention-3 is not installed, so the short windows "
                    "run as masks through SDPA (slower); --window-pattern L avoids them")
    seed_everything(cfg.seed)
    model = build_model(model_config, d.device)
    num_params = model.num_params()
    with torch.device("meta"):  # shapes only: the model nanochat's hyperparameters were tuned on
        reference = GPT(config_for_depth(cfg.reference_depth, tokenizer.vocab_size, cfg.max_seq_len,
                                         cfg.aspect_ratio, cfg.head_dim))
    run_plan = plan(scaling_params((n, p.numel()) for n, p in model.named_parameters()),
                    scaling_params((n, p.numel()) for n, p in reference.named_parameters()),
                    cfg.target_param_data_ratio, cfg.total_batch_size, cfg.num_iterations, cfg.weight_decay,
                    cfg.reference_batch_size)
    total_batch_size, num_iterations = run_plan.total_batch_size, run_plan.num_iterations
    if total_batch_size % cfg.max_seq_len:
        raise ConfigError(f"the derived total batch {total_batch_size} is not a multiple of --max-seq-len "
                          f"{cfg.max_seq_len}: set --total-batch-size")
    lr_scale = run_plan.lr_scale
    # Each rank keeps the state of, and updates, its own share of the parameters (trainer.distributed).
    compile_update = compiles_update(cfg.compile, d.device, model.estimate_flops_per_token())
    optimizer = ShardedOptimizer(model, d, compile_update=compile_update,
                                 unembedding_lr=cfg.unembedding_lr * lr_scale,
                                 embedding_lr=cfg.embedding_lr * lr_scale, matrix_lr=cfg.matrix_lr * lr_scale,
                                 scalar_lr=cfg.scalar_lr * lr_scale, weight_decay=run_plan.weight_decay,
                                 warmup_steps=cfg.warmup_steps, warmdown_ratio=cfg.warmdown_ratio,
                                 final_lr_frac=cfg.final_lr_frac)
    if ckpt is not None:
        check_horizon(ckpt, meta, num_iterations)

    # --- batch geometry: the global batch is fixed; accumulation absorbs the world size ---------------
    num_lanes = total_batch_size // cfg.max_seq_len
    if num_lanes % d.world_size:
        raise ConfigError(f"{num_lanes} sequences per step do not split over {d.world_size} processes: "
                          f"set NPROC_PER_NODE to a divisor of {num_lanes}")
    per_rank = num_lanes // d.world_size

    # --- restore the trajectory state -----------------------------------------------------------------
    step = 0
    loop_state = {"smooth_loss": 0.0, "min_val_bpb": float("inf"), "train_time": 0.0}
    lanes = None
    identity = broadcast(run_identity(cfg.base_dir, cfg.model_tag, meta) if d.is_main else None, d)
    if ckpt is not None:
        if meta["total_batch_size"] != total_batch_size or meta["max_seq_len"] != cfg.max_seq_len:
            raise ConfigError(f"{ckpt.path} was trained with total batch {meta['total_batch_size']} x seq "
                              f"{meta['max_seq_len']}; keep them to resume exactly")
        startup.lap()
        restore_trajectory(ckpt, meta, model, optimizer, d, cfg.seed)
        startup.lap("restore_s")
        step = meta["step"]
        loop_state = meta["loop_state"]
        lanes = lane_state(meta["loader"], ckpt.path)
        identity = {**identity, "wandb_run_id": meta["wandb_run_id"], "run_id": meta["run_id"]}
    else:
        log.info("fresh start: no checkpoint in %s", ckpt_dir)

    if cfg.fp8:  # after the weights are in place, before compile: the same parameters, FP8 matmuls
        log.info("fp8 recipe=tensorwise converted_linears=%d of=%d", *convert_to_fp8(model))
    train_model, autocast = compute_setup(model, d, cfg.compile)
    # Rows per forward: a fixed number, or `auto`'s search on this very model and compiled step.
    trials = TrialSteps(train_model, autocast, model, optimizer, d, cfg.max_seq_len)
    device_batch_size = resolve_device_batch(STAGE, parse_device_batch(cfg.device_batch_size),
                                             CPU_DEVICE_BATCH.get(cfg.preset, 1), per_rank, trials, step,
                                             divisors_only=True)

    startup.lap()
    docs = DocumentSource(store, tokenizer, num_lanes, range(d.rank * per_rank, (d.rank + 1) * per_rank))
    loader = DistributedTokenLoader(docs, cfg.max_seq_len, device_batch_size, num_lanes, d.rank,
                                    d.world_size, lanes, pin_memory=d.device.type == "cuda")
    val_rows = validation_rows(store, tokenizer, cfg.max_seq_len, max(1, cfg.eval_tokens // cfg.max_seq_len))
    startup.lap("data_s")
    token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.float64, device=d.device)
    reporter = StepReporter(STAGE, cfg.base_dir, cfg.model_tag, d, model.estimate_flops_per_token(),
                            cfg.wandb_run, identity["wandb_run_id"],
                            wandb_config={**asdict(cfg), "num_params": num_params}, startup=startup,
                            resumed=meta)
    checkpointer = AsyncCheckpointer(ckpt_dir, cfg.keep_last, d, stage=STAGE, model_tag=cfg.model_tag,
                                     run_id=identity["run_id"])
    log_plan(run_plan, num_params, model.estimate_flops_per_token(), step, loop_state["train_time"],
             reporter.peak, d.world_size)
    log.info("world_size=%d device_batch_size=%d grad_accum=%d device=%s owned_params=%d/%d "
             "optimizer_state_mib=%.1f", d.world_size, device_batch_size, loader.grad_accum_steps, d.device,
             len(optimizer.optimizer.owned_names), len(optimizer.owners), optimizer.state_bytes() / 2**20)

    def stage_meta(rank_lanes: list[dict[int, dict[str, Any]]]) -> dict[str, Any]:
        positions = {lane: pos for entry in rank_lanes for lane, pos in entry.items()}
        return {"stage": STAGE, "num_iterations": num_iterations, "total_batch_size": total_batch_size,
                "max_seq_len": cfg.max_seq_len, "model_config": asdict(model_config), "config": asdict(cfg),
                "loop_state": loop_state, "loader": loader_meta(positions, num_lanes),
                "run_id": identity["run_id"], "wandb_run_id": identity["wandb_run_id"],
                "tokenizer_sha256": tokenizer_sha, "stopped": stop_now}

    def evaluate() -> None:
        val_bpb = evaluate_bpb(model, val_rows, token_bytes, device_batch_size, d, autocast)
        loop_state["min_val_bpb"] = min(loop_state["min_val_bpb"], val_bpb)
        reporter.value(step, "val_bpb", val_bpb)

    # Rank 0, greedy, on the bare model: no RNG drawn and no collective, so the trajectory is untouched.
    sampler = Engine(model, tokenizer, autocast) if d.is_main and cfg.sample_every > 0 else None

    def sample() -> None:
        completions = sampler.generate([sampler.text_prompt(p) for p in SAMPLE_PROMPTS], SAMPLE_TOKENS)
        reporter.samples(step, [(p, sampler.decode(c)) for p, c in zip(SAMPLE_PROMPTS, completions,
                                                                         strict=True)])

    # --- the loop ------------------------------------------------------------------------------------
    stop_now = False
    train_start = time.time() - loop_state["train_time"]
    gc_habit = FrozenGC()
    timed_from: tuple[int, float] | None = None  # (step, time) after this process's first step
    saves = SaveSchedule(cfg.save_every, STAGE, step,
                         lambda: stage_history(cfg.base_dir, cfg.model_tag, STAGE))
    # A CUDA out-of-memory ends the stage with its report: `phoenix run` relaunches it with half the device
    # batch from the checkpoint the save in flight publishes.
    with exit_on_out_of_memory(STAGE, device_batch_size, d.device, lambda: step + 1, checkpointer.wait):
        if step == 0 and cfg.eval_every > 0:
            evaluate()
        while step < num_iterations and not stop_now:
            t0 = time.perf_counter()
            optimizer.set_schedule(step, num_iterations)
            micro_batches = loader.next_step()
            loss_sum = torch.zeros((), device=d.device)
            for x, y in micro_batches:  # gradients accumulate locally; ranks meet in optimizer.step()
                inject_oom(step + 1, len(x), d.device)  # tests only: PHOENIX_TEST_OOM
                x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
                with autocast:
                    loss = train_model(x, y) / len(micro_batches)
                loss.backward()
                loss_sum += loss.detach()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            loss_total, stop_now, save_now = agree(loss_sum, stop, checkpointer, d, saves.due(step))
            loop_state["train_time"] = time.time() - train_start
            lrm = optimizer.groups[0].lr / optimizer.groups[0].initial_lr
            dt = time.perf_counter() - t0
            reporter.step(step, num_iterations, loss_total / d.world_size, loop_state, lrm, dt,
                          total_batch_size)
            saves.observe_step(dt)
            gc_habit.after_step(step)  # after the step's log line, as nanochat
            if timed_from is None:  # the first step pays for compilation and warm-up: time the next ones
                timed_from = (step, time.perf_counter())
            elif step == timed_from[0] + ETA_AFTER_STEPS:
                tok_per_sec = ETA_AFTER_STEPS * total_batch_size / (time.perf_counter() - timed_from[1])
                hours_left = (num_iterations - step) * total_batch_size / tok_per_sec / 3600
                log.info("eta steps_left=%d est_hours=%.2f tok_per_sec=%s basis=measured",
                         num_iterations - step, hours_left, f"{tok_per_sec:,.0f}")
            if cfg.eval_every > 0 and (step % cfg.eval_every == 0 or step == num_iterations):
                evaluate()
            if sampler and (step % cfg.sample_every == 0 or step == num_iterations):
                sample()
            if save_now or stop_now or step == num_iterations:
                # The final checkpoint is marked done: a relaunch skips the finished stage.
                stall = save_checkpoint(checkpointer, step, step == num_iterations, model, optimizer, d,
                                        stage_meta, rank_state=loader.state_dict())
                saves.saved(step, stall, checkpointer.timing.get("total_s", 0.0), loop_state["train_time"])

    checkpointer.wait()
    loader.close()
    if stop_now:
        stop.report_saved(step, checkpointer)
        log.info("emergency checkpoint published at step %d: exiting for resume", step)
    else:
        log.info("base stage finished at step %d", step)
    reporter.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
