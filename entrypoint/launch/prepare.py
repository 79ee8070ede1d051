"""A stage's set-up before torchrun, in a process of its own: resume check, tokenizer, data download.

`phoenix run` starts `python -m entrypoint.launch.prepare base|sft --preset P [flags]` and can end it at once
on a stop (a dataset download would otherwise hold the stop past Docker's grace period). A config that
cannot continue the volume's checkpoint, or data that cannot be had, is one `error:` line and exit 2,
before any GPU process starts.
"""

from __future__ import annotations

import errno
import logging
import sys
from pathlib import Path

from trainer import checkpoint_layout as layout

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
    from trainer.data import DataError
    from trainer.runtime import ConfigError

    stage, args = argv[0], argv[1:]
    try:
        (prepare_base if stage == "base" else prepare_sft)(args)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if (line := volume_error(exc)) is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
