"""Checkpoint writer and reader for the training loop: snapshot to host memory, write in the background.

The training thread only copies state to host memory (pinned buffers on CUDA, reused between saves)
and goes on; a background thread serializes to safetensors/JSON (hashing each file as it writes it),
fsyncs and publishes through the contract in `checkpoint_layout`. With several processes each writes its
own files (its optimizer share) into one temporary directory at the same time; their writer threads
meet over a gloo group of their own, and rank 0 publishes once every rank's files are written, fsynced
and hashed. At most one save is in flight: the next one waits for it. A failed write (full disk, I/O
error) on any rank is remembered and surfaces at the next `poll()`, so training stops rather than
running on without checkpoints.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file

from trainer import checkpoint_layout as layout
from trainer.distributed import Dist

log = logging.getLogger("phoenix.checkpoint")

TensorFiles = dict[str, dict[str, torch.Tensor]]  # file name -> tensors it holds


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed; the previously published checkpoints are untouched."""


class AsyncCheckpointer:
    def __init__(self, directory: Path, keep_last: int, d: Dist | None = None, **manifest_fields: Any
                 ) -> None:
        """d: this process among the ranks that save together (None: a single process)."""
        self.directory = directory
        self.keep_last = keep_last
        self.rank, self.world_size = (d.rank, d.world_size) if d else (0, 1)
        self.group = d.checkpoint_group if d else None
        self.manifest_fields = manifest_fields
        self._pinned: dict[str, torch.Tensor] = {}
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_published: int | None = None
        self.timing: dict[str, float] = {}  # rank 0: the phases of the last published save, in seconds

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

    def save(self, step: int, files: TensorFiles, meta: dict[str, Any] | None, done: bool = False) -> float:
        """Start saving `step`: this rank's `files`, and on rank 0 `meta` (None elsewhere). Every rank calls
        it for every save. Returns the seconds the training thread was held (the stall)."""
        start = time.perf_counter()
        self.wait()
        snapshot, event = self._snapshot(files)
        stall = time.perf_counter() - start
        self._thread = threading.Thread(target=self._write, name=f"checkpoint-{step}", daemon=False,
                                        args=(step, snapshot, event, meta, done, start, stall))
        self._thread.start()
        return stall

    def _exchange(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order, between the writer threads."""
        if self.world_size == 1:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value, group=self.group)
        return out

    def _attempt(self, step: int, work: Callable[[], Any]) -> tuple[Any, str | None]:
        """(work's result, None), or (None, one line saying what failed): a rank that failed still takes part
        in every exchange after it, so no writer thread waits for it forever."""
        try:
            return work(), None
        except BaseException as exc:  # noqa: BLE001 - re-raised by poll() in the training thread
            return None, self._remember(step, exc)

    def _remember(self, step: int, exc: BaseException) -> str:
        """Keep the error for poll(); returns it as one line for the other ranks."""
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            exc = CheckpointWriteError(
                f"disk full writing checkpoint step {step} to {self.directory} ({exc.strerror}): free "
                "space on the volume or lower KEEP_LAST; earlier checkpoints are intact")
        self._error = exc
        return str(exc) if isinstance(exc, CheckpointWriteError) else repr(exc)

    def _failed_elsewhere(self, step: int, failure: str) -> None:
        if self._error is None:  # rank 0's own failure says more than that another rank failed
            self._error = CheckpointWriteError(f"writing checkpoint step {step} failed on {failure}")

    def _write(self, step: int, snapshot: TensorFiles, event: torch.cuda.Event | None,
               meta: dict[str, Any] | None, done: bool, started: float, stall: float) -> None:
        """The writer thread. Every rank runs the same exchanges in the same order, failed or not."""
        timing = {"stall_s": stall}
        tmp = None
        try:
            # 1. The copy to host memory is complete; every rank says how many bytes it will write.
            mark = time.perf_counter()
            needed, error = self._attempt(step, lambda: _copied_bytes(snapshot, event))
            timing["copy_s"] = time.perf_counter() - mark
            reports = self._exchange((needed, error))
            # 2. Rank 0 checks the free space for all of them and opens the temporary directory.
            opened: tuple[str | None, str | None] = (None, None)
            if self.rank == 0:
                failed = [f"rank {r}: {e}" for r, (_, e) in enumerate(reports) if e]
                opened = (None, failed[0]) if failed else self._attempt(
                    step, lambda: self._open(step, sum(n for n, _ in reports)))
            tmp_name, refusal = self._exchange(opened)[0]
            if tmp_name is None:
                if self.rank == 0:
                    self._failed_elsewhere(step, refusal)
                return
            tmp = Path(tmp_name)
            # 3. Each rank writes, fsyncs and hashes its own files, then reports their entries.
            entries, error = self._attempt(step, lambda: _write_files(tmp, snapshot, timing))
            mark = time.perf_counter()
            reports = self._exchange((entries, error))
            timing["peers_s"] = time.perf_counter() - mark
            if self.rank != 0:
                return
            # 4. Rank 0 publishes once every rank's files are in: meta.json, then the manifest, last.
            if failed := [f"rank {r}: {e}" for r, (_, e) in enumerate(reports) if e]:
                self._failed_elsewhere(step, failed[0])
                return
            mark = time.perf_counter()
            finished = {name: entry for rank_entries, _ in reports for name, entry in rank_entries.items()}
            (tmp / layout.META_NAME).write_text(json.dumps(meta, indent=1, sort_keys=True))
            layout.publish(tmp, step, finished, done=done, **self.manifest_fields)
            tmp = None
            self.last_published = step
            now = time.perf_counter()
            timing.update(publish_s=now - mark, total_s=now - started)
            removed = layout.prune(self.directory, self.keep_last)
            timing["prune_s"] = time.perf_counter() - now
            self.timing = {name: round(seconds, 3) for name, seconds in timing.items()}
            log.info("checkpoint published step=%d bytes=%d ranks=%d %s path=%s pruned=%d", step,
                     sum(e["size"] for e in finished.values()), self.world_size,
                     " ".join(f"{name}={seconds:.2f}" for name, seconds in self.timing.items()),
                     self.directory / layout.step_dir_name(step), len(removed))
        except BaseException as exc:  # noqa: BLE001 - surfaces at the next poll()
            self._remember(step, exc)
        finally:
            if tmp is not None and self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)

    def _open(self, step: int, needed: int) -> str:
        self.directory.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.directory).free
        if free < needed * 1.05:
            raise OSError(errno.ENOSPC, f"needs {needed / 2**20:.0f} MiB, {free / 2**20:.0f} MiB free")
        return str(layout.new_tmp_dir(self.directory, step))

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
        """Block until the save in flight is done (on rank 0: published); raise if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.poll()


def _copied_bytes(snapshot: TensorFiles, event: torch.cuda.Event | None) -> int:
    if event is not None:
        event.synchronize()
    return sum(t.numel() * t.element_size() for ts in snapshot.values() for t in ts.values())


def _write_files(tmp: Path, snapshot: TensorFiles, timing: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Write this rank's files into `tmp`, fsynced and hashed: their manifest entries."""
    timing.update(write_s=0.0, fsync_s=0.0, hash_s=0.0)
    with ThreadPoolExecutor(1, thread_name_prefix="checkpoint-sha256") as hasher:
        digests = {name: write_safetensors(tmp / name, tensors, hasher, timing)
                   for name, tensors in snapshot.items()}
    return {name: {"size": (tmp / name).stat().st_size, "sha256": digest} for name, digest in digests.items()}


# safetensors' names of the dtypes a checkpoint holds.
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16",
                       torch.float16: "F16", torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8",
                       torch.bool: "BOOL"}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], hasher: ThreadPoolExecutor,
                      timing: dict[str, float] | None = None) -> str:
    """Write contiguous CPU tensors as a safetensors file (the bytes safetensors' save_file writes: header
    padded to 8, data largest dtype first, then by name), fsync it and return its sha256, computed on
    `hasher`'s one thread block by block while the blocks are written and flushed: hashing, writing and
    fsync all release the GIL, so the hash costs no time beyond them, and the file is never read back.
    `timing` accumulates write_s, fsync_s and hash_s (the wait for the hash after the fsync)."""
    names = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    header, offset = {}, 0
    for name in names:
        tensor = tensors[name]
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    blocks = [struct.pack("<Q", len(head)) + head] + [tensors[name].reshape(-1).view(torch.uint8).numpy()
                                                      for name in names]
    digest = hashlib.sha256()
    marks = [time.perf_counter()]
    with open(path, "wb") as f:
        hashed = [hasher.submit(digest.update, block) for block in blocks]  # one thread: in order
        for block in blocks:
            f.write(block)
        f.flush()
        marks.append(time.perf_counter())
        os.fsync(f.fileno())
        marks.append(time.perf_counter())
    for done in hashed:
        done.result()
    marks.append(time.perf_counter())
    if timing is not None:
        for name, start, end in zip(("write_s", "fsync_s", "hash_s"), marks[:-1], marks[1:], strict=True):
            timing[name] = timing.get(name, 0.0) + end - start
    return digest.hexdigest()


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
