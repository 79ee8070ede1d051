"""Training throughput of a model size: tok/s and MFU for forward + backward + optimizer step.

    python bench/throughput.py --preset tiny                         # CPU, eager (compile: --compile)
    python bench/throughput.py --preset d20 --device-batch-size 16   # one GPU (bf16, torch.compile)

The model goes through the trainer's own compute_setup (autocast, compile policy). Random tokens stand
in for data (the loader runs ahead in a thread and is not the bottleneck).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from trainer.hardware import peak_flops
from trainer.model import build_model, config_for_depth
from trainer.optim import HybridOptimizer
from trainer.runtime import Dist, compute_setup
from trainer.train import PRESETS


def measure_throughput(depth: int, device: torch.device, batch: int, seq: int, vocab_size: int,
                       aspect_ratio: int = 64, head_dim: int = 128, compile_mode: str = "auto",
                       steps: int = 20, warmup: int = 5) -> dict[str, Any]:
    """Mean step time over `steps` timed steps, after `warmup` steps that absorb the compile."""
    config = config_for_depth(depth, vocab_size, seq, aspect_ratio, head_dim)
    torch.manual_seed(0)
    model = build_model(config, device)
    optimizer = HybridOptimizer(model)
    train_model, autocast = compute_setup(model, Dist(0, 0, 1, device), compile_mode)
    x = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    y = torch.randint(0, config.vocab_size, (batch, seq), device=device)

    def step() -> float:
        with autocast:
            loss = train_model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()  # a sync, as the trainer's per-step all-reduce + .item() is

    start = time.perf_counter()
    for _ in range(warmup):
        loss = step()
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    seconds = (time.perf_counter() - start) / steps
    tok_per_sec = batch * seq / seconds
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_flops(name) if device.type == "cuda" else None
    mfu = 100 * model.estimate_flops_per_token() * tok_per_sec / peak if peak else None
    result = {"depth": depth, "device": name, "params": model.num_params(), "batch": batch, "seq": seq,
              "compiled": train_model is not model, "warmup_s": round(warmup_s, 2),
              "step_ms": round(seconds * 1000, 2), "tok_per_sec": round(tok_per_sec),
              "mfu_pct": round(mfu, 2) if mfu is not None else None,
              "final_loss": loss}
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--device-batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    compile_flags = parser.add_mutually_exclusive_group()
    compile_flags.add_argument("--compile", dest="compile", action="store_const", const="on")
    compile_flags.add_argument("--no-compile", dest="compile", action="store_const", const="off")
    args = parser.parse_args()

    preset = PRESETS[args.preset]
    result = measure_throughput(preset["depth"], torch.device(args.device),
                                args.device_batch_size or preset["device_batch_size"], preset["max_seq_len"],
                                preset["vocab_size"], preset["aspect_ratio"], preset["head_dim"],
                                args.compile or "auto", args.steps, args.warmup)
    print(" ".join(f"{key}={value}" for key, value in result.items()))


if __name__ == "__main__":
    main()
