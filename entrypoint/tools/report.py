"""`phoenix report`: one markdown page and PNG plots of a run, from the files it left on the volume.

Reads logs/train_<stage>_<tag>.jsonl (a record per step: loss, tok/s, MFU, time; val bpb/loss records;
a `resume` record where a process resumed), logs/phoenix_run.log (restores from the Hub),
logs/hf_sync.log (the sidecar's pushes), runs/<tag>/interruptions.jsonl (what each interruption cost)
and runs/<tag>/eval/*.json (phoenix eval). Writes runs/<tag>/report/report.md and its PNGs; needs no
W&B, no GPU and no torch (matplotlib, Agg backend).
"""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from entrypoint.hub.config import model_tag_problem
from entrypoint.logs import fail, is_number, is_step_record, read_json
from trainer import checkpoint_layout as layout
from trainer import recovery
from trainer.jsonl import read_records

_KV = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')
_LOG_TIME = "%Y-%m-%dT%H:%M:%S"  # entrypoint.logs' datefmt (local time of the container, usually UTC)


@dataclass
class StageSeries:
    """One stage's history as it ended up: a step logged again after a resume keeps its last value."""

    stage: str
    train: dict[int, dict[str, Any]] = field(default_factory=dict)  # step -> its record
    val: dict[int, tuple[str, float]] = field(default_factory=dict)  # step -> (metric name, value)
    resumes: list[int] = field(default_factory=list)  # checkpoint steps a process resumed from
    restores: list[int] = field(default_factory=list)  # checkpoint steps restored from the Hub
    pushes: list[tuple[int, float | None]] = field(default_factory=list)  # (step, seconds behind the step)


def read_stage(logs: Path, stage: str, model_tag: str) -> StageSeries:
    series = StageSeries(stage)
    last = 0
    # Torn lines (a kill, a full disk) and records of the wrong shape are skipped.
    for record in read_records(logs / f"train_{stage}_{model_tag}.jsonl"):
        step = record.get("step")
        if type(step) is not int:
            continue
        if record.get("event") == "resume":
            if step not in series.resumes:
                series.resumes.append(step)
        elif is_step_record(record):
            if step <= last and step - 1 not in series.resumes:  # a log written before resume records
                series.resumes.append(step - 1)
            series.train[step] = record
            last = step
        else:
            for name in ("val_bpb", "val_loss"):
                if is_number(record.get(name)):
                    series.val[step] = (name, record[name])
    return series


def log_events(path: Path, event: str) -> list[tuple[float, dict[str, str]]]:
    """(time, fields) of each `event=<event>` line of a key=value log."""
    if not path.is_file():
        return []
    found = []
    for line in path.read_text(errors="replace").splitlines():
        if f"event={event} " not in line + " ":
            continue
        fields = {k: v.strip('"') for k, v in _KV.findall(line)}
        try:
            found.append((time.mktime(time.strptime(line.split(" ", 1)[0], _LOG_TIME)), fields))
        except ValueError:
            continue
    return found


def add_hub_events(series: StageSeries, logs: Path) -> None:
    """Restores (phoenix_run.log) and pushes with their lag behind training (hf_sync.log)."""
    for _, fields in log_events(logs / "phoenix_run.log", "restore_start"):
        if fields.get("stage") == series.stage and fields.get("step", "").isdigit():
            series.restores.append(int(fields["step"]))
    for pushed_at, fields in log_events(logs / "hf_sync.log", "push_done"):
        if fields.get("stage") == series.stage and fields.get("step", "").isdigit():
            step = int(fields["step"])
            stepped_at = series.train.get(step, {}).get("time")
            series.pushes.append((step, pushed_at - stepped_at if stepped_at else None))


def read_evals(run_dir: Path) -> list[dict[str, Any]]:
    """Each readable eval result (a JSON object); torn or foreign files are skipped."""
    return [result for path in sorted((run_dir / "eval").glob("*.json")) if (result := read_json(path))]


# ---------------------------------------------------------------------------------------------------
# Plots


def plot(series: StageSeries, metric: str, out: Path) -> Path | None:
    """One metric of a stage against step, resumes and restores marked; None when there is no data."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display in a container
    import matplotlib.pyplot as plt

    if metric == "val":
        points = sorted((step, value) for step, (_, value) in series.val.items())
        label = next(iter(series.val.values()))[0] if series.val else "val"
    elif metric == "sync_lag":
        points = sorted((step, lag / 60) for step, lag in series.pushes if lag is not None)
        label = "Hub sync lag (min after the step)"
    else:
        points = sorted((step, r[metric]) for step, r in series.train.items() if r.get(metric) is not None)
        label = {"loss": "train loss", "tok_per_sec": "tok/s", "mfu": "MFU (%)"}[metric]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    steps, values = zip(*points, strict=True)
    ax.plot(steps, values, marker="o" if len(points) < 40 else None, markersize=3, linewidth=1.2)
    for i, step in enumerate(series.resumes):
        ax.axvline(step, color="tab:red", linestyle="--", linewidth=1, label="resume" if i == 0 else None)
    for i, step in enumerate(series.restores):
        ax.axvline(step, color="tab:green", linestyle=":", linewidth=2, label="restore" if i == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.set_title(f"{series.stage}: {label}")
    ax.grid(alpha=0.3)
    if series.resumes or series.restores:
        ax.legend(loc="best")
    fig.tight_layout()
    path = out / f"{series.stage}_{metric}.png"
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------
# The page


def stage_section(series: StageSeries, pngs: list[Path]) -> list[str]:
    train = [series.train[s] for s in sorted(series.train)]
    lines = [f"## {series.stage}", ""]
    if not train:
        return [*lines, "No steps logged.", ""]
    last = train[-1]
    tok = statistics.median(r["tok_per_sec"] for r in train)
    mfus = [r["mfu"] for r in train if is_number(r.get("mfu"))]
    rows = [("steps logged", f"{len(train)} (last step {last['step']})"),
            ("final train loss", f"{last['loss']:.4f}"),
            ("median tok/s", f"{tok:,.0f}"),
            ("median MFU", f"{statistics.median(mfus):.1f}%" if mfus else "- (CPU or unknown GPU)"),
            ("training time", f"{last['elapsed'] / 60:.1f} min" if is_number(last.get("elapsed")) else "-")]
    if series.val:
        name = next(iter(series.val.values()))[0]
        best = min(value for _, value in series.val.values())
        rows.append((f"best {name.replace('_', ' ')}", f"{best:.4f}"))
    rows.append(("resumed from checkpoint steps", ", ".join(map(str, series.resumes)) or "none"))
    rows.append(("restored from the Hub at steps", ", ".join(map(str, series.restores)) or "none"))
    if series.pushes:
        lags = [lag for _, lag in series.pushes if lag is not None]
        lag = f", median lag {statistics.median(lags) / 60:.1f} min after the step" if lags else ""
        count = f"{len(series.pushes)} checkpoint{'s' if len(series.pushes) != 1 else ''}"
        rows.append(("pushed to the Hub", f"{count}, last step "
                                          f"{max(s for s, _ in series.pushes)}{lag}"))
    lines += ["| | |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows), ""]
    lines += [f"![{png.stem}]({png.name})" for png in pngs]
    return [*lines, ""]


def interruption_section(records: list[dict[str, Any]]) -> list[str]:
    """Per interruption: steps lost, launch to first step by phase, GPU-seconds lost (trainer.recovery)."""
    if not records:
        return []
    gpu_h = sum(r["gpu_s_lost"] for r in records) / 3600
    lines = ["## Interruptions", "",
             f"{len(records)} interruption{'s' if len(records) != 1 else ''}: "
             f"{sum(r['steps_lost'] for r in records):,} steps lost, {gpu_h:.2f} GPU-hours lost (the lost "
             "steps on the GPUs that ran them, plus each relaunch's time to its first step on all its GPUs).",
             "",
             "| when (UTC) | stage | cause | resumed at | reached | steps lost | launch to first step | "
             "restore | tokenizer, shards | compile | first step | other | GPU-s lost |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(r["time"]))
        lines.append(f"| {when} | {r['stage']} | {r['cause']} | {r['resumed_step']} | {r['reached_step']} | "
                     f"{r['steps_lost']} | {r['launch_to_first_step_s']:.1f} s | {r['restore_s']:.1f} s | "
                     f"{r['data_s']:.1f} s | {r['compile_s']:.1f} s | {r['first_step_s']:.1f} s | "
                     f"{r['other_s']:.1f} s | {r['gpu_s_lost']:,.0f} |")
    return [*lines, ""]


def eval_section(results: list[dict[str, Any]]) -> list[str]:
    if not results:
        return []
    lines = ["## Evaluations", "", "| checkpoint | metric | value |", "| --- | --- | --- |"]
    for result in results:
        where = f"{result.get('stage')} step {result.get('step')}"
        headline = {"core": ("CORE", result.get("core_metric")), "chat": ("ChatCORE", result.get("chatcore"))}
        name, value = headline.get(result.get("eval"), ("?", None))
        if is_number(value):
            lines.append(f"| {where} | {name} | {value:.4f} |")
        accuracies = result.get("accuracy")
        for task, accuracy in (accuracies.items() if isinstance(accuracies, dict) else ()):
            if is_number(accuracy):
                lines.append(f"| {where} | {task} accuracy | {accuracy:.4f} |")
    return [*lines, ""]


def write_report(base_dir: Path, model_tag: str, out: Path | None = None
                 ) -> tuple[Path, dict[str, StageSeries]]:
    """Write report.md and the PNGs (default runs/<tag>/report/); returns the page and the data plotted."""
    logs, run_dir = base_dir / "logs", base_dir / "runs" / model_tag
    out = out or run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Run report: {model_tag}", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from `{base_dir}`.", ""]
    stages = {}
    for stage in layout.STAGES:
        series = read_stage(logs, stage, model_tag)
        if not series.train:
            continue
        add_hub_events(series, logs)
        stages[stage] = series
        pngs = [p for metric in ("loss", "val", "tok_per_sec", "mfu", "sync_lag")
                if (p := plot(series, metric, out)) is not None]
        lines += stage_section(series, pngs)
    if not stages:
        lines += ["No training steps logged yet.", ""]
    lines += interruption_section(recovery.read(base_dir, model_tag))
    lines += eval_section(read_evals(run_dir))
    page = out / "report.md"
    tmp = page.with_suffix(".md.tmp")  # renamed over the page: a reader never sees half of it
    tmp.write_text("\n".join(lines))
    tmp.replace(page)
    return page, stages


@click.command("report")
@click.option("--model-tag", envvar="MODEL_TAG", default="d26-hyperbolic", show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for report.md and the PNGs [default: runs/<MODEL_TAG>/report on the volume].")
def report_command(model_tag: str, out: Path | None) -> None:
    """A markdown report with plots (loss, val, tok/s, MFU, Hub sync lag) from the run's files."""
    import os

    base_dir = Path(os.environ.get("NANOCHAT_BASE_DIR") or "~/.cache/nanochat").expanduser()
    if problem := model_tag_problem(model_tag):  # the report is written under runs/<tag>/
        fail(problem)
    if not (base_dir / "logs").is_dir():
        fail(f"no logs in {base_dir}: set NANOCHAT_BASE_DIR to the run's volume")
    page, stages = write_report(base_dir, model_tag, out)
    steps = " ".join(f"{s}={max(v.train)}" for s, v in stages.items())
    click.echo(f"report={page} {steps}".strip())
