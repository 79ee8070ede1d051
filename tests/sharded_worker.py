"""One rank of tests/test_distributed.py's two-process run (torchrun, gloo): sharded steps on half of each
global batch, the gathered checkpoint state, and a resume from a one-process checkpoint; rank 0 also
trains the one-process reference on the whole batch. Everything it saw goes to files in OUT for the test
to compare: `python -m torch.distributed.run --nproc_per_node=2 -m tests.sharded_worker OUT`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from trainer.distributed import Dist, ShardedOptimizer
from trainer.model import GPT, GPTConfig, build_model

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


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    d = Dist(rank, rank, world, torch.device("cpu"))
    half = GLOBAL_ROWS // world
    model, optimizer = build(d)
    train(model, optimizer, range(STEPS), slice(rank * half, (rank + 1) * half), 1)
    save_file(model.state_dict(), str(out / f"model_rank{rank}.safetensors"))
    inner = optimizer.optimizer
    (out / f"rank{rank}.json").write_text(json.dumps({
        "owned": inner.owned_names, "state_keys": sorted(inner.state),
        "state_numel": sum(t.numel() for t in inner.state.values()), "owners": optimizer.owners}))
    gathered = optimizer.gather_state()
    if rank == 0:
        save_file(gathered, str(out / "gathered_optimizer.safetensors"))
        # The one-process run on the whole batch, in two micro-batches: the same code, no collective.
        ref_model, ref_optimizer = build(Dist(0, 0, 1, d.device))
        train(ref_model, ref_optimizer, range(STEPS), slice(None), world)
        save_file(ref_model.state_dict(), str(out / "reference_model.safetensors"))
        save_file(ref_optimizer.gather_state(), str(out / "reference_optimizer.safetensors"))
        train(ref_model, ref_optimizer, range(STEPS, STEPS + 1), slice(None), world)
        save_file(ref_model.state_dict(), str(out / "reference_model_next.safetensors"))
    dist.barrier()
    # Resume the one-process checkpoint on two ranks: each keeps only its names' state, one step on.
    resumed, resumed_optimizer = build(d)
    resumed.load_state_dict(load_file(str(out / "reference_model.safetensors")))
    saved = load_file(str(out / "reference_optimizer.safetensors"))
    resumed_optimizer.load_state(list(saved), lambda keys: {k: saved[k] for k in keys})
    train(resumed, resumed_optimizer, range(STEPS, STEPS + 1), slice(rank * half, (rank + 1) * half), 1)
    save_file(resumed.state_dict(), str(out / f"resumed_model_rank{rank}.safetensors"))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(Path(sys.argv[1]))
