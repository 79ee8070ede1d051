"""Preemption notice -> emergency checkpoint on the volume -> on the Hub: how much of a spot VM's warning
(AWS: 120 s, GCP and Azure: about 30 s) phoenix spends before its work is safe.

In this process: a local Hub serving generated shards and a fake AWS metadata server on loopback. As
Compose runs them: `phoenix sync` and `phoenix run` (PREEMPTION_WATCH=aws, polling every --poll-s
seconds, AWS's advice being 5). Once the run has logged --notice-step, the fake server starts answering
spot/instance-action; from that instant the script times the lines that say, in turn, that the watch saw
the notice, that the emergency checkpoint is published on the volume, that the sidecar's push of it is
done, and that `phoenix run` exited (as they arrive; regular checkpoints are off, so the only one after
the notice is the emergency one). The watch's delay is uniform in [0, poll]: --poll-s 0 shows the rest.

    python bench/preemption.py                    # tiny preset
    python bench/preemption.py --depth4           # depth 4, width 256, seq 512, vocab 4096 (compiled;
                                                  # the generated shards hold too few words for 8192)
    python bench/preemption.py --poll-s 0.1 --repeat 3
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # run as a script from a checkout: bench/ is not a package

from entrypoint.demo.fake_metadata import FakeMetadata  # noqa: E402
from entrypoint.demo.localhub import LocalHub  # noqa: E402
from entrypoint.demo.synthetic import write_shards  # noqa: E402

TOKEN, USER, TAG = "hf_benchLocalToken0123", "bench", "bench-preemption"
DATASET_REPO = "karpathy/fineweb-edu-100b-shuffle"
DEPTH4 = ("--depth", "4", "--aspect-ratio", "64", "--head-dim", "128", "--max-seq-len", "512",
          "--vocab-size", "4096", "--device-batch-size", "1", "--total-batch-size", "512")


class Process:
    """A `phoenix` process whose output lines are kept with the monotonic time each arrived."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "entrypoint", *args], env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: queue.Queue[tuple[float, str]] = queue.Queue()
        self.seen: list[tuple[float, str]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put((time.monotonic(), line))

    def wait_for(self, pattern: str, timeout: float = 900) -> tuple[float, re.Match]:
        """(arrival time, match) of the first line, seen or still to come, that matches `pattern`."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            for arrived, line in self.seen:
                if match := regex.search(line):
                    return arrived, match
            if time.monotonic() > deadline or (self.proc.poll() is not None and self.lines.empty()):
                tail = "".join(line for _, line in self.seen[-20:])
                raise SystemExit(f"no line matching {pattern!r}:\n{tail}")
            with contextlib.suppress(queue.Empty):
                self.seen.append(self.lines.get(timeout=0.5))


def one_notice(root: Path, env: dict[str, str], train_args: tuple[str, ...], notice_step: int,
               poll_s: float) -> dict[str, float]:
    volume = root / "volume"
    volume.mkdir()
    env = {**env, "NANOCHAT_BASE_DIR": str(volume)}
    with FakeMetadata("aws") as cloud:
        sidecar = Process(env, "sync")
        run = Process({**env, "PREEMPTION_WATCH": "aws", "PREEMPTION_METADATA_URL": cloud.url,
                       "PREEMPTION_POLL_S": str(poll_s)}, "run", "--", *train_args)
        try:
            _, step_line = run.wait_for(rf"step {notice_step:05d}/\d+ .* dt ([\d.]+)ms")
            notice = time.monotonic()
            cloud.announce(seconds=120)
            seen, _ = run.wait_for("event=preemption_notice ")
            published, match = run.wait_for(r"checkpoint published step=(\d+) bytes=(\d+) write_s=([\d.]+)")
            step = int(match.group(1))
            pushed, push = sidecar.wait_for(rf"event=push_done stage=base step={step} .*seconds=([\d.]+)")
            run.proc.wait(timeout=300)
            exited = time.monotonic()
        finally:
            for process in (run, sidecar):
                if process.proc.poll() is None:
                    process.proc.terminate()
                    process.proc.wait(timeout=300)
    return {"step_ms": float(step_line.group(1)), "seen_s": seen - notice, "volume_s": published - notice,
            "hub_s": pushed - notice, "exit_s": exited - notice, "mb": int(match.group(2)) / 1e6,
            "write_s": float(match.group(3)), "push_s": float(push.group(1)), "step": step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth4", action="store_true", help="the CPU comparison's depth-4 model")
    parser.add_argument("--poll-s", type=float, default=5.0, help="seconds between metadata polls")
    parser.add_argument("--notice-step", type=int, default=None, help="announce once this step is logged")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    notice_step = args.notice_step or (8 if args.depth4 else 20)
    train = (*(DEPTH4 if args.depth4 else ()), "--num-iterations", str(notice_step + 400), "--save-every",
             "100000", "--eval-every", "0", "--sample-every", "0")
    with tempfile.TemporaryDirectory(prefix="phoenix-bench-preemption-") as tmp:
        root = Path(tmp)
        with LocalHub(root / "hub", tokens={TOKEN: USER}) as hub:
            shards = write_shards(root / "shards", 4, 300)
            hub.publish_dataset(DATASET_REPO, {p.name: p for p in shards})
            env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HOME": str(root / "hf_home"),
                   "HF_REPO_ID": f"{USER}/checkpoints", "HF_SYNC_INTERVAL": "3600", "MODEL_TAG": TAG,
                   "PRESET": "tiny", "DEVICE": "cpu", "RUN_SFT": "0", "WANDB_MODE": "offline",
                   "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1",
                   "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            print(f"model={'depth 4' if args.depth4 else 'tiny'} poll_s={args.poll_s} notice after step "
                  f"{notice_step}; seconds from the notice:")
            print("run | step ms | watch saw it | on the volume | on the Hub | run exited | checkpoint MB "
                  "| write s | push s")
            for i in range(args.repeat):
                (root / f"run{i}").mkdir()
                r = one_notice(root / f"run{i}", env, train, notice_step, args.poll_s)
                print(f"{i + 1} | {r['step_ms']:.0f} | {r['seen_s']:.2f} | {r['volume_s']:.2f} | "
                      f"{r['hub_s']:.2f} | {r['exit_s']:.2f} | {r['mb']:.1f} | {r['write_s']:.2f} | "
                      f"{r['push_s']:.2f}", flush=True)
                env["MODEL_TAG"] = f"{TAG}-{i + 1}"  # a fresh run on the Hub each time


if __name__ == "__main__":
    main()
