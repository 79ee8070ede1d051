"""Chat SFT after base pretraining, resumable bit for bit: `torchrun ... -m trainer.sft --preset d26`.

Starts from the weights of the finished base stage (its final checkpoint, marked done) with a fresh
optimizer, and fine-tunes on a Hub chat dataset (`messages` column) packed into rows of whole
conversations (trainer.chat_data), taking the loss on assistant tokens only. The learning rates start at
a fraction (--init-lr-frac, 0.8) of the base run's, flat for half the run, then decay linearly to 0, as
nanochat's chat_sft does (trainer.sft_schedule). Checkpoints follow the base contract under
sft_checkpoints/<MODEL_TAG>/: every SAVE_EVERY steps, at the end (marked done) and on SIGTERM; resuming
from one, on any world size, continues the same run. The order of this file follows trainer/train.py,
whose pieces it reuses.
"""

from __future__ import annotations

import logging
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
from trainer.chat_data import (
    DEFAULT_SFT_DATASET,
    PACKING,
    ChatLoader,
    dataset_fetch,
    eval_batches,
    load_chat_dataset,
    steps_per_epoch,
)
from trainer.checkpoint import AsyncCheckpointer, load_tensors
from trainer.distributed import Dist, ShardedOptimizer, broadcast
from trainer.engine import Engine
from trainer.gc_freeze import FrozenGC
from trainer.model import build_model, config_from_dict
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
from trainer.sft_schedule import INIT_LR_FRAC, SFT_SCHEDULE, set_sft_schedule
from trainer.tokenizer import load_tokenizer, tokenizer_sha256
from trainer.train import CPU_DEVICE_BATCH, PRESETS

log = logging.getLogger("phoenix.sft")
STAGE = "sft"
BASE_STAGE = "base"
# Answered greedily during SFT, each as a one-turn chat rendered as training renders it.
SAMPLE_QUESTIONS = ["What is the capital of France?", "Why is the sky blue?", "What is 7 times 6?"]
SAMPLE_TOKENS = 32

# SFT settings per preset, on top of the base preset's max_seq_len. A step is rows_per_step rows of
# max_seq_len tokens packed with whole conversations (tiny: ~6 of the test chats).
SFT_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(rows_per_step=2, eval_every=20, sample_every=20, eval_conversations=32),
    "d20": dict(rows_per_step=16, eval_every=100, sample_every=100, eval_conversations=1024),
    "d24": dict(rows_per_step=16, eval_every=100, sample_every=100, eval_conversations=1024),
    "d26": dict(rows_per_step=16, eval_every=100, sample_every=100, eval_conversations=1024),
}


@dataclass
class SFTConfig:
    preset: str = "d26"
    max_seq_len: int = 2048  # rows of this many input tokens; a longer conversation is cut to one row
    device_batch_size: str = "auto"  # rows per forward: auto (the largest that fits: trainer.autobatch) or N
    rows_per_step: int = 16  # the global batch, packed rows, for any world size
    num_epochs: int = 1
    num_iterations: int = -1  # -1: about num_epochs passes over the training conversations
    init_lr_frac: float = INIT_LR_FRAC  # of the base run's learning rates, every group
    eval_every: int = 100
    sample_every: int = 100  # answer SAMPLE_QUESTIONS every this many steps and at the end; 0 = off
    eval_conversations: int = 1024  # held out: the last rows of the split
    seed: int = 42
    save_every: str = "250"  # steps between checkpoints, or auto (trainer.save_policy)
    keep_last: int = 3
    model_tag: str = "d26-hyperbolic"
    base_dir: str = "~/.cache/nanochat"
    sft_dataset: str = DEFAULT_SFT_DATASET
    sft_split: str = "train"
    wandb_run: str = ""
    compile: str = "auto"  # auto (runtime.compiles) | on (--compile) | off (--no-compile)
    device: str = "auto"
    allow_fresh_start: bool = False


def parse_sft_config(argv: list[str] | None = None) -> SFTConfig:
    """Defaults < preset < environment (the names base training reads, plus SFT_DATASET) < flags."""
    presets = {name: {"max_seq_len": preset["max_seq_len"], **SFT_PRESETS[name]}
               for name, preset in PRESETS.items()}
    env_names = {**ENV_NAMES, "sft_dataset": "SFT_DATASET"}
    cfg = config_from_flags(SFTConfig, argv, "trainer.sft", presets, env_names)
    parse_device_batch(cfg.device_batch_size)
    for name in ("rows_per_step", "max_seq_len", "num_epochs"):
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


def sft_dataset_revision(cfg: SFTConfig) -> str | None:
    """The SFT dataset's commit, pinned in runs/<tag>/run.json at first use (the sidecar backs that file
    up), so a resumed or redeployed SFT reads the same data even after the dataset moves on. None when
    the Hub cannot say: loading then reports the problem, or falls back on the volume's cache."""
    path = Path(cfg.base_dir) / "runs" / cfg.model_tag / "run.json"
    identity = layout.read_run_file(path) or {}
    pin = identity.get("sft_dataset") or {}
    if pin.get("repo_id") == cfg.sft_dataset:
        return pin["revision"]
    from huggingface_hub import HfApi

    try:
        revision = HfApi().dataset_info(cfg.sft_dataset).sha
    except Exception:  # not found or unreachable: load_chat_dataset words it as one line
        return None
    pin = {"repo_id": cfg.sft_dataset, "revision": revision}
    layout.write_json_atomic(path, {**identity, "sft_dataset": pin})
    log.info("sft dataset pinned repo=%s revision=%s", cfg.sft_dataset, revision)
    return revision


def prepare_sft_data(cfg: SFTConfig) -> None:
    """Download the SFT dataset onto the volume (idempotent), for a launcher to call before torchrun so
    that no rank waits in a barrier while rank 0 downloads."""
    revision = sft_dataset_revision(cfg)
    load_chat_dataset(cfg.sft_dataset, cfg.sft_split, Path(cfg.base_dir) / "sft_data", revision)


# ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    return stage_main(parse_sft_config, sft, argv)


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
    base_dir = Path(cfg.base_dir)
    ckpt_dir = layout.stage_dir(base_dir, STAGE, cfg.model_tag)
    stop = StopSignal()
    startup = StartupClock()

    # --- what to start from: our own latest checkpoint, else the finished base; decided on rank 0 -------
    decision: tuple[str | None, str | None] = (None, None)
    if d.is_main:
        ckpt = find_resume_checkpoint(ckpt_dir, cfg.allow_fresh_start)
        # Only a fresh start needs the base weights, so pruned or moved base checkpoints do not block resume.
        base_ckpt = None if ckpt else finished_base_checkpoint(base_dir, cfg.model_tag)
        decision = (str(ckpt.path) if ckpt else None, str(base_ckpt.path) if base_ckpt else None)
    resume_path, base_path = broadcast(decision, d)
    startup.lap("restore_s")
    ckpt = layout.verify(Path(resume_path)) if resume_path else None
    meta = ckpt.meta() if ckpt else None
    if ckpt is not None and ckpt.done:
        log.info("sft stage already finished at step %d: nothing to do", ckpt.step)
        return 0
    if cfg.rows_per_step % d.world_size:
        raise ConfigError(f"{cfg.rows_per_step} rows per step do not split over {d.world_size} processes: "
                          "set NPROC_PER_NODE to a divisor of them")
    base_ckpt = layout.verify(Path(base_path)) if base_path else None
    base_meta = base_ckpt.meta() if base_ckpt else None
    # What SFT keeps of the base run; carried in every SFT checkpoint so resume never reads base again.
    origin = meta["base"] if meta else {"step": base_meta["step"], "run_id": base_meta["run_id"],
                                       "model_config": base_meta["model_config"],
                                       "lrs": {k: base_meta["config"][k] for k in
                                               ("embedding_lr", "unembedding_lr", "matrix_lr")}}

    # --- data and tokenizer (the one base training made) ------------------------------------------------
    tokenizer = load_tokenizer(base_dir / "tokenizer")
    tokenizer_sha = tokenizer_sha256(base_dir / "tokenizer")
    trained_with = (meta or base_meta).get("tokenizer_sha256")
    if trained_with is not None and trained_with != tokenizer_sha:
        raise ConfigError(f"{(ckpt or base_ckpt).path} was trained with another tokenizer (sha256 "
                          f"{trained_with[:12]}, the volume has {tokenizer_sha[:12]}): bring back the run's "
                          "tokenizer/tokenizer.json (phoenix restore) or use a new MODEL_TAG")
    data_cache = base_dir / "sft_data"
    # Rank 0 downloads; the others then load the same files from the cache on the volume.
    revision = broadcast(sft_dataset_revision(cfg) if d.is_main else None, d)
    dataset = load_chat_dataset(cfg.sft_dataset, cfg.sft_split, data_cache, revision) if d.is_main else None
    if d.world_size > 1:
        dist.barrier()
    if dataset is None:
        dataset = load_chat_dataset(cfg.sft_dataset, cfg.sft_split, data_cache, revision)
    fetch = dataset_fetch(dataset)
    num_train = len(dataset) - cfg.eval_conversations
    if num_train < 1:
        raise ConfigError(f"SFT dataset {cfg.sft_dataset!r} has {len(dataset)} conversations: none left to "
                          f"train on after {cfg.eval_conversations} held out (lower --eval-conversations)")
    # Everything that fixes which conversation comes when: a resume must see the same.
    data_identity = {"dataset": cfg.sft_dataset, "split": cfg.sft_split, "num_rows": len(dataset),
                     "num_train": num_train, "seed": cfg.seed, "rows_per_step": cfg.rows_per_step,
                     "max_seq_len": cfg.max_seq_len}
    if meta is not None and meta["loader"].get("packing") != PACKING:
        written_with = meta["loader"].get("packing", "32 conversations a step, each padded to the longest")
        raise ConfigError(f"{ckpt.path} was written with SFT batches of {written_with!r}, this trainer packs "
                          f"rows {PACKING!r}: finish it with the phoenix version that started it, or delete "
                          "sft_checkpoints/<MODEL_TAG> to redo SFT")
    if meta is not None and meta["data"] != data_identity:
        changed = sorted(k for k in data_identity if meta["data"].get(k) != data_identity[k])
        raise ConfigError(f"{ckpt.path} was trained on {meta['data']}; this run has {data_identity} (differs "
                          f"in {', '.join(changed)}): keep them to resume exactly")
    startup.lap("data_s")

    # --- model, from the base weights or our checkpoint --------------------------------------------------
    try:
        model_config = config_from_dict(origin["model_config"])
    except ValueError as exc:
        raise ConfigError(f"the base model: {exc}") from None
    if model_config.vocab_size != tokenizer.vocab_size:
        raise ConfigError(f"the model has vocab {model_config.vocab_size}, {base_dir / 'tokenizer'} has "
                          f"{tokenizer.vocab_size}: the tokenizer is not the one base training used")
    seed_everything(cfg.seed)
    model = build_model(model_config, d.device)  # also the rotary buffers, never checkpointed
    if cfg.max_seq_len > model.rotary_seq_len:
        raise ConfigError(f"--max-seq-len {cfg.max_seq_len} exceeds the model's rotary cache of "
                          f"{model.rotary_seq_len}")
    # The base run's unscaled lrs, then every group (scalars too) times init_lr_frac, as nanochat does.
    # No weight decay: base training's cosine ended it at 0. Schedules: trainer.sft_schedule.
    compile_update = compiles_update(cfg.compile, d.device, model.estimate_flops_per_token())
    optimizer = ShardedOptimizer(model, d, compile_update=compile_update, **origin["lrs"], weight_decay=0.0)
    for group in optimizer.groups:
        group.initial_lr *= cfg.init_lr_frac
    num_iterations = cfg.num_iterations
    if num_iterations <= 0:  # estimated from the conversations' lengths: the same on every launch
        num_iterations = max(1, round(cfg.num_epochs * steps_per_epoch(
            fetch, num_train, tokenizer, cfg.rows_per_step, cfg.max_seq_len, cfg.seed)))
    if ckpt is not None:
        check_optimizer_recipe(ckpt, meta)
        check_horizon(ckpt, meta, num_iterations)
        if meta.get("schedule") != SFT_SCHEDULE:
            written_by = meta.get("schedule", "linear decay from the first step (unrecorded)")
            raise ConfigError(f"{ckpt.path} was trained under SFT schedule {written_by!r}, this trainer runs "
                              f"{SFT_SCHEDULE!r}: finish it with the phoenix version that started it, or "
                              "delete sft_checkpoints/<MODEL_TAG> to redo SFT")

    # --- restore the trajectory state -----------------------------------------------------------------
    step = 0
    loop_state = {"smooth_loss": 0.0, "min_val_loss": float("inf"), "train_time": 0.0}
    loader_state = None
    # A lost run.json gets the base run's ids back (an SFT checkpoint holds base's W&B id + -sft).
    resumed = {**meta, "wandb_run_id": meta["wandb_run_id"].removesuffix("-sft")} if meta else base_meta
    identity = broadcast(run_identity(cfg.base_dir, cfg.model_tag, resumed) if d.is_main else None, d)
    # A W&B run of its own (steps restart at 0), with an id derived from the run's, stable across restarts.
    identity = {**identity, "wandb_run_id": f"{identity['wandb_run_id']}-sft"}
    if ckpt is not None:
        startup.lap()
        restore_trajectory(ckpt, meta, model, optimizer, d, cfg.seed)
        startup.lap("restore_s")
        step = meta["step"]
        loop_state = meta["loop_state"]
        loader_state = meta["loader"]
        identity = {**identity, "wandb_run_id": meta["wandb_run_id"], "run_id": meta["run_id"]}
    else:
        model.load_state_dict(load_tensors(base_ckpt, "model.safetensors"))
        log.info("fresh start from the base weights of step %d: %s", base_ckpt.step, base_ckpt.path)

    # Batches are as long as their longest row (packed rows are nearly full; held-out conversations are
    # padded to the longest of their batch): dynamic shapes, not a recompile per length.
    train_model, autocast = compute_setup(model, d, cfg.compile, dynamic=True)

    # --- batch geometry: the global batch is fixed; accumulation absorbs the world size ---------------
    # Micro-batches need not divide a rank's share: the loss is normalised per step, not per micro-batch.
    # `auto` measures the longest batch there can be: every row at max_seq_len.
    trials = TrialSteps(train_model, autocast, model, optimizer, d, cfg.max_seq_len, contiguous=True,
                        loss_reduction="sum")
    device_batch_size = resolve_device_batch(STAGE, parse_device_batch(cfg.device_batch_size),
                                             CPU_DEVICE_BATCH.get(cfg.preset, 1),
                                             cfg.rows_per_step // d.world_size, trials, step)
    startup.lap()
    loader = ChatLoader(fetch, num_train, tokenizer, cfg.rows_per_step, device_batch_size,
                        cfg.max_seq_len, d.rank, d.world_size, cfg.seed, loader_state)
    val_batches = eval_batches(fetch, range(num_train, len(dataset)), tokenizer, device_batch_size,
                               cfg.max_seq_len, d.rank, d.world_size)
    startup.lap("data_s")
    reporter = StepReporter(STAGE, cfg.base_dir, cfg.model_tag, d, model.estimate_flops_per_token(),
                            f"{cfg.wandb_run}-sft" if cfg.wandb_run else "", identity["wandb_run_id"],
                            wandb_config={**asdict(cfg), "base_step": origin["step"]}, startup=startup,
                            resumed=meta)
    checkpointer = AsyncCheckpointer(ckpt_dir, cfg.keep_last, d, stage=STAGE, model_tag=cfg.model_tag,
                                     run_id=identity["run_id"])
    log.info("sft dataset=%s split=%s conversations=%d train=%d held_out=%d horizon=%d steps of %d "
             "rows x %d world_size=%d device_batch=%d device=%s", cfg.sft_dataset, cfg.sft_split,
             len(dataset), num_train, cfg.eval_conversations, num_iterations, cfg.rows_per_step,
             cfg.max_seq_len, d.world_size, device_batch_size, d.device)

    def stage_meta(_ranks: list[Any]) -> dict[str, Any]:
        # The loader position is the same on every rank: the packer's, over the global order.
        return {"stage": STAGE, "num_iterations": num_iterations, "model_config": asdict(model_config),
                "config": asdict(cfg), "base": origin, "data": data_identity, "loop_state": loop_state,
                "loader": loader.state_dict(), "conversations": loader.consumed(),
                "run_id": identity["run_id"],
                "wandb_run_id": identity["wandb_run_id"], "tokenizer_sha256": tokenizer_sha,
                "stopped": stop_now, "schedule": SFT_SCHEDULE}

    def evaluate() -> None:
        val_loss = evaluate_loss(model, val_batches, d, autocast)
        loop_state["min_val_loss"] = min(loop_state["min_val_loss"], val_loss)
        reporter.value(step, "val_loss", val_loss)

    # Rank 0, greedy, on the bare model: no RNG drawn and no collective, so the trajectory is untouched.
    sampler = Engine(model, tokenizer, autocast) if d.is_main and cfg.sample_every > 0 else None

    def sample() -> None:
        prompts = [sampler.chat_prompt([{"role": "user", "content": q}]) for q in SAMPLE_QUESTIONS]
        completions = sampler.generate(prompts, SAMPLE_TOKENS)
        reporter.samples(step, [(q, sampler.decode(c)) for q, c in zip(SAMPLE_QUESTIONS, completions,
                                                                         strict=True)])

    # --- the loop ------------------------------------------------------------------------------------
    evaluating = cfg.eval_every > 0 and cfg.eval_conversations > 0
    stop_now = False
    train_start = time.time() - loop_state["train_time"]
    gc_habit = FrozenGC()
    saves = SaveSchedule(cfg.save_every, STAGE, step,
                         lambda: stage_history(cfg.base_dir, cfg.model_tag, STAGE))
    # A CUDA out-of-memory ends the stage with its report (trainer.train's loop says why).
    with exit_on_out_of_memory(STAGE, device_batch_size, d.device, lambda: step + 1, checkpointer.wait):
        if step == 0 and evaluating:
            evaluate()
        while step < num_iterations and not stop_now:
            t0 = time.perf_counter()
            lrm = set_sft_schedule(optimizer.groups, step, num_iterations)
            batch = loader.next_step()
            # The loss is a mean over the assistant tokens of the GLOBAL batch, so every rank needs their
            # total first; then any world size (and micro-batch split) gives the same objective.
            counts = torch.tensor([batch.num_targets, batch.num_tokens], dtype=torch.float64, device=d.device)
            if d.world_size > 1:
                dist.all_reduce(counts)
            # The optimizer step averages gradients over ranks: scale by world_size so they come out as the
            # global sum / count.
            scale = d.world_size / max(counts[0].item(), 1.0)
            loss_sum = torch.zeros((), device=d.device)
            for x, y in batch.micro_batches:  # gradients accumulate locally; ranks meet in optimizer.step()
                inject_oom(step + 1, len(x), d.device)  # tests only: PHOENIX_TEST_OOM
                x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
                with autocast:
                    loss = train_model(x, y, loss_reduction="sum") * scale
                loss.backward()
                loss_sum += loss.detach() / d.world_size
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            train_loss, stop_now, save_now = agree(loss_sum, stop, checkpointer, d, saves.due(step))
            loop_state["train_time"] = time.time() - train_start
            dt = time.perf_counter() - t0
            reporter.step(step, num_iterations, train_loss, loop_state, lrm, dt, counts[1].item())
            saves.observe_step(dt)
            gc_habit.after_step(step)  # after the step's log line, as nanochat
            if evaluating and (step % cfg.eval_every == 0 or step == num_iterations):
                evaluate()
            if sampler and (step % cfg.sample_every == 0 or step == num_iterations):
                sample()
            if save_now or stop_now or step == num_iterations:
                # The final checkpoint is marked done: a relaunch skips the finished stage.
                stall = save_checkpoint(checkpointer, step, step == num_iterations, model, optimizer, d,
                                        stage_meta)
                saves.saved(step, stall, checkpointer.timing.get("total_s", 0.0), loop_state["train_time"])

    checkpointer.wait()
    if stop_now:
        stop.report_saved(step, checkpointer)
        log.info("emergency checkpoint published at step %d: exiting for resume", step)
    else:
        log.info("sft stage finished at step %d", step)
    reporter.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
