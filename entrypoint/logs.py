"""Logging for the CLI and the sidecar: one line per event, to stdout and the volume, secrets masked."""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import traceback
from pathlib import Path
from types import TracebackType

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


def _print_redacted(exc_type: type[BaseException], exc: BaseException | None,
                    tb: TracebackType | None) -> None:
    sys.stderr.write(redact("".join(traceback.format_exception(exc_type, exc, tb))))
