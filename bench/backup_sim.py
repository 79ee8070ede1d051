"""A multi-day run's Hub backups in scaled time: the real sidecar, the local Hub on the real Hub's terms.

The local Hub credits a squash late (HF_SQUASH_CREDIT_HOURS of Hub time), caps the account's storage and,
if asked, the commits per hour; a fake trainer saves a checkpoint every --save-every-min minutes, of
--ckpt-gb "GB" (each GB stands for --bytes-per-gb bytes), base training first, then SFT from the final base
checkpoint. The sidecar is phoenix's own loop (`run_loop`), in this process; time runs --scale times faster
than the clock, for the Hub, the sidecar's interval and the trainer alike. At the end it is stopped as
`docker compose stop` would (final push), a fresh volume restores from the Hub, and the figures are printed:
pushes refused (403/429), the worst backup lag (how far the trainer's newest checkpoint was ahead of the
Hub's, in training hours), the first backup, the peak storage counted, history writes and requests per
pushed checkpoint, and whether the restore is bitwise the trainer's.

    python bench/backup_sim.py [--store bucket|repo|repo-unbudgeted] [--hours 72] [--scale 1800]

`repo-unbudgeted` keeps checkpoints in the git repo with no budget (HF_STORAGE_LIMIT_GB far above the
account's): what the budget prevents. tests/test_backup_terms.py runs a few scaled minutes of it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # run as a script from a checkout: bench/ is not a package

from entrypoint.demo.localhub import LocalHub  # noqa: E402
from entrypoint.hub.calls import Pause  # noqa: E402
from entrypoint.hub.config import HubConfig  # noqa: E402
from entrypoint.hub.restore import restore  # noqa: E402
from entrypoint.hub.stores import claim_generation  # noqa: E402
from entrypoint.sidecar import sync  # noqa: E402
from entrypoint.sidecar.loop import run_loop  # noqa: E402
from trainer import checkpoint_content as content  # noqa: E402
from trainer import checkpoint_layout as layout  # noqa: E402

TOKEN, USER, TAG = "hf_simLocalToken0123456", "sim", "d26-hyperbolic"
HOUR = 3600.0


@dataclass(frozen=True)
class SimConfig:
    hours: float = 72.0  # the run, in Hub time
    sft_hours: float = 4.0  # its last part is SFT
    save_every_min: float = 10.0  # the trainer's checkpoint cadence (d26 at SAVE_EVERY=250)
    interval_s: float = 1200.0  # HF_SYNC_INTERVAL
    keep_last: int = 2  # HF_KEEP_LAST
    ckpt_gb: float = 16.7  # d26 with optimizer state
    limit_gb: float = 100.0  # the account's private storage (free)
    credit_hours: float = 36.0  # the Hub's late credit of a squash
    commit_quota: int | None = None  # commit-like actions per Hub hour, None: no quota
    scale: float = 1800.0  # Hub seconds per clock second
    bytes_per_gb: int = 10_000  # checkpoint bytes standing for one GB
    store: str = "bucket"  # bucket | repo | repo-unbudgeted


@dataclass
class SimResult:
    pushes: int = 0
    refused: int = 0  # 403 and 429 answers
    deferred: int = 0  # passes that held a checkpoint back to stay within the limit
    first_backup_h: float | None = None  # when the Hub first held a checkpoint (Hub time)
    worst_lag_h: float = 0.0  # the longest a checkpoint waited for the Hub to hold it (or a newer one)
    peak_counted_gb: float = 0.0
    history_writes: int = 0  # commits and squashes
    requests: int = 0
    restored: tuple[str, int] | None = None
    bitwise: bool = False
    landed: list[tuple[float, tuple[int, int]]] = field(default_factory=list)  # (clock, (stage, step))
    passes: list[tuple[float, float]] = field(default_factory=list)  # (clock at start, clock seconds taken)


class RecordingSyncer(sync.Syncer):
    """The sidecar's Syncer, noting when each push landed."""

    def __init__(self, cfg: HubConfig, stop: threading.Event, result: SimResult) -> None:
        super().__init__(cfg, pause=Pause(stop))
        self.result = result

    def sync_once(self) -> sync.PassResult:
        start = time.monotonic()
        outcome = super().sync_once()
        self.result.passes.append((start, time.monotonic() - start))
        self.result.deferred += bool(outcome.deferred)
        return outcome

    def _pushed(self, view: Any, stage: str, step: int, *args: Any) -> None:
        self.result.landed.append((time.monotonic(), (layout.STAGES.index(stage), step)))
        self.result.pushes += 1
        super()._pushed(view, stage, step, *args)


def save_checkpoint(base: Path, stage: str, step: int, nbytes: int, done: bool = False) -> None:
    """A published checkpoint of about `nbytes`: weights a third, optimizer state two thirds, random."""
    tmp = layout.new_tmp_dir(layout.stage_dir(base, stage, TAG), step)
    rng = np.random.default_rng([step, layout.STAGES.index(stage)])
    for name, share in (("model.safetensors", 1 / 3), (content.GATHERED_OPTIMIZER, 2 / 3)):
        save_file({"w": rng.random(max(1, int(nbytes * share) // 4), dtype=np.float32)}, str(tmp / name))
    save_file({"rank0.torch_cpu": np.zeros(8, dtype=np.uint8)}, str(tmp / "rng.safetensors"))
    layout.write_json_atomic(tmp / layout.META_NAME, content.blank_meta(step, stage))
    layout.publish(tmp, step, stage=stage, model_tag=TAG, done=done)


def sim_env(cfg: SimConfig, hub: LocalHub, base: Path, environ: dict[str, str]) -> dict[str, str]:
    gb = cfg.bytes_per_gb / 1e9  # HF_STORAGE_LIMIT_GB is in real GB: the scaled account's
    limit = cfg.limit_gb * gb if cfg.store != "repo-unbudgeted" else 1e6
    credit = cfg.credit_hours / cfg.scale if cfg.store != "repo-unbudgeted" else 0.0
    (base / "tokenizer").mkdir(parents=True, exist_ok=True)
    (base / "tokenizer" / "tokenizer.json").write_text('{"model": "bpe"}')
    layout.write_json_atomic(base / "runs" / TAG / "run.json", {"run_id": "sim", "wandb_run_id": "sim"})
    return environ | {
        "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "NANOCHAT_BASE_DIR": str(base), "MODEL_TAG": TAG,
        "HF_REPO_ID": f"{USER}/phoenix-sim", "HF_CHECKPOINT_STORE": cfg.store.removesuffix("-unbudgeted"),
        "HF_SYNC_INTERVAL": str(cfg.interval_s / cfg.scale), "HF_KEEP_LAST": str(cfg.keep_last),
        "HF_STORAGE_LIMIT_GB": str(limit), "HF_SQUASH_CREDIT_HOURS": str(credit),
    }


def simulate(cfg: SimConfig, hub: LocalHub, workdir: Path, environ: dict[str, str]) -> SimResult:
    """Run the scaled run against `hub` (started, with TOKEN accepted for USER); see the module's lines."""
    result, base = SimResult(), workdir / "volume"
    env = sim_env(cfg, hub, base, environ)
    hub.credit_delay_s = cfg.credit_hours * HOUR / cfg.scale
    hub.set_quota(USER, int(cfg.limit_gb * cfg.bytes_per_gb))
    if cfg.commit_quota is not None:
        hub.set_commit_quota(cfg.commit_quota, window_s=HOUR / cfg.scale)
    sync.QUOTA_BACKOFF_S = HOUR / cfg.scale  # an hour of Hub time
    hub_cfg = HubConfig.from_env(env)
    claim_generation(hub_cfg)  # the launch's claim, as `phoenix run` makes it
    first_request = len(hub.request_log)
    stop = threading.Event()
    syncer = RecordingSyncer(hub_cfg, stop, result)
    sidecar = threading.Thread(target=run_loop, args=(hub_cfg,), daemon=True, kwargs={
        "stop": stop, "syncer": syncer, "poll_seconds": min(0.05, hub_cfg.sync_interval / 4),
        "grace_seconds": 840 / cfg.scale + 30})
    saved: dict[tuple[int, int], float] = {}  # (stage, step) -> clock time it was published
    made: dict[tuple[str, int], dict[str, str]] = {}  # (stage, step) -> sha256 of each file, as saved
    nbytes, every = int(cfg.ckpt_gb * cfg.bytes_per_gb), cfg.save_every_min * 60 / cfg.scale
    saves = int(cfg.hours * 60 / cfg.save_every_min)
    sft_from = saves - int(cfg.sft_hours * 60 / cfg.save_every_min)
    start = time.monotonic()
    sidecar.start()
    for k in range(1, saves + 1):
        time.sleep(max(0.0, start + k * every - time.monotonic()))
        stage, step = ("base", k) if k <= sft_from else ("sft", k - sft_from)
        save_checkpoint(base, stage, step, nbytes, done=k == sft_from)
        saved[(layout.STAGES.index(stage), step)] = time.monotonic()
        made[(stage, step)] = _digests(base, stage, step)
        layout.prune(layout.stage_dir(base, stage, TAG), keep_last=3)  # the trainer's KEEP_LAST
        result.peak_counted_gb = max(result.peak_counted_gb, hub.storage(USER).counted / cfg.bytes_per_gb)
    stop.set()  # docker compose stop: the sidecar's final push
    sidecar.join(120)
    log = hub.request_log[first_request:]
    result.refused = sum(r.status in (403, 429) for r in log)
    result.history_writes = sum(r.method == "POST" and r.status == 200
                                and ("/commit/" in r.path or "/super-squash/" in r.path) for r in log)
    result.requests = len(log)
    result.peak_counted_gb = max(result.peak_counted_gb, hub.storage(USER).counted / cfg.bytes_per_gb)
    _lags(cfg, result, saved, start, time.monotonic())
    _restore_check(env, made, workdir / "redeployed", result)
    return result


def _lags(cfg: SimConfig, result: SimResult, saved: dict[tuple[int, int], float], start: float,
          end: float) -> None:
    """How long each checkpoint waited, from its save until the Hub held it or a newer one (never: until
    the end): the training a lost instance would cost beyond the trainer's own cadence."""
    hours = cfg.scale / HOUR
    if result.landed:
        result.first_backup_h = (result.landed[0][0] - start) * hours
    for key, at in saved.items():
        covered = min((t for t, held in result.landed if held >= key and t >= at), default=end)
        result.worst_lag_h = max(result.worst_lag_h, (covered - at) * hours)


def _restore_check(env: dict[str, str], made: dict[tuple[str, int], dict[str, str]], fresh: Path,
                   result: SimResult) -> None:
    """A redeploy: restore onto an empty volume; bitwise what the trainer saved as the Hub's newest."""
    steps = restore(HubConfig.from_env(env | {"NANOCHAT_BASE_DIR": str(fresh)}))
    stage = next((s for s in reversed(layout.STAGES) if steps[s] is not None), None)
    if stage is not None:
        result.restored = (stage, steps[stage])
        result.bitwise = _digests(fresh, stage, steps[stage]) == made[result.restored]


def _digests(volume: Path, stage: str, step: int) -> dict[str, str]:
    folder = layout.stage_dir(volume, stage, TAG) / layout.step_dir_name(step)
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def report(cfg: SimConfig, result: SimResult) -> str:
    pushes, hours = max(result.pushes, 1), cfg.scale / HOUR
    starts = [t for t, _ in result.passes]
    gap = max((b - a for a, b in zip(starts, starts[1:], strict=False)), default=0.0) * hours
    longest = max((d for _, d in result.passes), default=0.0) * hours
    return (f"store={cfg.store} hours={cfg.hours:g} interval_s={cfg.interval_s:g} keep_last={cfg.keep_last} "
            f"ckpt_gb={cfg.ckpt_gb:g} limit_gb={cfg.limit_gb:g} credit_h={cfg.credit_hours:g} "
            f"commit_quota={cfg.commit_quota or '-'}\n"
            f"  pushes={result.pushes} refused={result.refused} deferred_passes={result.deferred} "
            f"first_backup_h={_h(result.first_backup_h)} worst_lag_h={_h(result.worst_lag_h)} "
            f"peak_counted_gb={result.peak_counted_gb:.1f}\n"
            f"  passes={len(result.passes)} longest_pass_h={longest:.2f} longest_pass_gap_h={gap:.2f}\n"
            f"  history_writes_per_push={result.history_writes / pushes:.2f} "
            f"requests_per_push={result.requests / pushes:.1f} restored={result.restored} "
            f"bitwise={'yes' if result.bitwise else 'NO'}")


def _h(hours: float | None) -> str:
    return "-" if hours is None else f"{hours:.2f}"


def main() -> None:
    defaults = SimConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in SimConfig.__dataclass_fields__:
        default = getattr(defaults, name)
        kind = {"store": str, "commit_quota": int}.get(name, int if isinstance(default, int) else float)
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=default)
    cfg = SimConfig(**vars(parser.parse_args()))
    with tempfile.TemporaryDirectory(prefix="phoenix-sim-") as tmp:
        os.environ["HF_HOME"] = str(Path(tmp) / "hf_home")  # hf_xet's cache too: read when its session starts
        environ = {k: v for k, v in os.environ.items() if not k.startswith("HF_")} | {
            "HF_HOME": os.environ["HF_HOME"], "HF_HUB_DISABLE_TELEMETRY": "1"}
        with LocalHub(Path(tmp) / "hub", tokens={TOKEN: USER}) as hub:
            print(report(cfg, simulate(cfg, hub, Path(tmp), environ)), flush=True)


if __name__ == "__main__":
    main()
