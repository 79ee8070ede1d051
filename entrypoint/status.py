"""`phoenix status [--json]`: per stage, where the run is locally and on the Hub, how fast, and when done;
then what the run's interruptions cost (trainer.recovery)."""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any

import click

from entrypoint.hub.budget import Budget, plan_peak
from entrypoint.hub.config import HubConfig
from entrypoint.hub.errors import HubError
from entrypoint.hub.store import StoreView, counted_bytes
from entrypoint.hub.stores import open_store
from entrypoint.launch.volume import FailureLog
from entrypoint.logs import is_number, is_step_record, read_json, redact
from entrypoint.sidecar.sync import due
from trainer import checkpoint_layout as layout
from trainer import recovery
from trainer.jsonl import read_records

SHOWN_INTERRUPTIONS = 5  # the newest ones in the text view (--json has all)


def _recent_steps(cfg: HubConfig, stage: str, window: int = 50) -> list[dict[str, Any]]:
    records = read_records(cfg.base_dir / "logs" / f"train_{stage}_{cfg.model_tag}.jsonl")
    return [r for r in records[-4 * window:] if is_step_record(r)][-window:]


def _heartbeat(cfg: HubConfig) -> dict[str, Any]:
    return read_json(cfg.base_dir / "logs" / f"heartbeat_{cfg.model_tag}.json") or {}


def _quota_error(cfg: HubConfig) -> str | None:
    """The sidecar's last storage problem (the Hub full or locked, a push waiting for storage credit),
    unless a pass pushed everything after it (from its log file)."""
    try:
        lines = (cfg.base_dir / "logs" / "hf_sync.log").read_text(errors="replace").splitlines()[-500:]
    except FileNotFoundError:
        return None
    error = None
    for line in lines:
        if any(sign in line.lower() for sign in ("storage limit", "locked this account", "push_deferred")):
            error = line.split(" phoenix.sync ", 1)[-1].strip()
        elif "event=pass_done ok=True" in line and "deferred=0" in line:
            error = None
    return error


def _storage(cfg: HubConfig, view: StoreView, budget: Budget) -> dict[str, Any]:
    """What the Hub counts and will count once credits land, and the most it will count during the run at
    these settings (a checkpoint's size from the volume, else from the Hub)."""
    sizes = [c.total_bytes for stage in layout.STAGES
             for c in layout.complete_checkpoints(layout.stage_dir(cfg.base_dir, stage, cfg.model_tag))[:1]]
    sizes += [counted_bytes(c) for stage in layout.STAGES for c in view.checkpoints[stage][:1]]
    run_sft = os.environ.get("RUN_SFT", "1").strip() != "0"
    return budget.as_dict(plan_peak(cfg, max(sizes), run_sft) if sizes else None)


def _not_synced(cfg: HubConfig, stage: str, local: list[int], hub_steps: list[int] | None) -> list[int]:
    """Local checkpoints the sidecar still has to push, as it chooses them (`sync.due`): the newest, or every
    one with HF_KEEP_LAST=all (an older one is left out on purpose, not waiting)."""
    if hub_steps is None:
        return []
    waiting = due(cfg, stage, local, set(hub_steps))
    return sorted(waiting if cfg.keep_last is None else waiting[:1])


def collect(cfg: HubConfig, with_hub: bool = True) -> dict[str, Any]:
    """Everything `phoenix status` shows, as plain data."""
    report: dict[str, Any] = {"model_tag": cfg.model_tag, "base_dir": str(cfg.base_dir),
                              "repo_id": cfg.repo_id, "hub_error": None, "hub_storage": None,
                              "hub_quota_error": _quota_error(cfg), "stages": {}}
    view = None
    if with_hub and cfg.repo_id:
        try:
            store = open_store(cfg)
            view = store.view()
            report["hub_storage"] = _storage(cfg, view, Budget.of(cfg, *store.storage(view)))
        except HubError as exc:
            report["hub_error"] = redact(str(exc))
    heartbeat = _heartbeat(cfg)
    now = time.time()
    for stage in layout.STAGES:
        local = layout.complete_checkpoints(layout.stage_dir(cfg.base_dir, stage, cfg.model_tag))
        hub_steps = view.steps(stage) if view is not None else None
        latest = local[0] if local else None
        recent = _recent_steps(cfg, stage)
        entry: dict[str, Any] = {
            "local_step": latest.step if latest else None,
            "done": bool(latest and latest.done),
            "hub_step": max(hub_steps) if hub_steps else None,
            "not_synced": _not_synced(cfg, stage, [c.step for c in local], hub_steps),
            "seconds_since_checkpoint": round(now - latest.path.stat().st_mtime) if latest else None,
            "train_step": recent[-1]["step"] if recent else None,
            "tok_per_sec": round(statistics.median(r["tok_per_sec"] for r in recent)) if recent else None,
            "eta_seconds": None,
        }
        total = heartbeat.get("num_iterations")
        if recent and heartbeat.get("stage") == stage and not entry["done"] and is_number(total):
            remaining = total - recent[-1]["step"]
            entry["eta_seconds"] = round(max(0, remaining) * statistics.median(r["dt"] for r in recent))
        report["stages"][stage] = entry
    report["failures"] = FailureLog(cfg.base_dir, cfg.model_tag, limit=0).read()
    report["interruptions"] = recovery.read(cfg.base_dir, cfg.model_tag)
    return report


def interruption_lines(records: list[dict[str, Any]]) -> list[str]:
    """Per interruption: steps lost, launch to first step by phase, GPU-seconds lost; totals first."""
    if not records:
        return []
    gpu_h = sum(r["gpu_s_lost"] for r in records) / 3600
    lines = [f"interruptions: {len(records)}, {sum(r['steps_lost'] for r in records):,} steps lost, "
             f"{gpu_h:.2f} GPU-hours lost (lost steps + relaunches to first step)",
             f"  {'when (UTC)':16} {'stage':5} {'cause':7} {'resumed':>7} {'lost':>5} {'to 1st step':>11} "
             f"{'restore':>7} {'data':>6} {'compile':>7} {'1st step':>8} {'gpu-s lost':>10}"]
    for r in records[-SHOWN_INTERRUPTIONS:]:
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(r["time"]))
        lines.append(f"  {when:16} {r['stage']:5} {r['cause']:7} {r['resumed_step']:>7,} "
                     f"{r['steps_lost']:>5,} {r['launch_to_first_step_s']:>10.1f}s {r['restore_s']:>7.1f} "
                     f"{r['data_s']:>6.1f} {r['compile_s']:>7.1f} {r['first_step_s']:>8.1f} "
                     f"{r['gpu_s_lost']:>10,.0f}")
    return lines


def _fmt(value: Any, unit: str = "") -> str:
    return "-" if value is None else f"{value:,}{unit}" if isinstance(value, int) else f"{value}{unit}"


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON, for scripts.")
@click.option("--no-hub", is_flag=True, help="Do not ask the Hub (local state only).")
def status_command(as_json: bool, no_hub: bool) -> None:
    """Latest local and Hub checkpoint per stage, unsynced steps, speed and ETA."""
    cfg = HubConfig.from_env_or_exit()
    report = collect(cfg, with_hub=not no_hub)
    if as_json:
        click.echo(json.dumps(report, indent=1))
        return
    storage = report["hub_storage"]
    where = "bucket" if cfg.in_bucket else "repo"
    click.echo(f"run {report['model_tag']} on {report['base_dir']}  hub {report['repo_id'] or 'off'} "
               f"(checkpoints in the {where})"
               + (f"  (hub unreachable: {report['hub_error']})" if report["hub_error"] else ""))
    if storage is not None:
        gb = {k: "-" if v is None else f"{v / 1e9:.2f} GB" for k, v in storage.items()}
        click.echo(f"hub storage: counted {gb['counted']}, settled {gb['settled']} once credited, projected "
                   f"peak {gb['projected_peak']}, limit {gb['limit']}")
    if report["hub_quota_error"]:
        click.echo(f"hub storage limit hit: {report['hub_quota_error']}")
    click.echo(f"{'stage':6} {'local':>8} {'hub':>8} {'unsynced':>9} {'ckpt age':>9} {'step':>8} "
               f"{'tok/s':>10} {'eta':>8}")
    if (failure := report["failures"]) is not None:
        if failure.get("held"):
            click.echo(f"trainer: not relaunching after {failure['count']} identical failed launches: "
                       f"{failure['error']}")
        else:
            click.echo(f"trainer: the last launch failed ({failure['count']} in a row): {failure['error']}")
    for stage, e in report["stages"].items():
        unsynced = ",".join(map(str, e["not_synced"])) or "-"
        age = _fmt(e["seconds_since_checkpoint"], "s")
        eta = "done" if e["done"] else _fmt(e["eta_seconds"], "s")
        click.echo(f"{stage:6} {_fmt(e['local_step']):>8} {_fmt(e['hub_step']):>8} {unsynced:>9} {age:>9} "
                   f"{_fmt(e['train_step']):>8} {_fmt(e['tok_per_sec']):>10} {eta:>8}")
    for line in interruption_lines(report["interruptions"]):
        click.echo(line)
