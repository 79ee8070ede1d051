"""Checkpoint writer and reader for the training loop: snapshot to host memory, write in the background.

The training thread only copies state to host memory (pinned buffers on CUDA, reused between saves)
and goes on; a background thread serializes to safetensors/JSON, fsyncs and publishes through the
contract in `checkpoint_layout`. At most one save is in flight: the next one waits for it. A failed
write (full disk, I/O error) is remembered and surfaces at the next `poll()`, so training stops
rather than running on without checkpoints.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from trainer import checkpoint_layout as layout

log = logging.getLogger("phoenix.checkpoint")

TensorFiles = dict[str, dict[str, torch.Tensor]]  # file name -> tensors it holds


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed; the previously published checkpoints are untouched."""


class AsyncCheckpointer:
    def __init__(self, directory: Path, keep_last: int, **manifest_fields: Any) -> None:
        self.directory = directory
        self.keep_last = keep_last
        self.manifest_fields = manifest_fields
        self._pinned: dict[str, torch.Tensor] = {}
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_published: int | None = None

    def _snapshot(self, files: TensorFiles) -> tuple[TensorFiles, torch.cuda.Event | None]:
        snapshot: TensorFiles = {}
        uses_cuda = False
        for file_name, tensors in files.items():
            snapshot[file_name] = {}
            for name, tensor in tensors.items():
                tensor = tensor.detach()
                if tensor.device.type == "cuda":
                    uses_cuda = True
                    key = f"{file_name}/{name}"
                    buffer = self._pinned.get(key)
                    if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
                        buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                        self._pinned[key] = buffer
                    buffer.copy_(tensor, non_blocking=True)
                else:
                    buffer = torch.empty_like(tensor, memory_format=torch.contiguous_format).copy_(tensor)
                snapshot[file_name][name] = buffer
        event = None
        if uses_cuda:
            event = torch.cuda.Event()
            event.record()
        return snapshot, event

    def save(self, step: int, files: TensorFiles, meta: dict[str, Any], done: bool = False) -> float:
        """Start saving `step`; returns the seconds the training thread was held (the stall)."""
        start = time.perf_counter()
        self.wait()
        snapshot, event = self._snapshot(files)
        self._thread = threading.Thread(target=self._write, args=(step, snapshot, event, meta, done),
                                        name=f"checkpoint-{step}", daemon=False)
        self._thread.start()
        return time.perf_counter() - start

    def _write(self, step: int, snapshot: TensorFiles, event: torch.cuda.Event | None,
               meta: dict[str, Any], done: bool) -> None:
        tmp = None
        started = time.perf_counter()
        try:
            if event is not None:
                event.synchronize()
            needed = sum(t.numel() * t.element_size() for ts in snapshot.values() for t in ts.values())
            self.directory.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(self.directory).free
            if free < needed * 1.05:
                raise OSError(errno.ENOSPC, f"needs {needed / 2**20:.0f} MiB, {free / 2**20:.0f} MiB free")
            tmp = layout.new_tmp_dir(self.directory, step)
            for file_name, tensors in snapshot.items():
                save_file(tensors, str(tmp / file_name))
            (tmp / layout.META_NAME).write_text(json.dumps(meta, indent=1, sort_keys=True))
            ckpt = layout.publish(tmp, step, done=done, **self.manifest_fields)
            tmp = None
            removed = layout.prune(self.directory, self.keep_last)
            self.last_published = step
            log.info("checkpoint published step=%d bytes=%d write_s=%.2f path=%s pruned=%d", step,
                     ckpt.total_bytes, time.perf_counter() - started, ckpt.path, len(removed))
        except BaseException as exc:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                exc = CheckpointWriteError(
                    f"disk full writing checkpoint step {step} to {self.directory} ({exc.strerror}): free "
                    "space on the volume or lower KEEP_LAST; earlier checkpoints are intact")
            self._error = exc

    def poll(self) -> None:
        """Raise the error of a finished background write, if any (cheap; call every step)."""
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, CheckpointWriteError):
                raise error
            raise CheckpointWriteError(f"writing a checkpoint failed: {error!r}") from error

    @property
    def failed(self) -> bool:
        return self._error is not None

    def wait(self) -> None:
        """Block until the save in flight is published; raise if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.poll()


def load_tensors(ckpt: layout.Checkpoint, file_name: str, keys: list[str] | None = None
                 ) -> dict[str, torch.Tensor]:
    """Tensors of one file of a verified checkpoint (all, or just `keys`), on the CPU; safetensors
    never runs code."""
    if keys is None:
        return load_file(str(ckpt.path / file_name), device="cpu")
    with safe_open(str(ckpt.path / file_name), framework="pt", device="cpu") as f:
        return {key: f.get_tensor(key) for key in keys}


def tensor_names(ckpt: layout.Checkpoint, file_name: str) -> list[str]:
    """The keys one file of a checkpoint holds, read from its header alone."""
    with safe_open(str(ckpt.path / file_name), framework="pt", device="cpu") as f:
        return list(f.keys())
