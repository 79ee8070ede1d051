"""Launch to first step after an interruption, with the compile caches on the volume warm and cold.

    python bench/corpus.py --out /tmp/corpus                 # real words for a vocab-8192 tokenizer
    python bench/relaunch.py --shards /tmp/corpus            # compiled depth 4 (width 256, seq 512) on CPU
    python bench/relaunch.py --device cuda -- --compile      # the tiny preset, compiled on CUDA

Three launches of the trainer on one volume (--shards, else generated ones; no Hub): a fresh one,
stopped with SIGTERM after its second step (emergency checkpoint); a relaunch on the same volume
(inductor's cache there, warm); a relaunch after deleting that cache (cold, as on a volume without it).
Each relaunch stops after its first step. Figures are the trainer's own `event=startup` line: launch
(process start) to first step, split into restore, data (tokenizer, shards, loader), compile and the
first step itself.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEPTH4 = ["--depth", "4", "--aspect-ratio", "64", "--head-dim", "128", "--max-seq-len", "512",
          "--vocab-size", "8192", "--device-batch-size", "1", "--total-batch-size", "512"]


def launch(volume: Path, env: dict[str, str], trainer_args: list[str], stop_after: int, timeout: float
           ) -> tuple[int | None, str]:
    """The trainer until it logs step `stop_after` of this launch, then SIGTERM: it saves and exits."""
    command = [sys.executable, "-m", "trainer.train", "--preset", "tiny", *trainer_args]
    proc = subprocess.Popen(command, env={**env, "NANOCHAT_BASE_DIR": str(volume)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines, seen, deadline = [], 0, time.monotonic() + timeout
    for line in proc.stdout:
        lines.append(line)
        seen += " | loss " in line
        if seen == stop_after or time.monotonic() > deadline:
            proc.send_signal(signal.SIGTERM)
            seen = -1  # once
    return proc.wait(), "".join(lines)


def startup_of(output: str) -> dict[str, float]:
    """The `event=startup` line's figures."""
    line = next(line for line in output.splitlines() if "event=startup" in line)
    return {key: float(value) for key, value in (word.split("=") for word in line.split() if "=" in word)
            if key.endswith("_s")}


def measure_relaunch(workdir: Path, trainer_args: list[str], device: str, timeout: float,
                     shards_dir: Path | None = None) -> dict[str, Any]:
    """Fresh launch, warm relaunch, cold relaunch on one volume: their start-up figures."""
    from entrypoint.demo.synthetic import write_shards

    volume = workdir / "volume"
    if shards_dir is None:
        shards = write_shards(volume / "base_data", num_shards=3, docs_per_shard=600)
    else:
        (volume / "base_data").mkdir(parents=True)
        shards = sorted(shards_dir.glob("shard_*.parquet"))
        for shard in shards:
            (volume / "base_data" / shard.name).symlink_to(shard.resolve())
    (volume / "base_data" / "shards.json").write_text(json.dumps({"shards": [p.name for p in shards]}))
    env = {key: value for key, value in os.environ.items() if key not in ("HF_REPO_ID", "HF_TOKEN",
                                                                         "TORCHINDUCTOR_CACHE_DIR")}
    env.update(MODEL_TAG="relaunch", DEVICE=device, HF_HUB_OFFLINE="1", WANDB_RUN="", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    args = ["--num-iterations", "10000", "--eval-every", "0", "--sample-every", "0", *trainer_args]
    cache = volume / "cache" / "torchinductor"
    result: dict[str, Any] = {"device": device, "args": " ".join(trainer_args)}
    start = time.monotonic()
    launches = (("fresh", 2, True), ("relaunch_warm", 1, False), ("relaunch_cold", 1, True))
    for name, stop_after, wipe in launches:
        if wipe:
            shutil.rmtree(cache, ignore_errors=True)
        code, out = launch(volume, env, args, stop_after, timeout - (time.monotonic() - start))
        if code != 0 or "event=startup" not in out:
            return {**result, "passed": False, "error": f"{name} exited {code}", "log_tail": out[-3000:]}
        result[name] = startup_of(out)
        if name == "fresh":
            cached = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
            result["cache_mib"] = round(cached / 2**20, 1)
    warm, cold = result["relaunch_warm"], result["relaunch_cold"]
    result["warm_saves_s"] = round(cold["launch_to_first_step_s"] - warm["launch_to_first_step_s"], 2)
    result["passed"] = True
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dir", type=Path, default=None, help="where the volume goes (default: a temp dir)")
    parser.add_argument("--shards", type=Path, default=None, help="shard_NNNNN.parquet files to train on")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("trainer_args", nargs="*", help="after --: trainer flags (default: compiled depth 4)")
    args = parser.parse_args()
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="phoenix-relaunch-"))
    r = measure_relaunch(workdir, args.trainer_args or [*DEPTH4, "--compile"], args.device, args.timeout,
                         args.shards)
    if not r["passed"]:
        sys.exit(f"error: {r['error']}\n{r['log_tail']}")
    print(f"device={r['device']} args={r['args']} inductor_cache_mib={r['cache_mib']}")
    for name in ("fresh", "relaunch_warm", "relaunch_cold"):
        print(f"{name:14s} " + " ".join(f"{key}={value:.1f}" for key, value in r[name].items()))
    print(f"warm cache saves {r['warm_saves_s']:.1f} s of the relaunch to first step")


if __name__ == "__main__":
    main()
