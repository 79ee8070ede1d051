"""The tiny preset's loss curve over seeds: loss spikes by issue 21's rule, and the final loss.

    python bench/corpus.py --out /tmp/corpus                       # English text, once (~3 minutes)
    python bench/loss_curve.py --shards /tmp/corpus --seeds 1-8 --steps 300

Each seed is one `python -m trainer.train --preset tiny` process on CPU, offline, on a copy of the given
shards (`shard_NNNNN.parquet`, the last one the validation split); the tokenizer is trained once and
shared. A spike is a step after SETTLED_STEP whose raw loss exceeds SPIKE_FACTOR x the median of the
NEIGHBOURS steps on each side. Compare commits by running it on each (the code under test is the tree
it runs in).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPIKE_FACTOR = 1.5
NEIGHBOURS = 5
SETTLED_STEP = 20  # before it the loss falls too fast for a median to mean anything


def spikes(losses: dict[int, float]) -> list[tuple[int, float, float]]:
    """(step, loss, median of its neighbours) of every step whose loss exceeds SPIKE_FACTOR x that median."""
    found = []
    for step, loss in sorted(losses.items()):
        window = range(step - NEIGHBOURS, step + NEIGHBOURS + 1)
        median = statistics.median(losses[s] for s in window if s != step and s in losses)
        if step > SETTLED_STEP and loss > SPIKE_FACTOR * median:
            found.append((step, loss, median))
    return found


def step_losses(log: Path) -> dict[int, float]:
    """Per-step training loss from a trainer's `logs/train_base_<tag>.jsonl`."""
    records = (json.loads(line) for line in log.read_text().splitlines())
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def seeds(text: str) -> list[int]:
    """"1-8" or "42,1,2" (or both: "42,1-3")."""
    out: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        out.extend(range(int(first), int(last or first) + 1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, required=True, help="folder of shard_NNNNN.parquet")
    parser.add_argument("--seeds", type=seeds, default=seeds("1-8"))
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()

    volume = Path(tempfile.mkdtemp(prefix="phoenix-loss-curve-"))
    shutil.copytree(args.shards, volume / "base_data", ignore=shutil.ignore_patterns("shards.json"))
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(volume), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    finals, spiked = [], 0
    for seed in args.seeds:
        tag = f"seed{seed}"
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "trainer.train", "--preset", "tiny", "--device", "cpu",
                        "--seed", str(seed), "--num-iterations", str(args.steps), "--eval-every", "0",
                        "--sample-every", "0", "--save-every", str(args.steps)],
                       env={**env, "MODEL_TAG": tag}, cwd=root, check=True, capture_output=True)
        losses = step_losses(volume / "logs" / f"train_base_{tag}.jsonl")
        found = spikes(losses)
        final = statistics.mean(losses[s] for s in range(args.steps - 9, args.steps + 1))
        finals.append(final)
        spiked += bool(found)
        peak = max(v for s, v in losses.items() if s > SETTLED_STEP)
        print(f"seed={seed} steps={args.steps} final_loss={final:.3f} max_after_{SETTLED_STEP}={peak:.2f} "
              f"spikes={[(s, round(v, 2), round(m, 2)) for s, v, m in found]} "
              f"s={time.perf_counter() - start:.0f}", flush=True)
    print(f"runs_with_a_spike={spiked}/{len(args.seeds)} mean_final_loss={statistics.mean(finals):.3f} "
          f"shards={args.shards} volume={volume}")


if __name__ == "__main__":
    main()
