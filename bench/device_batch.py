"""The device batch `auto` picks per card: by arithmetic anywhere, measured on a GPU.

    python bench/device_batch.py                                # the arithmetic (README's table), no GPU
    python bench/device_batch.py --depth 12 20 --world-size 1   # ... for one GPU, as the GPU check runs
    python bench/device_batch.py --measure --depth 20           # on a GPU: the real search at each card
                                                                # size (a capped memory fraction) + tok/s

The arithmetic: per rank, fp32 weights, the gradient buffer (and the reduce-scatter's chunk), this rank's
optimizer state under the sharded optimizer, bf16 copies of the matmul weights (autocast), then per
row trainer.autobatch.activation_bytes_per_token x seq_len; the largest power of two dividing the rows
per rank that fits 1 - SAFETY_MARGIN of the card. The measurement is the trainer's own search
(resolve_device_batch) under torch.cuda.set_per_process_memory_fraction, then a step at its choice.
"""

from __future__ import annotations

import argparse
import math
import re
import time
from pathlib import Path
from typing import Any

import torch

from trainer.autobatch import SAFETY_MARGIN, TrialSteps, activation_bytes_per_token, resolve_device_batch
from trainer.distributed import Dist, ShardedOptimizer, assign_owners
from trainer.hardware import peak_flops
from trainer.model import GPT, build_model, config_for_depth
from trainer.optim import HybridOptimizer
from trainer.recipe import REFERENCE_BATCH, REFERENCE_DEPTH, plan, scaling_params
from trainer.runtime import compute_setup

# What such cards report to torch (total_memory), in GiB: RTX 4090, A100 40GB, H100 80GB, H200.
CARDS_GIB = {24: 23.6, 40: 39.4, 80: 79.1, 141: 139.8}
NANOCHAT_DEVICE_BATCH = {12: 32, 20: 32, 24: 16, 26: 16}  # nanochat's fixed choice (its speedrun scripts)
SEQ, VOCAB = 2048, 32768


def rows_per_step(depth: int) -> int:
    """The preset's global batch in rows (trainer.recipe's horizon rule, as trainer/train.py derives it)."""
    with torch.device("meta"):
        model, reference = GPT(config_for_depth(depth, VOCAB, SEQ)), GPT(config_for_depth(REFERENCE_DEPTH,
                                                                                          VOCAB, SEQ))
    run_plan = plan(scaling_params((n, p.numel()) for n, p in model.named_parameters()),
                    scaling_params((n, p.numel()) for n, p in reference.named_parameters()),
                    12.0, -1, -1, 0.28, REFERENCE_BATCH)
    return run_plan.total_batch_size // SEQ


def fixed_bytes(depth: int, world_size: int) -> dict[str, int]:
    """Per rank, what a training step holds whatever the device batch (the largest rank's share)."""
    with torch.device("meta"):
        model = GPT(config_for_depth(depth, VOCAB, SEQ))
        optimizer = HybridOptimizer(model)
    sizes = [(n, p.numel()) for n, p in model.named_parameters()]
    owners = assign_owners(sizes, world_size)
    region = -(-max(sum(s for n, s in sizes if owners[n] == r) for r in range(world_size)) // 64) * 64
    state = [sum(t.numel() * 4 for n in optimizer.param_names if owners[n] == r
                 for t in optimizer.new_state(n).values() if t.dim()) for r in range(world_size)]
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    gradients = 4 * region * (world_size + (world_size > 1))  # the buffer, and the reduce-scatter's chunk
    return {"weights": 4 * sum(s for _, s in sizes), "gradients": gradients, "optimizer": max(state),
            "bf16_weight_copies": 2 * linear}


def predicted(depth: int, card_gib: float, world_size: int) -> dict[str, Any]:
    per_rank = rows_per_step(depth) // world_size
    fixed = sum(fixed_bytes(depth, world_size).values())
    per_row = activation_bytes_per_token(config_for_depth(depth, VOCAB, SEQ)) * SEQ
    budget = (1 - SAFETY_MARGIN) * card_gib * 2**30
    fits = [b for b in (2**k for k in range(12)) if b <= per_rank and per_rank % b == 0
            and fixed + b * per_row <= budget]
    chosen = max(fits) if fits else None
    return {"card_gib": card_gib, "world_size": world_size, "fixed_gib": round(fixed / 2**30, 1),
            "row_gib": round(per_row / 2**30, 2), "device_batch": chosen,
            "grad_accum": per_rank // chosen if chosen else None}


def timed_step(train_model: torch.nn.Module, autocast: Any, optimizer: ShardedOptimizer, rows: int,
               rows_per_rank: int, micro_steps: int = 3) -> dict[str, Any]:
    """`micro_steps` forward + backward of `rows` rows (after one that warms up) and one optimizer step:
    tok/s of a full step at that device batch (rows_per_rank / rows micro-batches plus the step)."""
    x, y = (torch.randint(0, VOCAB, (rows, SEQ), device="cuda") for _ in "xy")  # apart, as training's
    timings = []
    for _ in range(micro_steps + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            train_model(x, y).backward()
        torch.cuda.synchronize()
        timings.append(time.perf_counter() - start)
    start = time.perf_counter()
    optimizer.step()
    torch.cuda.synchronize()
    step_s = time.perf_counter() - start
    optimizer.zero_grad()
    micro_s = sum(timings[1:]) / micro_steps
    accum = rows_per_rank // rows
    return {"grad_accum": accum, "tok_per_sec": round(rows_per_rank * SEQ / (accum * micro_s + step_s)),
            "micro_batch_ms": round(1000 * micro_s, 1), "optimizer_step_ms": round(1000 * step_s, 1)}


def measure(depth: int, cards_gib: list[float], deadline: float) -> list[dict[str, Any]]:
    """On the GPU, in one process: the trainer's search at each simulated card (in the order given), a
    timed step at its choice, and at the largest card also one at nanochat's fixed device batch. The
    weights the timed steps change are the search's business no more: this model is thrown away."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = 64  # a few sizes per card, all cards in one process
    device = torch.device("cuda")
    d = Dist(0, 0, 1, device)
    torch.manual_seed(0)
    model = build_model(config_for_depth(depth, VOCAB, SEQ), device)
    optimizer = ShardedOptimizer(model, d, compile_update=True)
    train_model, autocast = compute_setup(model, d, "on")
    per_rank = rows_per_step(depth)
    total = torch.cuda.get_device_properties(device).total_memory
    peak = peak_flops(torch.cuda.get_device_name(device))
    results = []
    for card in cards_gib:
        if time.monotonic() > deadline:
            results.append({"card_gib": card, "skipped": "out of time"})
            continue
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(min(1.0, card * 2**30 / total), device)
        start = time.perf_counter()
        trials = TrialSteps(train_model, autocast, model, optimizer, d, SEQ)
        try:
            chosen = resolve_device_batch("base", None, 1, per_rank, trials, 0, divisors_only=True)
        except Exception as exc:  # noqa: BLE001 - recorded: nothing fits this card
            results.append({"card_gib": card, "device_batch": None, "error": str(exc)})
            continue
        row = {"card_gib": card, "device_batch": chosen, "search_s": round(time.perf_counter() - start, 1),
               "predicted_device_batch": predicted(depth, card, 1)["device_batch"]}
        torch.cuda.reset_peak_memory_stats(device)
        row.update(timed_step(train_model, autocast, optimizer, chosen, per_rank), step_ran=True,
                   peak_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 1))
        if peak:
            row["mfu_pct"] = round(100 * model.estimate_flops_per_token() * row["tok_per_sec"] / peak, 1)
        nanochat = NANOCHAT_DEVICE_BATCH.get(depth)
        if card == max(cards_gib) and nanochat and nanochat != chosen and time.monotonic() < deadline:
            row["at_nanochat_device_batch"] = {"device_batch": nanochat, **timed_step(
                train_model, autocast, optimizer, nanochat, per_rank)}
        results.append(row)
    torch.cuda.set_per_process_memory_fraction(1.0, device)
    return results


def device_batch_check(device: torch.device, depth: int, cards: list[int], timeout: float) -> dict[str, Any]:
    """The GPU check's part: `measure` at the given card sizes (GB; the largest the whole card), inside
    0.85 of the part's time. Passed when every card measured ran a step at auto's choice."""
    if device.type != "cuda":
        return {"passed": False, "error": "the device batch search measures CUDA memory: a GPU only"}
    total_gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    sizes = [min(CARDS_GIB.get(card, card), total_gib) for card in cards]
    results = measure(depth, sizes, time.monotonic() + 0.85 * timeout)
    done = [r for r in results if "skipped" not in r]
    return {"depth": depth, "total_gib": round(total_gib, 1), "cards": results,
            "passed": bool(done) and all(r.get("step_ran") for r in done)}


_RELAUNCH = re.compile(r"event=oom_relaunch stage=base step=(\d+) device_batch_size=(\d+) "
                       r"next_device_batch_size=(\d+)")


def oom_relaunch_check(device: torch.device, workdir: Path, timeout: float) -> dict[str, Any]:
    """The tiny preset through `phoenix run` with an out-of-memory forced for more than 2 rows from a step
    between two checkpoints on (PHOENIX_TEST_OOM; on CUDA a real one, an allocation of twice the card):
    each launch that runs out is relaunched in-process from the newest checkpoint with half the device
    batch until 2 rows fit, and the run finishes with every step's loss. Eager, to keep the part short
    (the device_batch parts measure the compiled search)."""
    from bench.gpu_probes import logged_losses, phoenix_run, tiny_run_args, tiny_run_env, volume_with_shards

    cuda = device.type == "cuda"
    steps, save_every, oom_from = (40, 10, 25) if cuda else (12, 4, 7)
    tag, volume = "gpu-check-oom", workdir / "oom_relaunch"
    volume_with_shards(volume)
    env = tiny_run_env(device, tag, PHOENIX_TEST_OOM=f"rows=2,from_step={oom_from}")
    start = time.monotonic()
    code, out = phoenix_run(volume, env, [*tiny_run_args(steps, save_every), "--no-compile"], None, timeout)
    halvings = [tuple(map(int, m.groups())) for m in _RELAUNCH.finditer(out)]
    sizes = [int(m) for m in re.findall(r"world_size=1 device_batch_size=(\d+)", out)]  # one per launch
    _, losses = logged_losses(volume, tag)
    complete = sorted(losses) == list(range(1, steps + 1)) and all(math.isfinite(v) for v in losses.values())
    halved = bool(halvings) and all(nxt == size // 2 and step == oom_from for step, size, nxt in halvings)
    result = {"exit": code, "oom_from_step": oom_from, "halvings": halvings, "device_batch_per_launch": sizes,
              "complete": complete, "seconds": round(time.monotonic() - start, 1)}
    result["passed"] = code == 0 and halved and sizes[-1:] == [2] and complete
    if not result["passed"]:
        result["log_tail"] = out[-3000:]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, nargs="+", default=[20, 26])
    parser.add_argument("--cards", type=float, nargs="+", default=list(CARDS_GIB),
                        help="card sizes in GB (24 40 80 141), or GiB for others")
    parser.add_argument("--world-size", type=int, default=8)
    parser.add_argument("--measure", action="store_true", help="the real search on this GPU (one process)")
    args = parser.parse_args()
    cards = [CARDS_GIB.get(int(c), c) if c == int(c) else c for c in args.cards]
    for depth in args.depth:
        rows = measure(depth, cards, time.monotonic() + 3600) if args.measure else [
            predicted(depth, card, args.world_size) for card in cards]
        for row in rows:
            print(" ".join(f"{k}={v}" for k, v in {"depth": depth, **row}.items()), flush=True)


if __name__ == "__main__":
    main()
