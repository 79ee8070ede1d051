"""Step time and per-rank optimizer time of the sharded optimizer step, on 1 or N processes.

    python -m bench.sharded_step                                         # one process
    torchrun --standalone --nproc_per_node=2 -m bench.sharded_step       # gloo on CPU, nccl on CUDA

Each rank trains depth 4 / width 256 / seq 512 / vocab 8192 (flags change it) on its share of a fixed
global batch and prints one line: the step (forward, backward, optimizer step), the optimizer step
(reduce-scatter, its own updates, all-gather), its own updates alone, and the optimizer state it holds.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

from trainer.distributed import Dist, ShardedOptimizer
from trainer.model import build_model, config_for_depth


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.sharded_step")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--aspect-ratio", type=int, default=64)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--global-rows", type=int, default=2, help="sequences per step, over all ranks")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
        else torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(0)
    model = build_model(config_for_depth(args.depth, args.vocab, args.seq, args.aspect_ratio, args.head_dim),
                        device)
    optimizer = ShardedOptimizer(model, Dist(rank, device.index or 0, world, device))
    rows = args.global_rows // world
    data = torch.Generator().manual_seed(rank)
    x = torch.randint(0, args.vocab, (rows, args.seq), generator=data).to(device)
    y = torch.randint(0, args.vocab, (rows, args.seq), generator=data).to(device)
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        if world > 1:  # so that a rank's times leave out waiting for a slower one's backward
            dist.barrier()

    step_s = optimizer_s = update_s = 0.0
    for step in range(args.steps + 2):  # two warm-up steps
        sync()
        start = time.perf_counter()
        model(x, y).backward()
        sync()
        before_optimizer = time.perf_counter()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= 2:
            step_s += time.perf_counter() - start
            optimizer_s += time.perf_counter() - before_optimizer
            start = time.perf_counter()  # this rank's own updates alone, once more on the same gradients
            optimizer.optimizer.step()
            sync()
            update_s += time.perf_counter() - start
        optimizer.zero_grad()
    print(json.dumps({"rank": rank, "world_size": world, "device": str(device),
                      "step_ms": round(1000 * step_s / args.steps, 1),
                      "optimizer_ms": round(1000 * optimizer_s / args.steps, 1),
                      "own_updates_ms": round(1000 * update_s / args.steps, 1),
                      "owned_params": len(optimizer.optimizer.owned_names),
                      "state_mib": round(optimizer.state_bytes() / 2**20, 1)}))
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
