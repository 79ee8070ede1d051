"""Processes and the sharded optimizer step: each parameter has one owner rank, which alone keeps its
optimizer state and updates it; gradients are reduced to the owners and the new weights sent back.

ZeRO-2 without DDP, as nanochat's optimizer does it, but sharded by parameter NAME: which rank owns what
is a pure function of the names, their sizes and the world size (`assign_owners`), and the optimizer
state stays a dict keyed by name: each rank saves its own share and a run resumes on any GPU count, each
rank reading the names it owns from whichever files hold them. One process runs the same code with every
collective skipped.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from trainer.model import GPT
from trainer.optim import HybridOptimizer

# ---------------------------------------------------------------------------------------------------
# Processes

CHECKPOINT_EXCHANGE_TIMEOUT = timedelta(minutes=10)  # the longest a rank may take to write its files


@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    # A gloo group of its own for the checkpoint writer threads, which meet there while the training
    # thread goes on with the default group (None with one process).
    checkpoint_group: Any = None

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
    checkpoint_group = None
    if world_size > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
        # Bounded: a writer thread whose peer died must end (with an error), not hold the process open.
        checkpoint_group = dist.new_group(backend="gloo", timeout=CHECKPOINT_EXCHANGE_TIMEOUT)
    return Dist(rank, local_rank, world_size, device, checkpoint_group)


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
# The sharded step


def assign_owners(sizes: Sequence[tuple[str, int]], world_size: int) -> dict[str, int]:
    """Owner rank per parameter name: largest first, each to the least-loaded rank (the lowest on a tie),
    so every rank's share is within one parameter of an even split. `sizes` in model order."""
    loads = [0] * world_size
    owners = {}
    for name, size in sorted(sizes, key=lambda item: -item[1]):  # stable: model order breaks size ties
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[name] = rank
        loads[rank] += size
    return {name: owners[name] for name, _ in sizes}


class ShardedOptimizer:
    """HybridOptimizer across ranks: each rank holds the state of, and updates, only the names it owns.

    Gradients accumulate (any number of micro-batches, no communication) in one flat buffer laid out rank
    by rank, each rank's names in its region: every `p.grad` is a view into it. step() reduce-scatters
    the buffer (each rank receives the average of its region), runs its updates, then all-gathers every
    region's new weights through the same buffer and copies them into the parameters. zero_grad() zeroes
    the buffer, keeping the views.
    """

    def __init__(self, model: GPT, d: Dist, compile_update: bool = False, **hyperparameters: Any) -> None:
        """hyperparameters: HybridOptimizer's (learning rates, weight decay, schedule)."""
        self.d = d
        self.params = dict(model.named_parameters())
        sizes = [(name, p.numel()) for name, p in self.params.items()]
        self.owners = assign_owners(sizes, d.world_size)
        self.optimizer = HybridOptimizer(model, owned={n for n, r in self.owners.items() if r == d.rank},
                                         compile_update=compile_update, **hyperparameters)
        self.groups = self.optimizer.groups
        dtypes = {p.dtype for p in self.params.values()}
        if len(dtypes) != 1:
            raise ValueError(f"one gradient buffer needs one parameter dtype, the model has {dtypes}")
        loads = [sum(size for name, size in sizes if self.owners[name] == r) for r in range(d.world_size)]
        self.region = -(-max(loads) // 64) * 64  # regions padded to the largest, 256-byte aligned
        self.flat = torch.zeros(d.world_size * self.region, dtype=dtypes.pop(), device=d.device)
        self.views: dict[str, torch.Tensor] = {}
        for rank in range(d.world_size):
            offset = rank * self.region
            for name, size in sizes:
                if self.owners[name] == rank:
                    self.views[name] = self.flat[offset:offset + size].view_as(self.params[name])
                    offset += size
        for name, p in self.params.items():
            p.grad = self.views[name]
        # The reduce-scatter's output, then the all-gather's input: this rank's region on its own.
        self.chunk = torch.empty_like(self.flat[:self.region]) if d.world_size > 1 else None

    def set_schedule(self, step: int, num_iterations: int) -> None:
        self.optimizer.set_schedule(step, num_iterations)

    @torch.no_grad()
    def step(self) -> None:
        d = self.d
        for name, p in self.params.items():  # autograd accumulates in place into an existing .grad
            if p.grad is None or p.grad.data_ptr() != self.views[name].data_ptr():
                raise RuntimeError(f"{name}.grad no longer points into the gradient buffer: use "
                                   "ShardedOptimizer.zero_grad(), never set .grad")
        mine = self.flat[d.rank * self.region:(d.rank + 1) * self.region]
        if self.chunk is not None:
            dist.reduce_scatter_single(self.chunk, self.flat)  # summed (gloo has no average) ...
            mine.copy_(self.chunk.div_(d.world_size))  # ... then averaged: the owned grads' views see it
        self.optimizer.step()
        if self.chunk is None:
            return
        owned = self.optimizer.owned_names
        torch._foreach_copy_([self.views[n] for n in owned], [self.params[n].detach() for n in owned])
        self.chunk.copy_(mine)
        dist.all_gather_single(self.flat, self.chunk)
        others = [n for n in self.params if self.owners[n] != d.rank]
        torch._foreach_copy_([self.params[n].detach() for n in others], [self.views[n] for n in others])

    def zero_grad(self) -> None:
        self.flat.zero_()

    def state_bytes(self) -> int:
        """The optimizer state this rank holds: its share, not the whole."""
        return sum(t.numel() * t.element_size() for t in self.optimizer.state.values())

    # --- checkpoints: name-keyed state, each rank's share in a file of its own, any world size on load --

    def state_keys(self) -> list[str]:
        """Every state key of every rank, as a checkpoint holds them."""
        return self.optimizer.state_keys(self.params)

    def state_share(self) -> dict[str, torch.Tensor]:
        """The state of the names this rank owns, keyed by name (the live tensors: the checkpointer copies
        them before the next step). Each rank saves its own share, in parallel; no rank gathers."""
        return self.optimizer.state_tensors()

    def load_state(self, saved_keys: Sequence[str],
                   load: Callable[[list[str]], dict[str, torch.Tensor]]) -> None:
        """Restore this rank's share of a checkpoint's state, whatever world size wrote it: `saved_keys` is
        every key the checkpoint holds (checked against every rank's), `load(keys)` reads just those keys,
        from whichever files hold them, into a dict of tensors."""
        expected = self.state_keys()
        missing, unexpected = sorted(set(expected) - set(saved_keys)), sorted(set(saved_keys) - set(expected))
        if missing or unexpected:
            raise ValueError(f"optimizer state mismatch: missing keys {missing}, unexpected {unexpected}")
        mine = self.optimizer.state_keys(self.optimizer.owned_names)
        # Step counters stay 0-d CPU tensors (reading them costs no device sync); the rest goes to the device.
        self.optimizer.load_state_tensors({k: v.to(self.d.device) if v.dim() else v
                                           for k, v in load(mine).items()})

