"""Benchmark `phoenix restore` against `snapshot_download` of the whole repo, on a local Hub.

The Hub holds N checkpoints of --mb MB each (model + optimizer safetensors), a tokenizer and run.json, as
the sidecar lays them out. Both clients run as separate processes on an empty volume; the server (in this
process) counts the bytes it sends.

    python bench/restore.py --mb 200 [--checkpoints 3] [--keep DIR]
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

import numpy as np
from safetensors.numpy import save_file

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # run as a script from a checkout: bench/ is not a package

from entrypoint.localhub import LocalHub  # noqa: E402
from trainer import checkpoint_layout as layout  # noqa: E402

TOKEN, USER, TAG = "hf_benchLocalToken0123", "bench", "d26-hyperbolic"
REPO_ID = f"{USER}/phoenix-bench"
MB = 1_000_000
RESTORE = "from entrypoint.cli import main; main()"
SNAPSHOT = (
    "import sys; from huggingface_hub import snapshot_download; "
    "snapshot_download(sys.argv[1], local_dir=sys.argv[2])"
)


def build_volume(base: Path, mb: int, checkpoints: int) -> None:
    """Checkpoints of `mb` MB each: a third weights, two thirds optimizer state, like AdamW."""
    rng = np.random.default_rng(0)
    for i in range(1, checkpoints + 1):
        tmp = layout.new_tmp_dir(layout.stage_dir(base, "base", TAG), 250 * i)
        for name, share in (("model.safetensors", 1 / 3), ("optim.safetensors", 2 / 3)):
            data = np.frombuffer(rng.bytes(int(mb * MB * share)), dtype=np.uint8)
            save_file({"data": data}, str(tmp / name))
        (tmp / "meta.json").write_text(json.dumps({"step": 250 * i}))
        layout.publish(tmp, 250 * i, stage="base", model_tag=TAG)
    (base / "tokenizer").mkdir(parents=True)
    (base / "tokenizer" / "tokenizer.json").write_text(json.dumps({"vocab": list(range(65536))}))
    layout.write_json_atomic(base / "runs" / TAG / "run.json", {"run_id": "bench", "wandb_run_id": "bench"})


def timed(hub: LocalHub, cmd: list[str], env: dict[str, str]) -> tuple[float, int]:
    before = hub.bytes_downloaded
    start = time.monotonic()
    subprocess.run(cmd, env=env, cwd=REPO_ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - start, hub.bytes_downloaded - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="size of each checkpoint in MB")
    parser.add_argument("--checkpoints", type=int, default=3, help="checkpoints on the Hub")
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it (default: a temp dir)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="phoenix-bench-"))
    try:
        build_volume(work / "source", args.mb, args.checkpoints)
        with LocalHub(work / "hub", tokens={TOKEN: USER}) as hub:
            source = work / "source"
            files = {p.relative_to(source).as_posix(): p for p in sorted(source.rglob("*")) if p.is_file()}
            hub.publish(REPO_ID, files, private=True)
            env = os.environ | {
                "HF_ENDPOINT": hub.url,
                "HF_TOKEN": TOKEN,
                "HF_HUB_DISABLE_XET": "1",
                "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                "HF_HOME": str(work / "hf_home"),
                "NANOCHAT_BASE_DIR": str(work / "restored"),
                "MODEL_TAG": TAG,
                "HF_REPO_ID": REPO_ID,
            }
            rows = [
                ("phoenix restore", *timed(hub, [sys.executable, "-c", RESTORE, "restore"], env)),
                (
                    "snapshot_download",
                    *timed(hub, [sys.executable, "-c", SNAPSHOT, REPO_ID, str(work / "snap")], env),
                ),
            ]
        latest = layout.latest(layout.stage_dir(work / "restored", "base", TAG), full_hash=True)
        if latest is None or latest.step != 250 * args.checkpoints:
            sys.exit("error: the restored checkpoint is missing or does not verify")
        print(f"{args.checkpoints} checkpoints of {args.mb} MB on a local Hub, latest verified")
        print(f"{'method':<20}{'seconds':>9}{'MB down':>10}{'MB/s':>8}")
        for name, seconds, nbytes in rows:
            print(f"{name:<20}{seconds:>9.2f}{nbytes / MB:>10.1f}{nbytes / MB / seconds:>8.0f}")
        (_, t_restore, b_restore), (_, t_snap, b_snap) = rows
        print(f"restore: {b_restore / b_snap:.0%} of the bytes, {t_restore / t_snap:.0%} of the time")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
