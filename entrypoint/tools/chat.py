"""`phoenix chat`: talk to the trained model in the terminal, streaming; a base model completes text instead.

Which model: `--from owner/name` loads an export (phoenix export); otherwise the newest complete SFT
checkpoint of MODEL_TAG on the volume, else its base checkpoint; with neither on the volume, the newest
one on the Hub repo HF_REPO_ID, fetching only its weights (see restore.fetch_weights).
Interactive by default (multi-turn: the whole conversation is the prompt, rendered as SFT rendered it;
`/clear` starts over, `/quit` or Ctrl-D ends); `-p "..."` answers one message and exits. The answer goes
to stdout; what was loaded goes to stderr.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from typing import Any, TextIO

import click

from entrypoint.hub.config import HubConfig
from entrypoint.hub.errors import HubError
from entrypoint.hub.restore import fetch_weights
from entrypoint.logs import RedactingFormatter, fail
from entrypoint.tools.export import ExportError, download_export, load_export
from trainer import checkpoint_layout as layout


class NothingToLoad(Exception):
    """No model anywhere we may look: one line for the user."""


@dataclass
class Loaded:
    engine: Any  # trainer.engine.Engine (torch is imported only once we know there is a model)
    chat: bool  # an SFT model chats; a base model completes text
    origin: str  # what was loaded, for the user


def load(cfg: HubConfig, from_repo: str | None, device_name: str) -> Loaded:
    if from_repo:
        folder = download_export(cfg, from_repo)
        engine, origin = load_export(folder, _device(device_name))
        return Loaded(engine, origin["stage"] == "sft",
                      f"{origin['stage']} step {origin['step']} of {origin['model_tag']} from {from_repo}")
    for stage in reversed(layout.STAGES):  # the finished product first: SFT, then base
        ckpt = layout.latest(layout.stage_dir(cfg.base_dir, stage, cfg.model_tag))
        if ckpt is not None:
            from trainer.engine import Engine

            return Loaded(Engine.from_checkpoint(ckpt, _device(device_name)), stage == "sft",
                          f"{stage} step {ckpt.step} of {cfg.model_tag} from {ckpt.path}")
    fetched = fetch_weights(cfg) if cfg.repo_id else None
    if fetched is None:
        where = f"nor on the Hub repo {cfg.repo_id}" if cfg.repo_id else "and HF_REPO_ID is not set"
        raise NothingToLoad(f"no checkpoint of MODEL_TAG={cfg.model_tag} in {cfg.base_dir} {where}: "
                            "train one (phoenix run), set MODEL_TAG to a trained run, or pass --from "
                            "owner/name")
    from trainer.engine import Engine

    stage, folder = fetched
    step = layout.read_manifest(folder)["step"]  # the files were sha256-checked when fetched
    config = json.loads((folder / layout.META_NAME).read_text())["model_config"]
    engine = Engine.from_files(folder / "model.safetensors", config, cfg.base_dir / "tokenizer",
                               _device(device_name))
    return Loaded(engine, stage == "sft", f"{stage} step {step} of {cfg.model_tag} from {cfg.repo_id}")


def _device(name: str) -> Any:
    from trainer.engine import pick_device  # torch loads only once there is a model to run

    return pick_device(name)


def reply(engine: Any, prompt: list[int], out: TextIO, max_tokens: int, temperature: float,
          top_k: int | None, seed: int) -> str:
    """Generate and print the answer as it comes; returns its text."""
    ids: list[int] = []
    shown = ""
    for tokens in engine.stream([prompt], max_tokens, temperature, top_k, seed):
        if tokens[0] is None:
            break
        ids.append(tokens[0])
        text = engine.decode(ids)
        if not text.endswith("\ufffd"):  # hold back half of a multi-byte character
            out.write(text[len(shown):])
            out.flush()
            shown = text
    text = engine.decode(ids)
    out.write(text[len(shown):] + "\n")
    out.flush()
    return text


def fit(engine: Any, messages: list[dict[str, str]], max_tokens: int) -> list[int]:
    """The conversation's prompt, dropping the oldest exchanges until it leaves room for the answer."""
    while True:
        prompt = engine.chat_prompt(messages)
        if len(prompt) + max_tokens <= engine.max_len or len(messages) == 1:
            return prompt
        messages[:] = messages[2:]


def converse(loaded: Loaded, first: str | None, inp: TextIO, out: TextIO, **sampling: Any) -> None:
    engine = loaded.engine
    messages: list[dict[str, str]] = []
    turn = 0
    while True:
        if first is not None:
            text = first
        else:
            out.write("you> " if loaded.chat else "text> ")
            out.flush()
            line = inp.readline()
            if not line or line.strip() == "/quit":
                out.write("\n" if not line else "")  # Ctrl-D leaves the cursor after the prompt
                return
            text = line.rstrip("\n")
            if text.strip() == "/clear":
                messages.clear()
                continue
            if not text.strip():
                continue
        if loaded.chat:
            messages.append({"role": "user", "content": text})
            prompt = fit(engine, messages, sampling["max_tokens"])
        else:
            prompt = engine.text_prompt(text)
        if first is None:
            out.write("model> " if loaded.chat else text)
        try:
            answer = reply(engine, prompt, out, seed=sampling["seed"] + turn,
                           **{k: v for k, v in sampling.items() if k != "seed"})
        except ValueError as exc:  # a message longer than the model's context
            if first is not None:
                raise
            print(f"error: {exc}", file=sys.stderr)
            messages.clear()
            continue
        turn += 1
        if loaded.chat:
            messages.append({"role": "assistant", "content": answer})
        if first is not None:
            return


@click.command("chat")
@click.option("-p", "--prompt", help="one message: print the answer and exit")
@click.option("--from", "from_repo", metavar="OWNER/NAME", help="a model repo written by phoenix export")
@click.option("--temperature", default=0.6, show_default=True, help="0 = greedy (deterministic)")
@click.option("--top-k", default=50, show_default=True, help="sample among the k likeliest tokens; 0 = all")
@click.option("--max-tokens", default=512, show_default=True, help="longest answer, in tokens")
@click.option("--seed", default=0, show_default=True, help="sampling seed: the same seed, the same answers")
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]), show_default=True)
def chat_command(prompt: str | None, from_repo: str | None, temperature: float, top_k: int,
                 max_tokens: int, seed: int, device: str) -> None:
    """Talk to the model of MODEL_TAG (newest SFT checkpoint, else base; volume, else Hub) or an export."""
    for flag, value, least in (("--max-tokens", max_tokens, 1), ("--temperature", temperature, 0),
                               ("--top-k", top_k, 0)):
        if value < least:
            fail(f"{flag} {value} is below {least}: give {flag} {least} or more")
    cfg = HubConfig.from_env_or_exit()
    handler = logging.StreamHandler(sys.stderr)  # stdout is the conversation
    handler.setFormatter(RedactingFormatter("%(message)s"))
    logger = logging.getLogger("phoenix")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    try:
        loaded = load(cfg, from_repo, device)
    except (NothingToLoad, ExportError, HubError) as exc:
        fail(str(exc))
    print(f"model: {loaded.origin} ({'chat' if loaded.chat else 'base model: completes text'})",
          file=sys.stderr)
    try:
        converse(loaded, prompt, sys.stdin, sys.stdout, max_tokens=max_tokens, temperature=temperature,
                 top_k=top_k or None, seed=seed)
    except ValueError as exc:  # a message longer than the model's context
        fail(str(exc))
    except KeyboardInterrupt:
        print(file=sys.stderr)
