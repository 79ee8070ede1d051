"""`phoenix export`: publish the final model as a Hub model repo (bf16 safetensors, config, tokenizer, card).

The repo is separate from the checkpoint store (HF_REPO_ID): it holds one model, not a training run, and
is what you share. Everything goes up in ONE commit, so the repo shows the whole model or the previous
one. `phoenix chat --from owner/name` downloads it back (`download_export`) and loads it (`load_export`).

Layout: model.safetensors (the weights in bfloat16, named as in the checkpoints), config.json (the model
config, plus where it came from under "phoenix"), tokenizer.json, README.md (the run's figures: steps,
tokens, validation bpb / loss, device hours, and every eval result found under runs/<tag>/eval/*.json).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from entrypoint.hub.client import Hub, add_operation
from entrypoint.hub.config import HubConfig
from entrypoint.hub.errors import HubError, HubFatal
from entrypoint.logs import fail, kv, setup_logging
from trainer import checkpoint_layout as layout

log = logging.getLogger("phoenix.export")

EXPORT_FILES = ("model.safetensors", "config.json", "tokenizer.json", "README.md")
MODEL_TYPE = "phoenix-nanochat-gpt"
EXPORTED_DIR = "exported"  # where `phoenix chat --from` keeps downloaded exports, under NANOCHAT_BASE_DIR
BOOKKEEPING = {"step", "time"}  # numbers in eval files that are not scores


class ExportError(Exception):
    """Nothing (valid) to export or to load: one line for the user."""


def final_checkpoint(base_dir: Path, model_tag: str) -> tuple[str, layout.Checkpoint]:
    """The newest complete SFT checkpoint, else base: (stage, checkpoint), sha256-verified."""
    for stage in reversed(layout.STAGES):
        ckpt = layout.latest(layout.stage_dir(base_dir, stage, model_tag), full_hash=True)
        if ckpt is not None:
            return stage, ckpt
    raise ExportError(f"no complete checkpoint of MODEL_TAG={model_tag} in {base_dir}: train first "
                      "(phoenix run) or restore one (phoenix restore)")


# ---------------------------------------------------------------------------------------------- the card


def run_figures(base_dir: Path, model_tag: str, stage: str, meta: dict[str, Any]) -> dict[str, Any]:
    """What the volume knows about the run that made this checkpoint, as label -> value."""
    figures: dict[str, Any] = {}
    base = meta if stage == "base" else _meta_of(layout.latest(layout.stage_dir(base_dir, "base",
                                                                                  model_tag)))
    if base is not None:
        figures["base steps"] = base["step"]
        figures["base tokens"] = f"{base['step'] * base['total_batch_size']:,}"
        if base["loop_state"].get("min_val_bpb", float("inf")) < float("inf"):
            figures["base val bpb (best)"] = round(base["loop_state"]["min_val_bpb"], 4)
        figures["base device hours"] = round(base["loop_state"]["train_time"] * base["world_size"] / 3600, 3)
    if stage == "sft":
        figures["sft steps"] = meta["step"]
        # Packed SFT records how many conversations went into rows; before packing a step took a fixed count.
        conversations = (meta["conversations"] if "conversations" in meta
                         else meta["step"] * meta["config"]["conversations_per_step"])
        figures["sft conversations"] = f"{conversations:,}"
        figures["sft dataset"] = meta["data"]["dataset"]
        if meta["loop_state"].get("min_val_loss", float("inf")) < float("inf"):
            figures["sft val loss (best)"] = round(meta["loop_state"]["min_val_loss"], 4)
        figures["sft device hours"] = round(meta["loop_state"]["train_time"] * meta["world_size"] / 3600, 3)
    return figures


def _meta_of(ckpt: layout.Checkpoint | None) -> dict[str, Any] | None:
    return ckpt.meta() if ckpt is not None else None


def eval_scores(base_dir: Path, model_tag: str) -> dict[str, float]:
    """Every number in runs/<tag>/eval/*.json, keyed `file.key.subkey`: read generically, whoever wrote it."""
    scores: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                if key not in BOOKKEEPING:
                    walk(f"{prefix}.{key}", inner)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            scores[prefix] = value

    for path in sorted((base_dir / "runs" / model_tag / "eval").glob("*.json")):
        try:
            walk(path.stem, json.loads(path.read_text()))
        except ValueError:
            log.warning(kv(event="eval_file_unreadable", path=path))
    return scores


def model_card(repo: str, model_tag: str, stage: str, step: int, config: dict[str, Any],
               figures: dict[str, Any], scores: dict[str, float]) -> str:
    kind = "chat model (base pretraining + SFT)" if stage == "sft" else "base model (pretraining only)"
    lines = ["---", "library_name: phoenix", "tags: [nanochat, phoenix]", "---", "",
             f"# {model_tag}", "",
             f"A nanochat-style GPT {kind}, trained with phoenix; exported from the {stage} checkpoint of "
             f"step {step}. Weights in bfloat16.", "",
             "| architecture | |", "| --- | --- |",
             *(f"| {k} | {config[k]} |" for k in ("n_layer", "n_embd", "n_head", "n_kv_head", "vocab_size",
                                                  "sequence_len")), ""]
    if figures:
        lines += ["| training | |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in figures.items()), ""]
    if scores:
        lines += ["| evaluation | score |", "| --- | --- |",
                  *(f"| {k} | {v:.4g} |" for k, v in scores.items()), ""]
    usage = "chat with it" if stage == "sft" else "complete text with it"
    lines += [f"To {usage}: `phoenix chat --from {repo}`.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- export


def build_export(base_dir: Path, model_tag: str, repo: str, out_dir: Path) -> tuple[str, int]:
    """Write the four files of the export into out_dir; returns (stage, step) of the checkpoint used."""
    import torch
    from safetensors.torch import save_file

    from trainer.checkpoint import load_tensors

    stage, ckpt = final_checkpoint(base_dir, model_tag)
    meta = ckpt.meta()
    tokenizer = base_dir / "tokenizer" / "tokenizer.json"
    if not tokenizer.is_file():
        raise ExportError(f"no tokenizer at {tokenizer}: restore it with phoenix restore")
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    weights = {name: tensor.to(torch.bfloat16).contiguous()
               for name, tensor in load_tensors(ckpt, "model.safetensors").items()}
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = {"model_type": MODEL_TYPE, **meta["model_config"], "torch_dtype": "bfloat16",
              "phoenix": {"stage": stage, "step": ckpt.step, "model_tag": model_tag,
                          "run_id": meta.get("run_id")}}
    (out_dir / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    shutil.copyfile(tokenizer, out_dir / "tokenizer.json")
    card = model_card(repo, model_tag, stage, ckpt.step, meta["model_config"],
                      run_figures(base_dir, model_tag, stage, meta), eval_scores(base_dir, model_tag))
    (out_dir / "README.md").write_text(card)
    return stage, ckpt.step


def export(cfg: HubConfig, repo: str, private: bool) -> str:
    """Build the export on the volume and push it to `repo` in one commit; returns the commit id."""
    out_dir = cfg.base_dir / "export" / cfg.model_tag
    stage, step = build_export(cfg.base_dir, cfg.model_tag, repo, out_dir)
    hub = Hub(replace(cfg, repo_id=repo, repo_type="model", private=private))
    hub.ensure_repo()
    operations = [add_operation(name, out_dir / name) for name in EXPORT_FILES]
    commit = hub.commit(operations, f"{cfg.model_tag}: {stage} step {step}", parent=hub.head())
    size = sum((out_dir / name).stat().st_size for name in EXPORT_FILES)
    log.info(kv(event="export_done", repo=repo, stage=stage, step=step, bytes=size, commit=commit,
                private=private))
    return commit


# ---------------------------------------------------------------------------------------------- loading


def download_export(cfg: HubConfig, repo: str) -> Path:
    """The export at the repo's head in $NANOCHAT_BASE_DIR/exported/<owner>/<name>/, sha256-checked."""
    from huggingface_hub import snapshot_download

    hub = Hub(replace(cfg, repo_id=repo, repo_type="model"))
    try:
        snapshot = hub.snapshot()
    except HubFatal:
        if cfg.token:
            raise
        # Reading an export needs no write token: a public one needs none, a private one a read token.
        raise ExportError(f"{repo} is private or does not exist, and HF_TOKEN is not set: set HF_TOKEN to a "
                          "token that can read it (a read token will do), or check the name") from None
    missing = [name for name in EXPORT_FILES if name not in snapshot.files]
    if missing:
        raise ExportError(f"{repo} is not a phoenix export (no {', '.join(missing)}): pass a repo written "
                          "by phoenix export")
    local = cfg.base_dir / EXPORTED_DIR / repo
    hub.call(f"download {repo}", lambda: snapshot_download(
        repo, revision=snapshot.head, local_dir=local, endpoint=cfg.endpoint, token=cfg.token,
        allow_patterns=list(EXPORT_FILES)))
    for name in EXPORT_FILES:
        remote = snapshot.files[name]
        if remote.lfs is not None and layout.sha256_file(local / name) != remote.lfs.sha256:
            raise ExportError(f"{local / name}: sha256 does not match the Hub's: delete {local} and retry")
    return local


def load_export(folder: Path, device: Any) -> tuple[Any, dict[str, Any]]:
    """(Engine, the config's "phoenix" section) of a downloaded export."""
    from trainer.engine import Engine

    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") != MODEL_TYPE:
        raise ExportError(f"{folder / 'config.json'} is not a phoenix export (model_type "
                          f"{config.get('model_type')!r})")
    return Engine.from_files(folder / "model.safetensors", config, folder, device), config["phoenix"]


@click.command("export")
@click.option("--repo", required=True, metavar="OWNER/NAME",
              help="the Hub model repo to publish to (not the checkpoint store HF_REPO_ID)")
@click.option("--public", is_flag=True, help="create the repo public (default: private)")
def export_command(repo: str, public: bool) -> None:
    """Publish the final model of MODEL_TAG (newest SFT checkpoint, else base) to a Hub model repo."""
    cfg = HubConfig.from_env_or_exit()
    setup_logging(cfg.base_dir / "logs" / "export.log")
    valid = repo.count("/") == 1
    try:
        validate_repo_id(repo)
    except HFValidationError:
        valid = False
    if not valid:
        fail(f"--repo {repo!r} is not a repo id: give it as owner/name")
    if repo == cfg.repo_id:
        fail(f"--repo {repo} is the checkpoint store HF_REPO_ID: export to a repo of its own")
    try:
        export(cfg, repo, private=not public)
    except (ExportError, HubError) as exc:
        fail(str(exc))
