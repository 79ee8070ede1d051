"""One rank of tests/test_distributed.py's two-process run (torchrun, gloo): sharded steps on half of each
global batch, each rank's share of the state, a resume from a one-process state, and a 1 -> 2 -> 1 resume
through the trainer's checkpoint files; rank 0 also trains the one-process reference on the whole batch.
Everything it saw goes to files in OUT for the test to compare:
`python -m torch.distributed.run --nproc_per_node=2 -m tests.sharded_worker OUT`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from tests.helpers import checkpoint_meta
from trainer import checkpoint_layout as layout
from trainer.checkpoint import AsyncCheckpointer
from trainer.distributed import Dist, ShardedOptimizer, init_distributed
from trainer.model import GPT, GPTConfig, build_model
from trainer.resume import restore_trajectory, save_checkpoint

TINY = GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)
GLOBAL_ROWS, STEPS, NUM_ITERATIONS = 8, 3, 6


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.randint(0, TINY.vocab_size, (GLOBAL_ROWS, TINY.sequence_len + 1),
                        generator=torch.Generator().manual_seed(step))
    return idx[:, :-1], idx[:, 1:]


def train(model: GPT, optimizer: ShardedOptimizer, steps: range, rows: slice, micro_batches: int) -> None:
    """As trainer/train.py does: the rank's rows in micro-batches, loss / their count, one step."""
    for step in steps:
        optimizer.set_schedule(step, NUM_ITERATIONS)
        x, y = global_batch(step)
        for mx, my in zip(x[rows].chunk(micro_batches), y[rows].chunk(micro_batches), strict=True):
            (model(mx, my) / micro_batches).backward()
        optimizer.step()
        optimizer.zero_grad()


def build(d: Dist) -> tuple[GPT, ShardedOptimizer]:
    torch.manual_seed(0)
    model = build_model(TINY, "cpu")
    return model, ShardedOptimizer(model, d, weight_decay=0.1)


def save(model: GPT, optimizer: ShardedOptimizer, d: Dist, step: int, out: Path) -> None:
    """The trainer's own save (every rank its optimizer share, in parallel), waited for."""
    checkpointer = AsyncCheckpointer(layout.stage_dir(out, "base", "sharded"), 10, d, stage="base")
    save_checkpoint(checkpointer, step, False, model, optimizer, d, lambda _ranks: checkpoint_meta(step))
    checkpointer.wait()


def resume(d: Dist, out: Path) -> tuple[GPT, ShardedOptimizer, int]:
    """A fresh model and optimizer, restored from the newest checkpoint save() wrote."""
    model, optimizer = build(d)
    ckpt = layout.latest(layout.stage_dir(out, "base", "sharded"))
    restore_trajectory(ckpt, ckpt.meta(), model, optimizer, d, seed=0)
    return model, optimizer, ckpt.step


def main(out: Path) -> None:
    d = init_distributed("cpu")
    rank, world = d.rank, d.world_size
    half = GLOBAL_ROWS // world
    one = Dist(0, 0, 1, d.device)  # rank 0 on its own: the one-process runs
    model, optimizer = build(d)
    train(model, optimizer, range(STEPS), slice(rank * half, (rank + 1) * half), 1)
    save_file(model.state_dict(), str(out / f"model_rank{rank}.safetensors"))
    inner = optimizer.optimizer
    (out / f"rank{rank}.json").write_text(json.dumps({
        "owned": inner.owned_names, "state_keys": sorted(inner.state),
        "state_numel": sum(t.numel() for t in inner.state.values()), "owners": optimizer.owners}))
    save_file(optimizer.state_share(), str(out / f"share_rank{rank}.safetensors"))
    if rank == 0:
        # The one-process run on the whole batch, in two micro-batches: the same code, no collective.
        # Checkpointed at STEPS, then two more steps: the reference of the 1 -> 2 -> 1 resume below.
        ref_model, ref_optimizer = build(one)
        train(ref_model, ref_optimizer, range(STEPS), slice(None), world)
        save_file(ref_model.state_dict(), str(out / "reference_model.safetensors"))
        save_file(ref_optimizer.state_share(), str(out / "reference_optimizer.safetensors"))
        save(ref_model, ref_optimizer, one, STEPS, out)
        train(ref_model, ref_optimizer, range(STEPS, STEPS + 1), slice(None), world)
        save_file(ref_model.state_dict(), str(out / "reference_model_next.safetensors"))
        train(ref_model, ref_optimizer, range(STEPS + 1, STEPS + 2), slice(None), world)
        save_file(ref_model.state_dict(), str(out / "reference_model_final.safetensors"))
    dist.barrier()
    # Resume the one-process state on two ranks: each keeps only its names' state, one step on.
    resumed, resumed_optimizer = build(d)
    resumed.load_state_dict(load_file(str(out / "reference_model.safetensors")))
    saved = load_file(str(out / "reference_optimizer.safetensors"))
    resumed_optimizer.load_state(list(saved), lambda keys: {k: saved[k] for k in keys})
    train(resumed, resumed_optimizer, range(STEPS, STEPS + 1), slice(rank * half, (rank + 1) * half), 1)
    save_file(resumed.state_dict(), str(out / f"resumed_model_rank{rank}.safetensors"))
    # 1 -> 2 -> 1 through checkpoint files: the one-process checkpoint resumed on two ranks for a step,
    # saved by both (a share each), then resumed by one process for the last step.
    model, optimizer, step = resume(d, out)
    train(model, optimizer, range(step, step + 1), slice(rank * half, (rank + 1) * half), 1)
    save(model, optimizer, d, step + 1, out)
    dist.barrier()
    if rank == 0:
        model, optimizer, step = resume(one, out)
        train(model, optimizer, range(step, step + 1), slice(None), world)
        save_file(model.state_dict(), str(out / "resumed_121_model.safetensors"))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(Path(sys.argv[1]))
