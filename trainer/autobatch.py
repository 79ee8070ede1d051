"""The device batch that fits the card: `--device-batch-size auto`, found by real steps before the first one.

The global batch is fixed (a step's rows are the same however they are split: trainer.dataloader), so
the device batch only decides how many rows one forward + backward holds; gradient accumulation runs the
rest. Another device batch adds the same rows' gradients in another order: the losses agree to float
rounding, not bitwise.

On CUDA, `auto` measures: the compiled forward + backward of random tokens (and the optimizer step, once)
at powers of two up to the rows per rank. The first size tried is the largest the arithmetic of
activation_bytes_per_token allows; from there the search goes up while the measured memory per row says
the next size fits the budget (1 - SAFETY_MARGIN of what this process may allocate), and down after an
out-of-memory or a peak over budget. Every size tried is one static-shape compile, the chosen one being
the graph that training then runs. Weights, optimizer state and RNG are put back bit for bit, so the
search leaves no trace in the trajectory. On the CPU, `auto` is the preset's fixed device batch.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from trainer.distributed import Dist, ShardedOptimizer, broadcast
from trainer.model import GPTConfig
from trainer.out_of_memory import OutOfMemory
from trainer.runtime import ConfigError

log = logging.getLogger("phoenix.train")

# Of the memory this process may allocate, what the search leaves free above a trial's peak: allocator
# fragmentation over a long run, evaluation and sampling batches, the checkpoint's staging copies.
SAFETY_MARGIN = 0.10
TEST_OOM_VARIABLE = "PHOENIX_TEST_OOM"  # tests and the GPU check only: see inject_oom


def parse_device_batch(value: str) -> int | None:
    """--device-batch-size: `auto` -> None, else a positive number of rows."""
    if value.strip().lower() == "auto":
        return None
    if not value.strip().isdigit() or int(value) <= 0:
        raise ConfigError(f"--device-batch-size {value!r}: use auto (the largest that fits the GPU) or a "
                          "positive number of sequences per forward pass")
    return int(value)


def power_of_two_sizes(rows_per_rank: int, divisors_only: bool) -> list[int]:
    """The device batches `auto` considers, ascending: powers of two up to the rows per rank (that divide
    them, where a micro-batch must: base training's lanes)."""
    sizes, rows = [], 1
    while rows <= rows_per_rank:
        if not divisors_only or rows_per_rank % rows == 0:
            sizes.append(rows)
        rows *= 2
    return sizes


def activation_bytes_per_token(config: GPTConfig) -> int:
    """Arithmetic for the first guess (and README's table): what a compiled step keeps per token for the
    backward at bf16, counting only tensors a graph cannot recompute from cheaper ones.

    Per layer: its input, q and k before QK-norm, v, the attention output, the residual after attention
    and the MLP's 4x-wide hidden layer before ReLU² (norms, rotary and ReLU² are recomputed), and on every
    other layer the value embedding. At the head: the bf16 logits, and in the backward their float32 and
    bf16 gradients. The search measures the real figure; this only picks where it starts.
    """
    c = config
    kv = c.n_kv_head * (c.n_embd // c.n_head)
    per_layer = c.n_embd * (1 + 1 + 1 + 1 + 4) + 2 * kv + kv / 2
    return int(2 * c.n_layer * per_layer + (2 + 4 + 2) * c.vocab_size)


def usable_bytes(device: torch.device) -> int | None:
    """What this process may allocate on `device`: the card's memory under any per-process fraction,
    less what other processes hold; None on the CPU (nothing measured there)."""
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    capped = int(total * torch.cuda.get_per_process_memory_fraction(device))
    free, _ = torch.cuda.mem_get_info(device)
    return min(capped, free + torch.cuda.memory_reserved(device))


def card_gib(device: torch.device) -> float:
    usable = usable_bytes(device)
    return usable / 2**30 if usable else 0.0


@functools.lru_cache(maxsize=4)
def _test_oom_spec(spec: str) -> tuple[int, int]:
    fields = dict(item.split("=", 1) for item in spec.split(","))
    return int(fields["rows"]), int(fields.get("from_step", 0))


def inject_oom(step: int, rows: int, device: torch.device) -> None:
    """Test-only: PHOENIX_TEST_OOM="rows=R[,from_step=S]" makes every forward of more than R rows run out
    of memory from step S on (0, the default: the device batch search too). On CUDA it asks the allocator
    for twice the card, a real out-of-memory; on the CPU it raises the error the allocator would."""
    spec = os.environ.get(TEST_OOM_VARIABLE)
    if not spec:
        return
    max_rows, from_step = _test_oom_spec(spec)
    if rows <= max_rows or step < from_step:
        return
    if device.type == "cuda":
        card = torch.cuda.get_device_properties(device).total_memory
        torch.empty(2 * card, dtype=torch.uint8, device=device)
    raise torch.OutOfMemoryError(f"{TEST_OOM_VARIABLE}={spec}: {rows} rows at step {step}")


def search(sizes: list[int], first: int, base: float, measure: Callable[[int], float | None]
           ) -> tuple[int | None, dict[int, float | None]]:
    """The largest size whose measured use fits, and every measurement: {size: use or None}.

    `measure(size)` is the peak as a share of the budget (fits: <= 1), None for an out-of-memory; `base`
    the share held before any trial (weights, gradients, optimizer state). From `first`: up while the use
    projected linearly from the last fit (base + rows x its use per row, an overestimate by the trial's
    constant part) fits, down while a size does not fit.
    """
    tried: dict[int, float | None] = {}

    def fits(size: int) -> bool:
        tried[size] = measure(size)
        return tried[size] is not None and tried[size] <= 1.0

    i = sizes.index(first)
    if not fits(sizes[i]):
        while i > 0:
            i -= 1
            if fits(sizes[i]):
                return sizes[i], tried
        return None, tried
    while i + 1 < len(sizes):
        per_row = (tried[sizes[i]] - base) / sizes[i]
        if base + per_row * sizes[i + 1] > 1.0 or not fits(sizes[i + 1]):
            break
        i += 1
    return sizes[i], tried


class TrialSteps:
    """`self(rows)`: a real training step's forward + backward at `rows` rows of random tokens (and the
    optimizer step, the first time one fits), its peak memory as a share of the budget, the highest of all
    ranks; None when any rank ran out of memory. `restore()` puts weights, optimizer state and RNG back.

    The inputs are shaped as the stage's own (`contiguous`: SFT's collated rows; else views of one row of
    seq_len + 1 tokens, as the lane loader's), and `loss_kwargs` are the stage's: a static-shape compile
    guards on both, and the size chosen must be the graph training runs."""

    def __init__(self, train_model: torch.nn.Module, autocast: Any, model: torch.nn.Module,
                 optimizer: ShardedOptimizer, d: Dist, seq_len: int, contiguous: bool = False,
                 **loss_kwargs: Any) -> None:
        self.train_model, self.autocast, self.model, self.optimizer = train_model, autocast, model, optimizer
        self.d, self.seq_len, self.contiguous, self.loss_kwargs = d, seq_len, contiguous, loss_kwargs
        self.cuda = d.device.type == "cuda"
        usable = usable_bytes(d.device)
        self.budget = (1 - SAFETY_MARGIN) * usable if usable else None
        self._rng = (torch.get_rng_state(), torch.cuda.get_rng_state(d.device) if self.cuda else None)
        self._saved: dict[str, Any] | None = None  # weights and optimizer state, once a trial stepped

    def held(self) -> float:
        """The share of the budget held now (0 on the CPU)."""
        return torch.cuda.memory_allocated(self.d.device) / self.budget if self.budget else 0.0

    def __call__(self, rows: int) -> float | None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.d.device)
        try:
            self._forward_backward(rows)
            out_of_memory = False
        except torch.OutOfMemoryError:
            out_of_memory = True
        self._free()
        verdict = self._agree(out_of_memory)
        if verdict is not None and self._saved is None:  # the optimizer step, once: rows do not change it
            self._save()
            self.optimizer.step()
            verdict = self._agree(False)
        self.optimizer.zero_grad()
        return verdict

    def _forward_backward(self, rows: int) -> None:
        """In a frame of its own: an out-of-memory's traceback holds only this frame's activations."""
        inject_oom(0, rows, self.d.device)
        tokens = torch.randint(0, self.model.config.vocab_size, (rows, self.seq_len + 1),
                               generator=torch.Generator().manual_seed(rows))
        x, y = tokens[:, :-1], tokens[:, 1:]
        if self.contiguous:
            x, y = x.contiguous(), y.contiguous()
        with self.autocast:
            loss = self.train_model(x.to(self.d.device), y.to(self.d.device), **self.loss_kwargs)
        loss.backward()

    def _free(self) -> None:
        gc.collect()  # an out-of-memory's traceback frames held activations
        if self.cuda:
            torch.cuda.synchronize(self.d.device)
            torch.cuda.empty_cache()

    def _agree(self, out_of_memory: bool) -> float | None:
        peak = torch.cuda.max_memory_allocated(self.d.device) / self.budget if self.budget else 0.0
        flags = torch.tensor([float(out_of_memory), peak], dtype=torch.float64, device=self.d.device)
        if self.d.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return None if flags[0].item() else flags[1].item()

    def _save(self) -> None:
        def host(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {name: t.detach().to("cpu", copy=True) for name, t in tensors.items()}

        self._saved = {"params": host(dict(self.model.named_parameters())),
                       "optimizer": host(self.optimizer.optimizer.state)}

    @torch.no_grad()
    def restore(self) -> None:
        """Weights, optimizer state and RNG as they were before the first trial; gradients zero."""
        self.optimizer.zero_grad()
        cpu_rng, cuda_rng = self._rng
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, self.d.device)
        if self._saved is None:
            return
        for name, p in self.model.named_parameters():
            p.copy_(self._saved["params"][name])
        for key, t in self.optimizer.optimizer.state.items():
            t.copy_(self._saved["optimizer"][key])
        self._saved = None
        self._free()


@contextmanager
def exit_on_out_of_memory(stage: str, device_batch_size: int, device: torch.device, step: Callable[[], int],
                          before_exit: Callable[[], None]) -> Iterator[None]:
    """A CUDA out-of-memory in the block ends the stage with its OutOfMemory report (stage_main logs it),
    after `before_exit` (waiting for the checkpoint in flight: the relaunch resumes from it)."""
    try:
        yield
    except torch.OutOfMemoryError:
        before_exit()
        raise OutOfMemory(stage, step(), device_batch_size, card_gib(device)) from None


def resolve_device_batch(stage: str, setting: int | None, cpu_default: int, rows_per_rank: int,
                         trials: TrialSteps, step: int, divisors_only: bool = False) -> int:
    """The device batch of this launch (`step`: the one it starts from). A number: the largest size <= it
    that fits the rows per rank (that divides them, with `divisors_only`: base training's lanes). `auto`:
    the CPU's default there, else the search on the real step (`trials`). Raises OutOfMemory when not
    even one row fits."""
    d = trials.d
    setting = broadcast(setting, d)  # every rank as rank 0: the search's collectives run on all or none
    if setting is not None or not trials.cuda:
        requested = setting if setting is not None else cpu_default
        chosen = max(b for b in range(1, min(requested, rows_per_rank) + 1)
                     if not divisors_only or rows_per_rank % b == 0)
        if chosen != requested:
            log.info("device batch %d -> %d so that %d sequences per rank split evenly", requested, chosen,
                     rows_per_rank)
        return chosen
    start = time.perf_counter()
    sizes = power_of_two_sizes(rows_per_rank, divisors_only)
    base = trials.held()
    per_row = activation_bytes_per_token(trials.model.config) * trials.seq_len / trials.budget
    first = max([b for b in sizes if base + b * per_row <= 1.0] or sizes[:1])
    try:
        chosen, tried = search(sizes, first, base, trials)
    except torch.OutOfMemoryError:  # in the optimizer step: weights and optimizer state alone fill the card
        raise OutOfMemory(stage, step, 1, card_gib(d.device)) from None
    finally:
        trials.restore()
    budget_gib = trials.budget / 2**30
    tried_text = ",".join(f"{b}:{'oom' if use is None else f'{use * budget_gib:.1f}'}"
                          for b, use in tried.items())
    if chosen is None:
        log.error("event=device_batch stage=%s mode=auto chosen=none tried_gib=%s budget_gib=%.1f", stage,
                  tried_text, budget_gib)
        raise OutOfMemory(stage, step, 1, card_gib(d.device))
    log.info("event=device_batch stage=%s mode=auto chosen=%d grad_accum=%d peak_gib=%.1f budget_gib=%.1f "
             "card_gib=%.1f total_gib=%.1f tried_gib=%s seconds=%.0f", stage, chosen,
             -(-rows_per_rank // chosen),
             tried[chosen] * budget_gib, budget_gib, card_gib(d.device),
             torch.cuda.get_device_properties(d.device).total_memory / 2**30, tried_text,
             time.perf_counter() - start)
    return chosen
