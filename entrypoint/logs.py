"""Logging for the CLI and the sidecar: one `kv` line per event, to stdout and the volume, secrets masked."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import traceback
from pathlib import Path
from types import TracebackType
from typing import Any

SECRET_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY")
# Tokens can reach a message without passing through the environment (an exception echoing a header).
_TOKEN_PATTERN = re.compile(r"\bhf_[A-Za-z0-9]{8,}")
_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def redact(text: str) -> str:
    """Mask every secret we know of in `text`; used on log records and on error messages we print."""
    for var in SECRET_ENV_VARS:
        value = os.environ.get(var)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return _TOKEN_PATTERN.sub("hf_***", text)


def kv(**fields: Any) -> str:
    """One log line in key=value style; values with spaces or quotes are JSON-quoted."""
    parts = []
    for key, value in fields.items():
        text = f"{value:.1f}" if isinstance(value, float) else str(value)
        if not text or any(c in text for c in ' "=\n'):
            text = json.dumps(text)
        parts.append(f"{key}={text}")
    return " ".join(parts)


class RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def setup_logging(log_file: Path | None = None, level: int = logging.INFO) -> logging.Logger:
    """Configure the `phoenix` logger once: stdout for `docker compose logs`, plus `log_file` if given."""
    logger = logging.getLogger("phoenix")
    logger.setLevel(level)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    formatter = RedactingFormatter(_FORMAT, datefmt="%Y-%m-%dT%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    sys.excepthook = _print_redacted  # an uncaught error's message may quote a token (a URL, a header)
    threading.excepthook = lambda args: _print_redacted(args.exc_type, args.exc_value, args.exc_traceback)
    return logger


def setup_hub_logging(log_file: Path) -> logging.Logger:
    """phoenix logging (stdout + `log_file`, secrets masked) that also carries huggingface_hub's warnings."""
    from huggingface_hub.utils import disable_progress_bars

    logger = setup_logging(log_file)
    library = logging.getLogger("huggingface_hub")
    for handler in list(library.handlers):
        library.removeHandler(handler)
    for handler in logger.handlers:
        library.addHandler(handler)
    library.setLevel(logging.WARNING)
    library.propagate = False
    disable_progress_bars()  # tqdm bars are noise in `docker compose logs`; we log MB/s per checkpoint
    return logger


def _print_redacted(exc_type: type[BaseException], exc: BaseException | None,
                    tb: TracebackType | None) -> None:
    sys.stderr.write(redact("".join(traceback.format_exception(exc_type, exc, tb))))
