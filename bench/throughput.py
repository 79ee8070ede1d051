"""Training throughput of a preset: tok/s and MFU for forward + backward + optimizer step.

    python bench/throughput.py --preset tiny                     # CPU
    python bench/throughput.py --preset d20 --device-batch-size 16   # one GPU (bf16, torch.compile)

Random tokens stand in for data (the loader runs ahead in a thread and is not the bottleneck).
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch

from trainer.model import build_model, config_for_depth, peak_flops
from trainer.optim import HybridOptimizer
from trainer.train import PRESETS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--device-batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()

    preset = PRESETS[args.preset]
    batch = args.device_batch_size or preset["device_batch_size"]
    seq = preset["max_seq_len"]
    device = torch.device(args.device)
    config = config_for_depth(preset["depth"], preset["vocab_size"], seq, preset["aspect_ratio"],
                              preset["head_dim"])
    torch.manual_seed(0)
    model = build_model(config, device)
    optimizer = HybridOptimizer(model)
    train_model = torch.compile(model) if device.type == "cuda" and not args.no_compile else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    x = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    y = torch.randint(0, config.vocab_size, (batch, seq), device=device)

    def step() -> None:
        with autocast:
            loss = train_model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    tok_per_sec = batch * seq / seconds
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_flops(name) if device.type == "cuda" else None
    mfu = f"{100 * model.estimate_flops_per_token() * tok_per_sec / peak:.1f}%" if peak else "n/a"
    print(f"preset={args.preset} device={name} params={model.num_params():,} batch={batch}x{seq} "
          f"step_ms={seconds * 1000:.1f} tok_per_sec={tok_per_sec:,.0f} mfu={mfu}")
    if device.type == "cuda":
        print(f"peak_memory_gib={torch.cuda.max_memory_allocated(device) / 2**30:.1f}")


if __name__ == "__main__":
    main()
