"""Logging for the CLI and the sidecar: one `kv` line per event, to stdout and the volume (a log file that
never raises), secrets masked; the one `error:` line of a fault the user fixes; reading the volume's small
JSON files back, torn or not."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
import traceback
from contextlib import suppress
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn, TextIO

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


def fail(message: str) -> NoReturn:
    """A fault the user fixes: one `error: <what is wrong>: <what to do>` line on stderr, exit code 2."""
    print(f"error: {redact(message)}", file=sys.stderr)
    sys.exit(2)


def kv(**fields: Any) -> str:
    """One log line in key=value style; values with spaces or quotes are JSON-quoted."""
    parts = []
    for key, value in fields.items():
        text = f"{value:.1f}" if isinstance(value, float) else str(value)
        if not text or any(c in text for c in ' "=\n'):
            text = json.dumps(text)
        parts.append(f"{key}={text}")
    return " ".join(parts)


class LogFile:
    """An append-only log file on the volume that never raises. A failed write (a full disk, EFBIG, EIO)
    drops the file, says so once on stdout, and the file is tried again RETRY_S later: whoever writes here
    (the relay of the workers' output above all) goes on, since losing the log must not stop training."""

    RETRY_S = 60.0

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: TextIO | None = None
        self._retry_at = 0.0
        self._failing = False  # no write has landed since the last failure
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        with self._lock:
            news = self._write(text)
        if news is not None:  # outside the lock: the logger's own handler writes to this file too
            level, message = news
            logging.getLogger("phoenix.logs").log(level, message)

    def _write(self, text: str) -> tuple[int, str] | None:
        if self._file is None:
            if time.monotonic() < self._retry_at:
                return None
            try:
                self.path.parent.mkdir(exist_ok=True)  # logs/ on the volume, never the volume itself
                self._file = open(self.path, "a")  # noqa: SIM115 - kept open; closed when it fails
            except OSError as exc:
                return self._failed(exc)
        try:
            self._file.write(text)
            self._file.flush()
        except OSError as exc:
            return self._failed(exc)
        if self._failing:
            self._failing = False
            return logging.INFO, kv(event="log_file_resumed", path=self.path)
        return None

    def _failed(self, exc: OSError) -> tuple[int, str] | None:
        if self._file is not None:
            with suppress(OSError):  # closing flushes what is buffered: it may fail the same way
                self._file.close()
            self._file = None
        self._retry_at = time.monotonic() + self.RETRY_S
        if self._failing:
            return None
        self._failing = True
        return logging.WARNING, kv(event="log_file_failed", path=self.path, error=exc.strerror or str(exc),
                                   action=f"logging to stdout only; trying the file again every "
                                          f"{self.RETRY_S:.0f}s")


_LOG_FILES: dict[Path, LogFile] = {}


def log_file(path: Path) -> LogFile:
    """The one LogFile of `path` in this process: the logger and the workers' relay share it (and its
    warning)."""
    return _LOG_FILES.setdefault(path, LogFile(path))


class _LogFileHandler(logging.Handler):
    def __init__(self, sink: LogFile) -> None:
        super().__init__()
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # a bad format string: logging's own error to report
            self.handleError(record)
            return
        self.sink.write(line + "\n")


class RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def setup_logging(file: Path | None = None, level: int = logging.INFO) -> logging.Logger:
    """Configure the `phoenix` logger once: stdout for `docker compose logs`, plus `file` if given and its
    volume is there (a LogFile: its failures never reach the caller)."""
    logger = logging.getLogger("phoenix")
    logger.setLevel(level)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    formatter = RedactingFormatter(_FORMAT, datefmt="%Y-%m-%dT%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    # `file` is <volume>/logs/<name>: a volume that is not there (not mounted yet) gets no log file, and
    # is never created here (a folder on an unmounted path would pass the next preflight).
    if file is not None and file.parent.parent.is_dir():
        handlers.append(_LogFileHandler(log_file(file)))
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    sys.excepthook = _print_redacted  # an uncaught error's message may quote a token (a URL, a header)
    threading.excepthook = lambda args: _print_redacted(args.exc_type, args.exc_value, args.exc_traceback)
    return logger


def setup_hub_logging(file: Path) -> logging.Logger:
    """phoenix logging (stdout + `file`, secrets masked) that also carries huggingface_hub's warnings."""
    from huggingface_hub.utils import disable_progress_bars

    logger = setup_logging(file)
    library = logging.getLogger("huggingface_hub")
    for handler in list(library.handlers):
        library.removeHandler(handler)
    for handler in logger.handlers:
        library.addHandler(handler)
    library.setLevel(logging.WARNING)
    library.propagate = False
    disable_progress_bars()  # tqdm bars are noise in `docker compose logs`; we log MB/s per checkpoint
    return logger


def read_json(path: Path) -> dict[str, Any] | None:
    """A small JSON object on the volume, or None when it is absent, torn or not an object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_step_record(record: dict[str, Any]) -> bool:
    """A training step as trainer.runtime.StepReporter logs it: step, loss, dt and tok/s, all numbers."""
    numbers = ("loss", "dt", "tok_per_sec")
    return type(record.get("step")) is int and all(is_number(record.get(name)) for name in numbers)


def _print_redacted(exc_type: type[BaseException], exc: BaseException | None,
                    tb: TracebackType | None) -> None:
    sys.stderr.write(redact("".join(traceback.format_exception(exc_type, exc, tb))))
