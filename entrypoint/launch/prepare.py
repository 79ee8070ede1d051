"""A stage's set-up before torchrun, in a process of its own: restore, resume check, tokenizer, data.

`phoenix run` starts `python -m entrypoint.launch.prepare base|sft --preset P [flags]` and can end it at once
on a stop: a checkpoint or dataset download would otherwise hold the stop past Docker's grace period (what
a killed restore downloaded stays staged for the next launch). `base` first restores from the Hub what the
volume lacks. A config that cannot continue the volume's checkpoint, data that cannot be had, a Hub that
cannot serve the run, a full volume: one `error:` line before any GPU process starts, and an exit code
that tells `phoenix run` how the crash-loop guard counts it (EXIT_KINDS).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

from entrypoint.hub.config import HubConfig
from entrypoint.logs import kv, redact
from trainer import checkpoint_layout as layout

log = logging.getLogger("phoenix.run")

EXIT_STAGE, EXIT_VOLUME, EXIT_HUB = 2, 4, 5
# What each failure is to the guard: stage (the checkpoint, the data, the code: a relaunch with the same
# settings is refused), volume and hub (fixed outside the settings: tried again).
EXIT_KINDS = {EXIT_STAGE: "stage", EXIT_VOLUME: "volume", EXIT_HUB: "hub"}
HUB_WAIT_FIRST_S, HUB_WAIT_MAX_S, HUB_WAIT_TICK_S = 5.0, 300.0, 30.0
# Where `phoenix run` wants this child's phase times (restore_s, data_s), for the time-to-recover record.
PHASES_ENV = "PHOENIX_PREPARE_PHASES"

# Errors of the volume rather than of phoenix: what to do about each.
VOLUME_ERRNOS = {errno.ENOSPC: "free space on the volume or grow it",
                 errno.EDQUOT: "free space on the volume or raise the quota",
                 errno.EACCES: "fix the ownership of the volume's folders (chown -R to the container's uid)",
                 errno.EROFS: "mount the volume read-write"}


def volume_error(exc: OSError) -> str | None:
    """One line for a full, read-only or foreign-owned volume; None for any other OSError."""
    if exc.errno not in VOLUME_ERRNOS:
        return None
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{exc.strerror or exc}{where}: {VOLUME_ERRNOS[exc.errno]}"


def volume_has_checkpoint(base_dir: Path, model_tag: str) -> bool:
    return any(layout.latest(layout.stage_dir(base_dir, stage, model_tag)) for stage in layout.STAGES)


def restore_or_wait(cfg: HubConfig, argv: list[str]) -> None:
    """Restore from the Hub what the volume lacks. With nothing on the volume to resume, a Hub that cannot be
    asked (or cannot serve now) is waited for, with backoff: starting over from step 0 would later publish a
    new run over the Hub's. A Hub that lists a stage but serves no intact checkpoint of it is an error
    (`restore.Unservable`) unless the stage may start over (--allow-fresh-start, in SFT_ARGS for sft)."""
    from entrypoint.hub.errors import HubError, HubFatal
    from entrypoint.hub.restore import Unservable, restore

    if cfg.repo_id is None:
        return  # (phoenix run says so)
    sft_args = shlex.split(os.environ.get("SFT_ARGS", ""))
    fresh = ["base"] if "--allow-fresh-start" in argv else []
    if "--allow-fresh-start" in sft_args or os.environ.get("RUN_SFT") == "0":
        fresh.append("sft")  # an SFT stage this launch does not run is no fresh start either
    wait = HUB_WAIT_FIRST_S
    while True:
        try:
            restore(cfg, fresh_start_ok=fresh)
            return
        except (HubFatal, Unservable):
            raise
        except HubError as exc:
            if volume_has_checkpoint(cfg.base_dir, cfg.model_tag):
                log.warning("Hub unreachable for restore (%s): continuing from the volume", redact(str(exc)))
                return
            error = redact(str(exc))
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            log.warning(kv(event="hub_wait", retry_in_s=round(left), error=error,
                           reason="the volume has nothing to resume and the Hub may hold the run: waiting "
                                  "for it rather than starting over"))
            time.sleep(min(left, HUB_WAIT_TICK_S))
        wait = min(2 * wait, HUB_WAIT_MAX_S)


def run_step(step: Callable[[], None], expected: dict[type[Exception], int], where: str = "") -> int:
    """Run one set-up step: 0 if it went well; an `expected` failure, or a full or read-only volume, is one
    `error:` line and the exit code its kind maps to."""
    try:
        step()
    except tuple(expected) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return next(code for kind, code in expected.items() if isinstance(exc, kind))
    except OSError as exc:
        if (line := volume_error(exc)) is None:
            raise
        print(f"error: {where}{line}", file=sys.stderr)
        return EXIT_VOLUME
    return 0


def prepare_base(argv: list[str]) -> None:
    from trainer.tokenizer import TOKENIZER_FILE, tokenizer_sha256
    from trainer.train import check_resume, parse_config, prepare_data

    cfg = parse_config(argv)
    base_dir = Path(cfg.base_dir)
    ckpt = layout.latest(layout.stage_dir(base_dir, "base", cfg.model_tag))
    if ckpt is not None and not ckpt.done:
        has_tokenizer = (base_dir / "tokenizer" / TOKENIZER_FILE).is_file()
        check_resume(cfg, ckpt, tokenizer_sha256(base_dir / "tokenizer") if has_tokenizer else None)
    prepare_data(cfg)


def prepare_sft(argv: list[str]) -> None:
    from trainer.sft import parse_sft_config, prepare_sft_data

    prepare_sft_data(parse_sft_config(argv))


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s",
                        stream=sys.stdout)
    for chatty in ("httpx", "httpx2", "huggingface_hub", "datasets", "filelock"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    stage, args = argv[0], argv[1:]
    phases = {"restore_s": 0.0, "data_s": 0.0}
    started = time.monotonic()
    try:
        if stage == "base":
            from entrypoint.hub.errors import HubError  # settings the Hub refuses, a stage it cannot serve

            cfg = HubConfig.from_env()
            code = run_step(lambda: restore_or_wait(cfg, args), {HubError: EXIT_HUB},
                            f"restoring from the Hub into {cfg.base_dir}: ")
            phases["restore_s"], started = time.monotonic() - started, time.monotonic()
            if code:
                return code
            ckpt = layout.latest(layout.stage_dir(cfg.base_dir, "base", cfg.model_tag))
            if ckpt is not None and ckpt.done:
                return 0  # nothing to prepare, and no reason to import torch
        from trainer.data import DataError
        from trainer.runtime import ConfigError

        code = run_step(lambda: (prepare_base if stage == "base" else prepare_sft)(args),
                        {ConfigError: EXIT_STAGE, DataError: EXIT_STAGE})
        phases["data_s"] = time.monotonic() - started
        return code
    finally:
        if path := os.environ.get(PHASES_ENV):
            Path(path).write_text(json.dumps(phases))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
