"""Checkpoint cost: the training stall of a save, and the emergency save (stop to published) on N processes.

    python bench/checkpoint.py --depth 8                         # stall: async vs torch.save, one process
    python bench/checkpoint.py --depth 26 --device cuda
    python bench/checkpoint.py --emergency --depth 8 --processes 1,2   # the trainer's save, 1 then 2 ranks

The stall: both write model + optimizer state to the same directory and fsync; the async stall is the time
the training thread is held (copy to host memory), the rest happens in the background.

The emergency save: each rank builds the model and a ShardedOptimizer (its share of the state), then
calls the trainer's own save_checkpoint() and waits until the checkpoint is published, as a stopped run
does before it exits: device -> host copy, write, fsync, hash, publish. Best of --repeats, rank 0's clock.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from trainer import checkpoint_content as content
from trainer.checkpoint import AsyncCheckpointer
from trainer.model import build_model, config_for_depth
from trainer.optim import HybridOptimizer


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
        stalls.append(checkpointer.save(repeat + 1, files, content.blank_meta(repeat + 1)))
        checkpointer.wait()
        totals.append(time.perf_counter() - start)
    shutil.rmtree(root / "async", ignore_errors=True)
    best_sync, best_stall = min(sync_times), min(stalls)
    return {"depth": depth, "device": str(device), "state_gib": round(nbytes / 2**30, 3),
            "sync_save_ms": round(best_sync * 1000, 1), "async_stall_ms": round(best_stall * 1000, 1),
            "async_total_ms": round(min(totals) * 1000, 1), "stall_ratio": round(best_stall / best_sync, 3)}


def emergency_worker(depth: int, vocab_size: int, root: Path, repeats: int, result: Path) -> None:
    """One rank (under torchrun, or alone): build, then save_checkpoint + wait, `repeats` times."""
    import torch.distributed as dist

    from trainer.distributed import ShardedOptimizer, init_distributed
    from trainer.resume import save_checkpoint

    d = init_distributed("auto")
    torch.manual_seed(0)
    model = build_model(config_for_depth(depth, vocab_size, 2048), d.device)
    optimizer = ShardedOptimizer(model, d)
    checkpointer = AsyncCheckpointer(root, 1, d, stage="base", model_tag="bench")
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    state_bytes += optimizer.state_bytes()
    totals, stalls, phases = [], [], []
    for repeat in range(repeats):
        if d.world_size > 1:
            dist.barrier()
        start = time.perf_counter()
        stalls.append(save_checkpoint(checkpointer, repeat + 1, False, model, optimizer, d,
                                      lambda _ranks, step=repeat + 1: content.blank_meta(step)))
        checkpointer.wait()
        if d.world_size > 1:
            dist.barrier()  # every rank's part is in: the time a stopped run needs before it can exit
        totals.append(time.perf_counter() - start)
        phases.append(checkpointer.timing)
    if d.is_main:
        files = sorted(p.name for p in sorted(root.iterdir())[-1].iterdir())
        result.write_text(json.dumps({"processes": d.world_size, "depth": depth,
                                      "model_and_rank0_share_gib": round(state_bytes / 2**30, 3),
                                      "emergency_save_s": round(min(totals), 3),
                                      "stall_s": round(min(stalls), 3), "files": files,
                                      "rank0_phases_s": phases[totals.index(min(totals))]}))
    if dist.is_initialized():
        dist.destroy_process_group()


def measure_emergency_save(depth: int, vocab_size: int, processes: int, root: Path, repeats: int = 3
                           ) -> dict[str, Any]:
    """The trainer's save on `processes` ranks (torchrun), from the save call to every rank done."""
    root.mkdir(parents=True, exist_ok=True)
    result = root / f"emergency_{processes}.json"
    worker = ["-m", "bench.checkpoint", "--worker", "--depth", str(depth), "--vocab-size", str(vocab_size),
              "--dir", str(root / f"ckpt_{processes}"), "--repeats", str(repeats), "--result", str(result)]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={processes}"] if processes > 1 else [sys.executable]
    done = subprocess.run([*launcher, *worker], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"emergency save on {processes} processes failed:\n{done.stdout[-2000:]}"
                           f"{done.stderr[-2000:]}")
    shutil.rmtree(root / f"ckpt_{processes}", ignore_errors=True)
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--emergency", action="store_true", help="the trainer's save on --processes ranks")
    parser.add_argument("--processes", default="1,2", help="with --emergency: comma-separated rank counts")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    root = args.dir or Path(tempfile.mkdtemp(prefix="phoenix-bench-"))
    if args.worker:
        emergency_worker(args.depth, args.vocab_size, root, args.repeats, args.result)
        return
    if args.emergency:
        for processes in (int(n) for n in args.processes.split(",")):
            r = measure_emergency_save(args.depth, args.vocab_size, processes, root, args.repeats)
            print(f"processes={r['processes']} depth={r['depth']} "
                  f"emergency_save_s={r['emergency_save_s']:.3f} stall_s={r['stall_s']:.3f} "
                  f"rank0_holds_gib={r['model_and_rank0_share_gib']} files={','.join(r['files'])}")
            print("  rank 0: " + " ".join(f"{k}={v:.2f}" for k, v in r["rank0_phases_s"].items()))
        return
    r = measure_stall(args.depth, args.vocab_size, torch.device(args.device), root, args.repeats)
    print(f"state={r['state_gib']:.2f} GiB device={r['device']} depth={r['depth']}")
    print(f"sync torch.save + fsync:   {r['sync_save_ms']:8.1f} ms stall")
    print(f"async checkpoint stall:    {r['async_stall_ms']:8.1f} ms  (background write+hash+publish "
          f"{r['async_total_ms']:.0f} ms)")
    print(f"stall ratio async/sync:    {r['stall_ratio']:8.3f}  (target <= 0.15)")


if __name__ == "__main__":
    main()
