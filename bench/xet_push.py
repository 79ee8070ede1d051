"""Push speed through Xet: `phoenix sync --once` pushing one checkpoint of --mb MB to a local Hub.

The checkpoint is random (nothing for Xet to deduplicate), a third weights and two thirds optimizer state,
like a real one. Each configuration runs as its own sidecar process on a fresh volume and a fresh Hub, so
hf_xet reads its settings (HF_XET_HIGH_PERFORMANCE) at start, as in the container. Printed per row: the
sha256 check of the checkpoint before the push (MB/s), and the push itself as the sidecar logs it
(`event=push_done mb_s=`: Xet chunking, hashing and upload into the local Hub's CAS, then the commit or
the bucket's batches), plus the time a d26 checkpoint (16.7 GB) would take at that speed. The local Hub's
CAS is a folder on this machine, so the figure is this machine's hashing and disk, not a network's.

    python bench/xet_push.py [--mb 512] [--runs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # run as a script from a checkout: bench/ is not a package

from entrypoint.demo.localhub import LocalHub  # noqa: E402
from trainer import checkpoint_layout as layout  # noqa: E402

TOKEN, USER, TAG = "hf_benchXetPushToken01", "bench", "d26-hyperbolic"
MB = 1_000_000
D26_BYTES = 16.7e9
SYNC = [sys.executable, "-c", "from entrypoint.cli import main; main()", "sync", "--once"]


def build_volume(base: Path, mb: int) -> float:
    """One random checkpoint of `mb` MB; returns the MB/s of its sha256 check (what the push verifies)."""
    rng = np.random.default_rng(0)
    tmp = layout.new_tmp_dir(layout.stage_dir(base, "base", TAG), 250)
    for name, share in (("model.safetensors", 1 / 3), ("optim.safetensors", 2 / 3)):
        save_file({"data": np.frombuffer(rng.bytes(int(mb * MB * share)), dtype=np.uint8)}, str(tmp / name))
    (tmp / "meta.json").write_text(json.dumps({"step": 250}))
    ckpt = layout.publish(tmp, 250, stage="base", model_tag=TAG)
    start = time.perf_counter()
    layout.verify(ckpt.path, full_hash=True)
    (base / "tokenizer").mkdir(parents=True)
    (base / "tokenizer" / "tokenizer.json").write_text('{"model": "bpe"}')
    return ckpt.total_bytes / MB / (time.perf_counter() - start)


def push(workdir: Path, mb: int, store: str, high_performance: bool) -> tuple[float, float]:
    """(sha256 MB/s, push MB/s) of one sidecar pushing one checkpoint into a fresh local Hub."""
    base = workdir / "volume"
    hash_speed = build_volume(base, mb)
    with LocalHub(workdir / "hub", tokens={TOKEN: USER}) as hub:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))} | {
            "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HOME": str(workdir / "hf_home"),
            "NANOCHAT_BASE_DIR": str(base), "MODEL_TAG": TAG, "HF_REPO_ID": f"{USER}/push-bench",
            "HF_CHECKPOINT_STORE": store, "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONPATH": str(REPO_ROOT),
            "HF_XET_HIGH_PERFORMANCE": "1" if high_performance else "0"}
        done = subprocess.run(SYNC, env=env, capture_output=True, text=True, timeout=3600)
    found = re.search(r"event=push_done .* mb_s=([\d.]+)", done.stdout)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"the push failed: {(done.stdout + done.stderr)[-2000:]}")
    return hash_speed, float(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=512, help="checkpoint size in MB")
    parser.add_argument("--runs", type=int, default=2, help="runs per configuration (the best is shown)")
    args = parser.parse_args()
    print(f"{'store':7} {'HF_XET_HIGH_PERFORMANCE':>24} {'sha256 MB/s':>12} {'push MB/s':>10} "
          f"{'d26 push':>9}")
    for store in ("bucket", "repo"):
        for high in (True, False):
            best = (0.0, 0.0)
            for _ in range(args.runs):
                with tempfile.TemporaryDirectory(prefix="phoenix-xet-push-") as tmp:
                    best = max(best, push(Path(tmp), args.mb, store, high), key=lambda r: r[1])
            minutes = D26_BYTES / MB / best[1] / 60
            print(f"{store:7} {'1' if high else '0':>24} {best[0]:>12.0f} {best[1]:>10.0f} "
                  f"{minutes:>7.1f} min", flush=True)


if __name__ == "__main__":
    main()
