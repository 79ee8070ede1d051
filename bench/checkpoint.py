"""Training stall per checkpoint: AsyncCheckpointer.save vs a synchronous torch.save of the same state.

    python bench/checkpoint.py --depth 8          # CPU, ~100M params with optimizer state
    python bench/checkpoint.py --depth 26 --device cuda

Both write model + optimizer state to the same directory and fsync; the async stall is the time the
training thread is held (copy to host memory), the rest happens in the background.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from trainer import checkpoint_layout as layout
from trainer.checkpoint import AsyncCheckpointer
from trainer.model import build_model, config_for_depth
from trainer.optim import HybridOptimizer


def placeholder_meta(step: int) -> dict[str, Any]:
    """A meta.json the checkpoint contract accepts (every key it asks for, blank), without a run behind it."""
    blank = {key: kind() for key, kind in {**layout.META_KEYS, **layout.STAGE_META_KEYS["base"]}.items()}
    return {**blank, "stage": "base", "step": step, "world_size": 1, "rng": [{}]}


def measure_stall(depth: int, vocab_size: int, device: torch.device, root: Path, repeats: int = 3
                  ) -> dict[str, Any]:
    """Best of `repeats`: the sync save's time, the async stall, and the async background total."""
    model = build_model(config_for_depth(depth, vocab_size, 2048), device)
    optimizer = HybridOptimizer(model)
    files = {"model.safetensors": model.state_dict(), "optimizer.safetensors": optimizer.state_tensors(),
             "rng.safetensors": {"rank0.torch_cpu": torch.get_rng_state()}}
    nbytes = sum(t.numel() * t.element_size() for ts in files.values() for t in ts.values())
    sync_times, stalls, totals = [], [], []
    for repeat in range(repeats):
        target = root / f"sync_{repeat}.pt"
        start = time.perf_counter()
        torch.save(files, target)
        with open(target, "rb") as f:
            os.fsync(f.fileno())
        sync_times.append(time.perf_counter() - start)
        target.unlink()

        checkpointer = AsyncCheckpointer(root / "async", keep_last=1)
        start = time.perf_counter()
        stalls.append(checkpointer.save(repeat + 1, files, placeholder_meta(repeat + 1)))
        checkpointer.wait()
        totals.append(time.perf_counter() - start)
    shutil.rmtree(root / "async", ignore_errors=True)
    best_sync, best_stall = min(sync_times), min(stalls)
    return {"depth": depth, "device": str(device), "state_gib": round(nbytes / 2**30, 3),
            "sync_save_ms": round(best_sync * 1000, 1), "async_stall_ms": round(best_stall * 1000, 1),
            "async_total_ms": round(min(totals) * 1000, 1), "stall_ratio": round(best_stall / best_sync, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    root = args.dir or Path(tempfile.mkdtemp(prefix="phoenix-bench-"))
    r = measure_stall(args.depth, args.vocab_size, torch.device(args.device), root, args.repeats)
    print(f"state={r['state_gib']:.2f} GiB device={r['device']} depth={r['depth']}")
    print(f"sync torch.save + fsync:   {r['sync_save_ms']:8.1f} ms stall")
    print(f"async checkpoint stall:    {r['async_stall_ms']:8.1f} ms  (background write+hash+publish "
          f"{r['async_total_ms']:.0f} ms)")
    print(f"stall ratio async/sync:    {r['stall_ratio']:8.3f}  (target <= 0.15)")


if __name__ == "__main__":
    main()
