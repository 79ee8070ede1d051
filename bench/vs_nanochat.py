"""phoenix next to nanochat on the CPU: tok/s and validation bpb at one geometry, same shards, same steps.

    python bench/corpus.py --out /tmp/corpus                    # the shards (offline, installed docs)
    git --git-dir=<nanochat's git dir> archive HEAD | tar -x -C /tmp/nanochat
    python -m venv --system-site-packages /tmp/ncvenv      # this torch; nanochat's other needs:
    /tmp/ncvenv/bin/pip install rustbpe tiktoken kernels psutil
    python bench/vs_nanochat.py --corpus /tmp/corpus --nanochat /tmp/nanochat \
        --nanochat-python /tmp/ncvenv/bin/python

Each trainer gets its own copy of the shards in its own base dir, trains its own tokenizer (vocab 8192
by default) on the training shards, then trains depth 4 (width 256, seq 512, one 512-token sequence per
step) for `--steps` steps as its README tells a CPU user to: nanochat's `scripts.base_train` (which
compiles the model and its optimizer on CPU too), phoenix's `trainer.train` with nanochat's reference
(d12 at 2^19-token batches), so both scale their learning rates by sqrt(512 / 2^19) and use the same
schedules. Both evaluate bpb on the same last shard with the same number of tokens. Steady-state tok/s
is the median of each trainer's own per-step figure after its first `--skip` steps (which hold the
compile); the first step's excess over that median is reported as compile time. Both run on the same
torch when nanochat's venv inherits this environment's packages, as set up above. The CPU is shared:
the load average is printed next to each run, and `--order` runs them back to back in either order.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# Per-step lines, nanochat's "... | dt: 812.34ms | tok/sec: 630 | ..." and phoenix's (no colons).
STEP_LINE = re.compile(r"step (\d+)/\d+ .*?\| dt:? ([\d.]+)ms \| tok/sec:? ([\d,]+)", re.IGNORECASE)
BPB_LINE = {"nanochat": re.compile(r"Step (\d+) \| Validation bpb: ([\d.]+)"),
            "phoenix": re.compile(r"step (\d+) \| val bpb ([\d.]+)")}


def load_average() -> float:
    return os.getloadavg()[0]


def run(command: list[str], env: dict[str, str], cwd: Path, log_path: Path) -> tuple[str, float]:
    """Run a command, its output into log_path; (its output, wall seconds). Exits on failure."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        code = subprocess.call(command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    output = log_path.read_text()
    if code != 0:
        sys.exit(f"error: {' '.join(command[:3])} exited {code}: see {log_path}")
    return output, time.perf_counter() - start


def base_env(base_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "HF_TOKEN"))}
    return {**env, "NANOCHAT_BASE_DIR": str(base_dir), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
            "PYTHONUNBUFFERED": "1"}


def fresh_base_dir(work: Path, name: str, corpus: Path, data_folder: str) -> Path:
    """work/name with the corpus's shards in data_folder, nothing else (no tokenizer, no checkpoint)."""
    base = work / name
    shutil.rmtree(base, ignore_errors=True)
    (base / data_folder).mkdir(parents=True)
    for shard in sorted(corpus.glob("shard_*.parquet")):
        if shard.stat().st_dev == base.stat().st_dev:
            os.link(shard, base / data_folder / shard.name)  # no copy: neither trainer writes its shards
        else:
            shutil.copy(shard, base / data_folder / shard.name)
    return base


def summarize(name: str, output: str, wall_s: float, skip: int, load_before: float) -> dict[str, Any]:
    steps = [(int(s), float(dt), int(tok.replace(",", ""))) for s, dt, tok in STEP_LINE.findall(output)]
    if len(steps) <= skip:
        sys.exit(f"error: {name} logged {len(steps)} steps, fewer than --skip {skip}: raise --steps")
    steady_dt = statistics.median(dt for _, dt, _ in steps[skip:])
    bpbs = [(int(s), float(v)) for s, v in BPB_LINE[name].findall(output)]
    return {"trainer": name, "steps": len(steps),
            "tok_per_sec": round(statistics.median(tok for _, _, tok in steps[skip:])),
            "step_ms": round(steady_dt, 1), "first_step_ms": round(steps[0][1], 1),
            "compile_s": round(max(0.0, steps[0][1] - steady_dt) / 1000, 1),
            "val_bpb": bpbs[-1][1] if bpbs else None, "wall_s": round(wall_s, 1),
            "load_before": round(load_before, 2), "load_after": round(load_average(), 2)}


def train_nanochat(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    base = fresh_base_dir(work, "nanochat", args.corpus, "base_data_climbmix")
    env = base_env(base)
    run([args.nanochat_python, "-m", "scripts.tok_train", f"--vocab-size={args.vocab}"], env, args.nanochat,
        work / "nanochat_tokenizer.log")
    load = load_average()
    output, wall = run([args.nanochat_python, "-m", "scripts.base_train", "--device-type=cpu",
                        f"--depth={args.depth}", f"--max-seq-len={args.seq}", "--device-batch-size=1",
                        f"--total-batch-size={args.seq}", f"--num-iterations={args.steps}",
                        f"--eval-every={args.steps}", f"--eval-tokens={args.eval_tokens}",
                        "--core-metric-every=-1", "--sample-every=-1"],
                       env, args.nanochat, work / "nanochat_train.log")
    return summarize("nanochat", output, wall, args.skip, load)


def train_phoenix(args: argparse.Namespace, work: Path, compile_flag: str) -> dict[str, Any]:
    base = fresh_base_dir(work, "phoenix", args.corpus, "base_data")
    env = {**base_env(base), "PYTHONPATH": str(REPO)}
    flags = ["--preset", "tiny", "--device", "cpu", "--depth", str(args.depth), "--aspect-ratio", "64",
             "--head-dim", "128", "--max-seq-len", str(args.seq), "--device-batch-size", "1",
             "--total-batch-size", str(args.seq), "--vocab-size", str(args.vocab),
             "--num-iterations", str(args.steps), "--eval-every", str(args.steps),
             "--eval-tokens", str(args.eval_tokens), "--sample-every", "0", "--save-every", str(args.steps),
             "--tokenizer-chars", str(2_000_000_000), "--model-tag", "vs-nanochat",
             # nanochat's reference: its lrs tuned at d12 with 2^19-token batches, scaled to this batch.
             "--reference-depth", "12", "--reference-batch-size", str(2**19)]
    if compile_flag:
        flags.append(compile_flag)
    load = load_average()
    output, wall = run([args.phoenix_python, "-m", "trainer.train", *flags], env, REPO,
                       work / f"phoenix{compile_flag or ''}_train.log")
    return {**summarize("phoenix", output, wall, args.skip, load), "compile_flag": compile_flag or "auto"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, required=True, help="bench/corpus.py's output folder")
    parser.add_argument("--nanochat", type=Path, required=True, help="nanochat's source tree")
    parser.add_argument("--nanochat-python", default=sys.executable, help="with rustbpe and tiktoken")
    parser.add_argument("--phoenix-python", default=sys.executable)
    parser.add_argument("--work", type=Path, default=Path("/tmp/vs_nanochat"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--skip", type=int, default=10, help="first steps left out of the steady state")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--eval-tokens", type=int, default=64 * 512)
    parser.add_argument("--order", default="phoenix,nanochat",
                        help="comma-separated runs: phoenix (its default policy), phoenix--compile, "
                             "phoenix--no-compile, nanochat")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"geometry depth={args.depth} width={args.depth * 64} seq={args.seq} batch_tokens={args.seq} "
          f"vocab={args.vocab} steps={args.steps} eval_tokens={args.eval_tokens} cores={os.cpu_count()} "
          f"omp_threads={os.environ.get('OMP_NUM_THREADS', 'default')}", flush=True)
    for name in args.order.split(","):
        if name == "nanochat":
            result = train_nanochat(args, args.work)
        else:
            result = train_phoenix(args, args.work, name.removeprefix("phoenix"))
        print(" ".join(f"{key}={value}" for key, value in result.items()), flush=True)


if __name__ == "__main__":
    main()
