"""`phoenix eval base|chat`: score the newest checkpoint of MODEL_TAG and keep the results with the run.

`base` computes the CORE metric of the newest base checkpoint from an eval bundle (a folder, a .zip
URL, or a Hub dataset repo); `chat` runs ARC-Easy/Challenge, MMLU and GSM8K on the newest SFT
checkpoint. Results go to runs/<MODEL_TAG>/eval/<stage>_step<N>.json on the volume, one log line per
task, and the run's W&B summary when WANDB_RUN is set. One process, one device (CPU or a GPU).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from entrypoint.hub.config import EVAL_DIR, model_tag_problem
from entrypoint.launch.prepare import volume_error
from entrypoint.logs import fail, kv, redact, setup_logging
from trainer import checkpoint_layout as layout

if TYPE_CHECKING:
    from trainer.engine import Engine

log = logging.getLogger("phoenix.eval")

# nanochat's copy of the DCLM CORE tasks (core.yaml, eval_data/, eval_meta_data.csv), zipped.
DEFAULT_EVAL_BUNDLE = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
DEFAULT_CHAT_TASKS = "ARC-Easy,ARC-Challenge,MMLU,GSM8K"
MAX_BUNDLE_BYTES = 2 * 10**9  # packed or unpacked; far above nanochat's eval_bundle.zip


class EvalError(Exception):
    """A fault the user fixes (no checkpoint, an unreachable bundle): one `error:` line."""


def base_dir_from_env() -> Path:
    return Path(os.environ.get("NANOCHAT_BASE_DIR", "~/.cache/nanochat")).expanduser()


def results_path(base_dir: Path, model_tag: str, stage: str, step: int) -> Path:
    """Where an evaluation of checkpoint (stage, step) is kept; the model card reads this folder."""
    return base_dir / "runs" / model_tag / EVAL_DIR / f"{stage}_step{step:06d}.json"


# ---------------------------------------------------------------------------------------------------
# The eval bundle


def resolve_bundle(source: str, base_dir: Path, max_bytes: int = MAX_BUNDLE_BYTES) -> Path:
    """A local folder with core.yaml for `source`: the folder itself, a downloaded and unpacked .zip URL,
    or a Hub dataset repo ("owner/name") downloaded with huggingface_hub; downloads land on the volume
    under eval_bundle/ and are reused. A download of more than `max_bytes` (packed or unpacked) is refused
    before it lands: the volume holds the checkpoints."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        return folder
    if source.startswith(("http://", "https://")):
        target = base_dir / "eval_bundle" / hashlib.sha256(source.encode()).hexdigest()[:12]
        if not (target / "core.yaml").is_file():
            _download_zip(source, target, max_bytes)
        return target
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):
        return _download_dataset(source, base_dir / "eval_bundle" / source.replace("/", "--"), max_bytes)
    raise EvalError(f"eval bundle {source!r} is neither a folder, an http(s) .zip URL nor a Hub dataset "
                    "repo id: set EVAL_BUNDLE (or --bundle)")


def _too_big(source: str, size: int, max_bytes: int) -> EvalError:
    return EvalError(f"eval bundle: {source} holds {size / 1e6:.1f} MB, more than the "
                     f"{max_bytes / 1e6:.1f} MB allowed: point EVAL_BUNDLE at nanochat's eval_bundle.zip, or "
                     "raise --max-bundle-mb")


def _stored(source: str, exc: OSError) -> EvalError | None:
    """The volume's own fault (full, read-only) while storing the bundle, as one line; None otherwise."""
    line = volume_error(exc)
    return None if line is None else EvalError(f"eval bundle: cannot store {source} on the volume: {line}")


def _download_dataset(repo: str, target: Path, max_bytes: int) -> Path:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        info = HfApi().dataset_info(repo, files_metadata=True)
        size = sum(sibling.size or 0 for sibling in info.siblings or [])
        if size > max_bytes:
            raise _too_big(repo, size, max_bytes)
        return Path(snapshot_download(repo, repo_type="dataset", revision=info.sha, local_dir=target))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        if isinstance(exc, OSError) and (stored := _stored(repo, exc)):
            raise stored from None
        raise EvalError(f"eval bundle: cannot download the Hub dataset {repo!r} ({redact(str(exc))}): "
                        "check EVAL_BUNDLE, HF_TOKEN and the network") from None


def _download_zip(url: str, target: Path, max_bytes: int) -> None:
    """Download and unpack next to `target`, then rename into place: a kill leaves no half bundle."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".tmp-") as tmp:
            archive = Path(tmp) / "bundle.zip"
            _fetch(url, archive, max_bytes)
            try:
                with zipfile.ZipFile(archive) as zf:
                    # The sizes the archive declares bound what extraction writes (zipfile reads no further).
                    if (size := sum(info.file_size for info in zf.infolist())) > max_bytes:
                        raise _too_big(url, size, max_bytes)
                    zf.extractall(Path(tmp) / "unpacked")  # zipfile drops absolute and ".." parts of names
            except zipfile.BadZipFile as exc:
                raise EvalError(f"eval bundle: {url} is not a readable zip ({exc}): point EVAL_BUNDLE at "
                                "nanochat's eval_bundle.zip or a folder laid out like it") from None
            found = sorted(p.parent for p in (Path(tmp) / "unpacked").rglob("core.yaml"))
            if not found:
                raise EvalError(f"eval bundle: {url} holds no core.yaml: point EVAL_BUNDLE at nanochat's "
                                "eval_bundle.zip or a folder laid out like it")
            found[0].rename(target)
    except OSError as exc:
        if (stored := _stored(url, exc)) is None:
            raise
        raise stored from None


def _fetch(url: str, archive: Path, max_bytes: int) -> None:
    log.info(kv(event="bundle_download", url=url))
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                if f.tell() > max_bytes:
                    raise _too_big(url, f.tell(), max_bytes)
    except OSError as exc:
        raise _stored(url, exc) or EvalError(
            f"eval bundle: cannot fetch {url} ({exc}): check EVAL_BUNDLE and the network, or point it at a "
            "local folder") from None


# ---------------------------------------------------------------------------------------------------
# The model


def load_latest_engine(base_dir: Path, stage: str, model_tag: str, device_flag: str
                       ) -> tuple[Engine, layout.Checkpoint]:
    """(inference engine, checkpoint) for the newest complete checkpoint of the stage: sha256-verified,
    weights only."""
    from trainer.engine import Engine, pick_device

    directory = layout.stage_dir(base_dir, stage, model_tag)
    ckpt = layout.latest(directory, full_hash=True)
    if ckpt is None:
        what = "base training" if stage == "base" else "SFT"
        raise EvalError(f"no complete {stage} checkpoint in {directory}: run {what} first "
                        "(phoenix run), or phoenix restore to fetch it from the Hub")
    try:
        engine = Engine.from_checkpoint(ckpt, pick_device(device_flag))
    except FileNotFoundError as exc:  # the tokenizer
        raise EvalError(f"{exc}; phoenix restore brings it back from the Hub") from None
    log.info(kv(event="model_loaded", stage=stage, step=ckpt.step, path=ckpt.path, device=engine.device))
    return engine, ckpt


# ---------------------------------------------------------------------------------------------------
# Results


def record_results(base_dir: Path, model_tag: str, stage: str, step: int, results: dict[str, Any]) -> Path:
    """Write the JSON next to the run's other files, and to the run's W&B summary when WANDB_RUN is set."""
    path = results_path(base_dir, model_tag, stage, step)
    layout.write_json_atomic(path, {"model_tag": model_tag, "stage": stage, "step": step,
                                    "time": time.time(), **results})
    wandb_name = os.environ.get("WANDB_RUN", "")
    if wandb_name and wandb_name != "dummy":
        _to_wandb(base_dir, model_tag, wandb_name, stage, results)
    return path


def _to_wandb(base_dir: Path, model_tag: str, name: str, stage: str, results: dict[str, Any]) -> None:
    """Into the summary of the training run's own W&B run (same id), not its step history: the history
    ended with training, and W&B drops values logged at an earlier step."""
    import wandb

    identity = layout.read_run_file(base_dir / "runs" / model_tag / "run.json")
    run_id = identity["wandb_run_id"] if identity else None
    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "phoenix"), name=name, id=run_id,
                     resume="allow", mode=mode, dir=str(base_dir / "logs"))
    run.summary.update(flatten(f"eval/{stage}", results))
    run.finish()


def flatten(prefix: str, value: Any) -> dict[str, float]:
    """{"a": {"b": 1.0}} -> {"prefix/a/b": 1.0}: numbers only, as W&B summaries want them."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flatten(f"{prefix}/{key}", item).items()}
    return {prefix: value} if isinstance(value, int | float) and not isinstance(value, bool) else {}


# ---------------------------------------------------------------------------------------------------
# The commands


def evaluate_base(base_dir: Path, model_tag: str, bundle: str, device: str, max_per_task: int,
                  batch_rows: int, max_bundle_bytes: int = MAX_BUNDLE_BYTES) -> dict[str, Any]:
    from trainer.core_eval import centered, evaluate_task, load_bundle, load_examples

    engine, ckpt = load_latest_engine(base_dir, "base", model_tag, device)  # before a bundle download
    bundle_dir = resolve_bundle(bundle, base_dir, max_bundle_bytes)
    tasks = load_bundle(bundle_dir)
    accuracy, centered_accuracy = {}, {}
    for task in tasks:
        start = time.monotonic()
        data = load_examples(bundle_dir, task, max_per_task)
        accuracy[task.label] = evaluate_task(engine.model, engine.tokenizer, task, data, batch_rows)
        centered_accuracy[task.label] = centered(accuracy[task.label], task.random_baseline)
        log.info(kv(event="eval_task", stage="base", step=ckpt.step, task=task.label, shots=task.num_fewshot,
                    examples=len(data), accuracy=f"{accuracy[task.label]:.4f}",
                    centered=f"{centered_accuracy[task.label]:.4f}",
                    seconds=round(time.monotonic() - start, 2)))
    core = sum(centered_accuracy.values()) / len(centered_accuracy)
    results = {"eval": "core", "core_metric": core, "accuracy": accuracy, "centered": centered_accuracy,
               "max_per_task": max_per_task, "bundle": bundle}
    path = record_results(base_dir, model_tag, "base", ckpt.step, results)
    log.info(kv(event="eval_done", stage="base", step=ckpt.step, core_metric=f"{core:.4f}", path=path))
    return results


def evaluate_chat(base_dir: Path, model_tag: str, task_names: list[str], device: str,
                  max_problems: int | None, batch_size: int, max_new_tokens: int) -> dict[str, Any]:
    from trainer.chat_eval import (
        TASKS,
        categorical_answers,
        chatcore,
        generative_answers,
        is_right,
        load_problems,
    )

    unknown = [name for name in task_names if name not in TASKS]
    if unknown:
        raise EvalError(f"unknown chat task(s) {', '.join(unknown)}: choose from {', '.join(TASKS)}")
    engine, ckpt = load_latest_engine(base_dir, "sft", model_tag, device)
    accuracy = {}
    for name in task_names:
        task, start = TASKS[name], time.monotonic()
        problems = load_problems(task, base_dir / "eval_data", max_problems)
        if task.kind == "categorical":
            answers = categorical_answers(engine, problems, batch_size)
        else:
            answers = generative_answers(engine, problems, batch_size, max_new_tokens)
        accuracy[name] = sum(map(is_right, [task] * len(problems), problems, answers)) / len(problems)
        log.info(kv(event="eval_task", stage="sft", step=ckpt.step, task=name, problems=len(problems),
                    accuracy=f"{accuracy[name]:.4f}", seconds=round(time.monotonic() - start, 2)))
    results = {"eval": "chat", "chatcore": chatcore(accuracy), "accuracy": accuracy,
               "max_problems": max_problems}
    path = record_results(base_dir, model_tag, "sft", ckpt.step, results)
    log.info(kv(event="eval_done", stage="sft", step=ckpt.step, chatcore=f"{results['chatcore']:.4f}",
                path=path))
    return results


def evaluate_finished_stage(base_dir: Path, model_tag: str, stage: str, device: str) -> None:
    """EVAL=1 in `phoenix run`: score a finished stage's final checkpoint unless its results exist (so a
    relaunch after a kill mid-eval evaluates again). A failure is logged: the training run is not lost."""
    from trainer.core_eval import BundleError
    from trainer.data import DataError

    ckpt = layout.latest(layout.stage_dir(base_dir, stage, model_tag))
    if ckpt is None or results_path(base_dir, model_tag, stage, ckpt.step).is_file():
        return
    try:
        if stage == "base":
            bundle = os.environ.get("EVAL_BUNDLE") or DEFAULT_EVAL_BUNDLE
            evaluate_base(base_dir, model_tag, bundle, device, max_per_task=-1, batch_rows=32)
        else:
            evaluate_chat(base_dir, model_tag, DEFAULT_CHAT_TASKS.split(","), device, max_problems=None,
                          batch_size=8, max_new_tokens=512)
    except (EvalError, BundleError, DataError) as exc:
        log.warning(kv(event="eval_failed", stage=stage, step=ckpt.step, error=redact(str(exc)),
                       action=f"run phoenix eval {'base' if stage == 'base' else 'chat'} once fixed"))


def _run(job: Any, model_tag: str) -> None:
    from trainer.data import DataError

    if problem := model_tag_problem(model_tag):  # results go under runs/<tag>/
        fail(problem)
    base_dir = base_dir_from_env()
    setup_logging(base_dir / "logs" / "phoenix_eval.log" if base_dir.is_dir() else None)
    try:
        job(base_dir)
    except EvalError as exc:
        fail(str(exc))
    except DataError as exc:
        click.echo(f"error: {redact(str(exc))}", err=True)
        sys.exit(1)


@click.group("eval")
def eval_command() -> None:
    """Evaluate the newest checkpoint: `base` (CORE) or `chat` (ARC, MMLU, GSM8K)."""


MODEL_TAG_OPTION = click.option("--model-tag", envvar="MODEL_TAG", default="d26-hyperbolic",
                                show_default=True)
DEVICE_OPTION = click.option("--device", envvar="DEVICE", type=click.Choice(["auto", "cuda", "cpu"]),
                             default="auto", show_default=True)


@eval_command.command("base")
@MODEL_TAG_OPTION
@DEVICE_OPTION
@click.option("--bundle", envvar="EVAL_BUNDLE", default=DEFAULT_EVAL_BUNDLE, show_default=True,
              help="The CORE eval bundle: a folder, an http(s) .zip URL, or a Hub dataset repo id.")
@click.option("--max-per-task", type=int, default=-1, show_default=True, help="Examples per task (-1: all).")
@click.option("--batch-rows", type=int, default=32, show_default=True, help="Sequences per forward pass.")
@click.option("--max-bundle-mb", type=float, default=MAX_BUNDLE_BYTES / 1e6, show_default=True,
              help="Refuse a bundle download larger than this, packed or unpacked.")
def eval_base_command(model_tag: str, device: str, bundle: str, max_per_task: int, batch_rows: int,
                      max_bundle_mb: float) -> None:
    """CORE metric of the newest base checkpoint (nanochat's base_eval)."""
    from trainer.core_eval import BundleError

    def job(base_dir: Path) -> None:
        try:
            evaluate_base(base_dir, model_tag, bundle, device, max_per_task, batch_rows,
                          max_bundle_bytes=int(max_bundle_mb * 1e6))
        except BundleError as exc:
            raise EvalError(str(exc)) from None

    _run(job, model_tag)


@eval_command.command("chat")
@MODEL_TAG_OPTION
@DEVICE_OPTION
@click.option("--tasks", default=DEFAULT_CHAT_TASKS, show_default=True, help="Comma-separated task names.")
@click.option("--max-problems", type=int, default=None, help="Problems per task [default: all].")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Problems per forward (choices).")
@click.option("--max-new-tokens", type=int, default=512, show_default=True, help="GSM8K answer length cap.")
def eval_chat_command(model_tag: str, device: str, tasks: str, max_problems: int | None, batch_size: int,
                      max_new_tokens: int) -> None:
    """ARC-Easy/Challenge, MMLU and GSM8K on the newest SFT checkpoint (nanochat's chat_eval)."""
    names = [name.strip() for name in tasks.split(",") if name.strip()]
    _run(lambda base_dir: evaluate_chat(base_dir, model_tag, names, device, max_problems, batch_size,
                                        max_new_tokens), model_tag)
