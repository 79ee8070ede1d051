"""Benchmark `phoenix restore` through Xet and through plain HTTP, and `snapshot_download`, on a local Hub.

The Hub holds N checkpoints of --mb MB each (model + optimizer safetensors), a tokenizer and run.json, as
the sidecar lays them out: once uploaded through Xet (hf_xet, as the sidecar does) and once as classic LFS
files. Every client runs as a separate process on an empty volume. The server (in this process) counts
the bytes it sends over HTTP; a Xet download reads the Hub's local CAS folder directly, so for it the
table shows the bytes restored instead.

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

from entrypoint.demo.localhub import LocalHub  # noqa: E402
from trainer import checkpoint_content as content  # noqa: E402
from trainer import checkpoint_layout as layout  # noqa: E402

TOKEN, USER, TAG = "hf_benchLocalToken0123", "bench", "d26-hyperbolic"
REPO_ID = f"{USER}/phoenix-bench"
XET_REPO_ID = f"{USER}/phoenix-bench-xet"
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
        for name, share in (("model.safetensors", 1 / 3), ("optimizer.safetensors", 2 / 3)):
            data = np.frombuffer(rng.bytes(int(mb * MB * share)), dtype=np.uint8)
            save_file({"data": data}, str(tmp / name))
        save_file({"rank0.torch_cpu": np.full(16, i, dtype=np.uint8)}, str(tmp / "rng.safetensors"))
        (tmp / "meta.json").write_text(json.dumps(content.blank_meta(250 * i)))
        layout.publish(tmp, 250 * i, stage="base", model_tag=TAG)
    (base / "tokenizer").mkdir(parents=True)
    (base / "tokenizer" / "tokenizer.json").write_text(json.dumps({"vocab": list(range(65536))}))
    layout.write_json_atomic(base / "runs" / TAG / "run.json", {"run_id": "bench", "wandb_run_id": "bench"})


def timed(
    hub: LocalHub, cmd: list[str], env: dict[str, str], restored: Path | None = None
) -> tuple[float, int]:
    """Seconds and bytes of one client run: HTTP bytes the server sent, or (Xet) the bytes restored."""
    before = hub.bytes_downloaded
    start = time.monotonic()
    subprocess.run(cmd, env=env, cwd=REPO_ROOT, check=True, stdout=subprocess.DEVNULL)
    seconds = time.monotonic() - start
    if restored is not None:
        files = [p for p in restored.rglob("*") if p.is_file() and "logs" not in p.parts]
        return seconds, sum(p.stat().st_size for p in files)
    return seconds, hub.bytes_downloaded - before


def upload_through_xet(url: str, source: Path, repo_id: str) -> None:
    """The sidecar's way: one commit per checkpoint, large files through hf_xet."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=url, token=TOKEN)
    api.create_repo(repo_id, private=True)
    api.upload_folder(repo_id=repo_id, folder_path=source, commit_message="checkpoints")


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
            upload_through_xet(hub.url, source, XET_REPO_ID)
            env = os.environ | {
                "HF_ENDPOINT": hub.url,
                "HF_TOKEN": TOKEN,
                "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                "HF_HOME": str(work / "hf_home"),
                "MODEL_TAG": TAG,
            }
            env.pop("HF_HUB_DISABLE_XET", None)
            http = env | {"HF_HUB_DISABLE_XET": "1", "HF_REPO_ID": REPO_ID}
            restore_cmd = [sys.executable, "-c", RESTORE, "restore"]
            volumes = {name: work / f"restored_{name}" for name in ("xet", "http")}
            xet = env | {"HF_REPO_ID": XET_REPO_ID, "NANOCHAT_BASE_DIR": str(volumes["xet"])}
            http_volume = http | {"NANOCHAT_BASE_DIR": str(volumes["http"])}
            rows = [
                ("restore, Xet", *timed(hub, restore_cmd, xet, volumes["xet"])),
                ("restore, HTTP", *timed(hub, restore_cmd, http_volume)),
                (
                    "snapshot_download",
                    *timed(hub, [sys.executable, "-c", SNAPSHOT, REPO_ID, str(work / "snap")], http),
                ),
            ]
        for volume in volumes.values():
            latest = layout.latest(layout.stage_dir(volume, "base", TAG), full_hash=True)
            if latest is None or latest.step != 250 * args.checkpoints:
                sys.exit(f"error: the checkpoint restored in {volume} is missing or does not verify")
        print(f"{args.checkpoints} checkpoints of {args.mb} MB on a local Hub, latest verified on both paths")
        print(f"{'method':<20}{'seconds':>9}{'MB':>10}{'MB/s':>8}")
        for name, seconds, nbytes in rows:
            print(f"{name:<20}{seconds:>9.2f}{nbytes / MB:>10.1f}{nbytes / MB / seconds:>8.0f}")
        (_, t_xet, _), (_, t_http, b_http), (_, t_snap, b_snap) = rows
        print(f"restore over HTTP: {b_http / b_snap:.0%} of the bytes, {t_http / t_snap:.0%} of the time "
              f"of snapshot_download; through Xet: {t_xet / t_http:.0%} of the HTTP restore's time")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
