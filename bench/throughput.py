"""Training throughput of a model size: tok/s, MFU and the optimizer's share of the step.

    python bench/throughput.py --preset tiny                         # CPU: the compile policy's choice
    python bench/throughput.py --preset tiny --compile               # ... compiled (--no-compile: eager)
    python bench/throughput.py --preset tiny --depth 4 --aspect-ratio 64 --head-dim 128 --max-seq-len 512 \
        --vocab-size 8192 --device-batch-size 1                      # the CPU comparison's geometry
    python bench/throughput.py --preset d20 d26 --device-batch-size 16   # one GPU (bf16, torch.compile)

The model goes through the trainer's own compute_setup and the optimizer's update through its compile
policy (runtime.compiles_update), as the trainer does. Random tokens stand in for data (the loader
runs ahead in a thread and is not the bottleneck). Each step is timed in two
parts, forward + backward and optimizer step, with a device synchronisation between them, so the
optimizer's share is what the step really spends there (on CUDA, kernels run asynchronously otherwise).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from trainer.hardware import peak_flops
from trainer.model import build_model, config_for_depth
from trainer.optim import HybridOptimizer
from trainer.runtime import Dist, compiles_update, compute_setup
from trainer.train import CPU_DEVICE_BATCH, PRESETS

GEOMETRY = ("depth", "aspect_ratio", "head_dim", "max_seq_len", "vocab_size", "device_batch_size")


def measure_throughput(depth: int, device: torch.device, batch: int, seq: int, vocab_size: int,
                       aspect_ratio: int = 64, head_dim: int = 128, compile_mode: str = "auto",
                       steps: int = 20, warmup: int = 5) -> dict[str, Any]:
    """Mean step time over `steps` timed steps, after `warmup` steps that absorb the compile."""
    config = config_for_depth(depth, vocab_size, seq, aspect_ratio, head_dim)
    torch.manual_seed(0)
    model = build_model(config, device)
    compile_update = compiles_update(compile_mode, device, model.estimate_flops_per_token())
    optimizer = HybridOptimizer(model, compile_update=compile_update)  # one process: every name is its own
    train_model, autocast = compute_setup(model, Dist(0, 0, 1, device), compile_mode)
    x = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    y = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> tuple[float, float, float]:
        """(loss, seconds in forward + backward, seconds in the optimizer step)."""
        start = time.perf_counter()
        with autocast:
            loss = train_model(x, y)
        loss.backward()
        sync()
        middle = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()  # a sync, as the trainer's per-step all-reduce + .item() is
        return value, middle - start, time.perf_counter() - middle

    start = time.perf_counter()
    first_step_s = 0.0
    for _ in range(warmup):
        _, fwd_bwd, opt = step()
        first_step_s = first_step_s or fwd_bwd + opt
    warmup_s = time.perf_counter() - start
    fwd_bwd_s = opt_s = 0.0
    for _ in range(steps):
        loss, fwd_bwd, opt = step()
        fwd_bwd_s, opt_s = fwd_bwd_s + fwd_bwd, opt_s + opt
    seconds = (fwd_bwd_s + opt_s) / steps
    tok_per_sec = batch * seq / seconds
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_flops(name) if device.type == "cuda" else None
    mfu = 100 * model.estimate_flops_per_token() * tok_per_sec / peak if peak else None
    result = {"depth": depth, "width": config.n_embd, "device": name, "params": model.num_params(),
              "batch": batch, "seq": seq, "vocab": vocab_size, "compiled": train_model is not model,
              "update_compiled": compile_update,
              # The first step holds the compile (when compiled); warm-up's later steps settle caches.
              "first_step_s": round(first_step_s, 2), "warmup_s": round(warmup_s, 2),
              "step_ms": round(seconds * 1000, 2), "tok_per_sec": round(tok_per_sec),
              "mfu_pct": round(mfu, 2) if mfu is not None else None,
              "fwd_bwd_ms": round(fwd_bwd_s / steps * 1000, 2),
              "optimizer_ms": round(opt_s / steps * 1000, 2),
              "optimizer_pct": round(100 * opt_s / (fwd_bwd_s + opt_s), 1), "final_loss": round(loss, 4)}
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", nargs="+", default=["tiny"], choices=sorted(PRESETS),
                        help="one line of figures per preset")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for name in GEOMETRY:
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                            help="overrides the preset's")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    compile_flags = parser.add_mutually_exclusive_group()
    compile_flags.add_argument("--compile", dest="compile", action="store_const", const="on")
    compile_flags.add_argument("--no-compile", dest="compile", action="store_const", const="off")
    args = parser.parse_args()

    for preset_name in args.preset:
        preset = {**PRESETS[preset_name], "device_batch_size": CPU_DEVICE_BATCH[preset_name],
                  **{name: getattr(args, name) for name in GEOMETRY if getattr(args, name) is not None}}
        result = measure_throughput(preset["depth"], torch.device(args.device), preset["device_batch_size"],
                                    preset["max_seq_len"], preset["vocab_size"], preset["aspect_ratio"],
                                    preset["head_dim"], args.compile or "auto", args.steps, args.warmup)
        print(" ".join(f"{key}={value}" for key, value in {"preset": preset_name, **result}.items()),
              flush=True)


if __name__ == "__main__":
    main()
