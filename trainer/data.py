"""FineWeb-edu shards from the Hub, and a distributed tokenizing loader whose position is exact.

Shards (`shard_NNNNN.parquet`, one `text` column; the last shard is validation) are fetched on demand
into $NANOCHAT_BASE_DIR/base_data/ with retries, never twice, and the next ones are prefetched in the
background so the GPU does not wait on the network.

The loader is defined globally, independent of the world size, so resume works on any GPU count:
a global batch is R = total_batch_size / seq_len rows, and row j of every step comes from "lane" j,
which reads documents j, j+R, j+2R, ... (BOS + tokens, concatenated, cut into rows of seq_len + 1
tokens that overlap by one). Rank r owns a contiguous block of R / world_size lanes, so ranks read
disjoint documents and tokenize only their own. A lane's position is (document number, token offset):
the loader state is R such pairs, which names the exact next token of every row.
"""

from __future__ import annotations

import bisect
import json
import logging
import queue
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from trainer.checkpoint_layout import write_json_atomic
from trainer.tokenizer import Tokenizer

log = logging.getLogger("phoenix.data")

DEFAULT_DATASET_REPO = "karpathy/fineweb-edu-100b-shuffle"
_SHARD_NAME = re.compile(r"^shard_\d{5}\.parquet$")


class DataError(RuntimeError):
    """A data problem the user must fix (bad repo id, no shards reachable, data exhausted)."""


class ShardStore:
    """The dataset's parquet shards on the volume, downloaded from the Hub on first use."""

    def __init__(self, data_dir: Path, repo_id: str = DEFAULT_DATASET_REPO, attempts: int = 5,
                 prefetch: int = 2) -> None:
        self.data_dir = Path(data_dir)
        self.repo_id = repo_id
        self.attempts = attempts
        self.prefetch_depth = prefetch
        self._names: list[str] | None = None
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="shard-prefetch")
        self._pending: dict[str, Future[Path]] = {}
        self._lock = threading.Lock()

    def shard_names(self) -> list[str]:
        """All shard file names, sorted; the listing is cached on the volume so restarts need no Hub."""
        if self._names is None:
            listing = self.data_dir / "shards.json"
            cached = json.loads(listing.read_text()) if listing.exists() else None
            if cached is not None and cached.get("repo_id", self.repo_id) == self.repo_id:
                self._names = cached["shards"]
            else:
                if cached is not None:
                    # Same file names, other data: the old repo's shards must not stand in for the new.
                    stale = sorted(self.data_dir.glob("shard_*.parquet"))
                    log.warning("dataset changed from=%s to=%s: re-listing, removing %d cached shards",
                                cached.get("repo_id"), self.repo_id, len(stale))
                    for path in stale:
                        path.unlink()
                self._names = self._list_remote()
                write_json_atomic(listing, {"repo_id": self.repo_id, "shards": self._names})
        return self._names

    def _list_remote(self) -> list[str]:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import RepositoryNotFoundError

        last_error: Exception | None = None
        for attempt in range(self.attempts):
            try:
                files = HfApi().list_repo_files(self.repo_id, repo_type="dataset")
                break
            except RepositoryNotFoundError:
                raise DataError(f"dataset repo {self.repo_id!r} not found on the Hub: set DATASET_REPO to a "
                                "dataset with shard_NNNNN.parquet files") from None
            except Exception as exc:  # network errors come in many classes; all are retried
                last_error = exc
                time.sleep(min(2.0**attempt, 30.0))
        else:
            raise DataError(f"no shards reachable: listing {self.repo_id!r} failed "
                            f"({last_error.__class__.__name__}); check the network or HF_ENDPOINT") from None
        names = sorted(f for f in files if _SHARD_NAME.match(f))
        if len(names) < 2:
            raise DataError(f"dataset repo {self.repo_id!r} has {len(names)} shard_NNNNN.parquet files; "
                            "need at least 2 (the last one is the validation split)")
        return names

    @property
    def train_shards(self) -> list[str]:
        return self.shard_names()[:-1]

    @property
    def val_shard(self) -> str:
        return self.shard_names()[-1]

    def path(self, name: str) -> Path:
        """Local path of a shard, downloading it now if needed (joining a prefetch already under way)."""
        self.shard_names()  # a cached file is this repo's only once the listing says so
        local = self.data_dir / name
        if local.exists():
            return local
        with self._lock:
            future = self._pending.get(name) or self._pool.submit(self._download, name)
            self._pending[name] = future
        return future.result()

    def prefetch(self, names: list[str]) -> None:
        with self._lock:
            for name in names:
                if name not in self._pending and not (self.data_dir / name).exists():
                    self._pending[name] = self._pool.submit(self._download, name)

    def _download(self, name: str) -> Path:
        from huggingface_hub import hf_hub_download

        last_error: Exception | None = None
        for attempt in range(self.attempts):
            try:
                # local_dir downloads go to a .incomplete file first and are renamed when whole.
                return Path(hf_hub_download(self.repo_id, name, repo_type="dataset",
                                            local_dir=self.data_dir))
            except Exception as exc:  # retried: 5xx, resets, timeouts
                last_error = exc
                log.warning("shard download failed name=%s attempt=%d error=%s", name, attempt + 1,
                            exc.__class__.__name__)
                time.sleep(min(0.5 * 2.0**attempt, 30.0))
        raise DataError(f"could not download {name} from {self.repo_id!r} after {self.attempts} attempts "
                        f"({last_error.__class__.__name__}); check the network or HF_ENDPOINT")

    def iter_texts(self, max_chars: int) -> Iterator[str]:
        """Training texts from the first shards, up to `max_chars` (for tokenizer training)."""
        seen = 0
        for name in self.train_shards:
            for batch in pq.ParquetFile(self.path(name)).iter_batches(columns=["text"]):
                for text in batch.column(0).to_pylist():
                    yield text
                    seen += len(text)
                    if seen >= max_chars:
                        return


class DocumentSource:
    """Tokenized training documents by global index, for the documents one rank's lanes need.

    Row groups are read and tokenized as a unit (one Rust batch call) but only for the documents
    whose lane this rank owns; a token-budgeted LRU keeps the ones lanes are still reading.
    """

    def __init__(self, store: ShardStore, tokenizer: Tokenizer, num_lanes: int, lanes: range,
                 cache_tokens: int = 64_000_000) -> None:
        self.store = store
        self.tokenizer = tokenizer
        self.num_lanes = num_lanes
        self.lanes = lanes
        self.cache_tokens = cache_tokens
        self._row_groups: list[tuple[int, int, int]] = []  # (first_doc, shard_index, row_group)
        self._starts: list[int] = []  # first_doc of each row group, for bisection
        self._indexed_shards = 0
        self._total_docs = 0
        self._cache: OrderedDict[tuple[int, int], dict[int, np.ndarray]] = OrderedDict()
        self._cached_tokens = 0

    def _index_through(self, doc: int) -> None:
        shards = self.store.train_shards
        while self._total_docs <= doc:
            if self._indexed_shards == len(shards):
                raise DataError(f"training data exhausted at document {doc} ({len(shards)} shards): "
                                "lower --num-iterations or use a larger dataset")
            metadata = pq.ParquetFile(self.store.path(shards[self._indexed_shards])).metadata
            for rg in range(metadata.num_row_groups):
                self._row_groups.append((self._total_docs, self._indexed_shards, rg))
                self._starts.append(self._total_docs)
                self._total_docs += metadata.row_group(rg).num_rows
            self._indexed_shards += 1
            self.store.prefetch(shards[self._indexed_shards:self._indexed_shards + self.store.prefetch_depth])

    def tokens(self, doc: int) -> np.ndarray:
        self._index_through(doc)
        first_doc, shard, rg = self._row_groups[bisect.bisect_right(self._starts, doc) - 1]
        key = (shard, rg)
        if key not in self._cache:
            self._load(key, first_doc)
        self._cache.move_to_end(key)
        return self._cache[key][doc]

    def _load(self, key: tuple[int, int], first_doc: int) -> None:
        shard, rg = key
        table = pq.ParquetFile(self.store.path(self.store.train_shards[shard])).read_row_group(rg, ["text"])
        texts = table.column(0).to_pylist()
        mine = [i for i in range(len(texts)) if (first_doc + i) % self.num_lanes in self.lanes]
        encoded = self.tokenizer.encode_batch([texts[i] for i in mine], prepend_bos=True)
        docs = {first_doc + i: np.asarray(ids, dtype=np.int32) for i, ids in zip(mine, encoded, strict=True)}
        self._cache[key] = docs
        self._cached_tokens += sum(len(d) for d in docs.values())
        while self._cached_tokens > self.cache_tokens and len(self._cache) > 1:
            _, evicted = self._cache.popitem(last=False)
            self._cached_tokens -= sum(len(d) for d in evicted.values())


class DistributedTokenLoader:
    """Yields, per optimizer step, this rank's micro-batches; `state_dict()` names the exact next token.

    A background thread builds steps ahead (the tokenizer releases the GIL), and each step carries the
    lane positions after it, so the state returned is always that of the last step handed out.
    """

    def __init__(self, docs: DocumentSource, seq_len: int, device_batch_size: int, num_lanes: int,
                 rank: int, world_size: int, lane_state: list[tuple[int, int]] | None = None,
                 pin_memory: bool = False, queue_depth: int = 2) -> None:
        per_rank = num_lanes // world_size
        if num_lanes % (world_size * device_batch_size):
            raise ValueError(f"{num_lanes} rows per step do not split into {world_size} ranks x "
                             f"{device_batch_size} rows per micro-batch")
        self.docs = docs
        self.seq_len = seq_len
        self.device_batch_size = device_batch_size
        self.num_lanes = num_lanes
        self.lanes = range(rank * per_rank, (rank + 1) * per_rank)
        self.grad_accum_steps = per_rank // device_batch_size
        self.pin_memory = pin_memory
        # (documents consumed by the lane, token offset in its current document)
        self._positions = {lane: (0, 0) for lane in self.lanes}
        if lane_state is not None:
            self._positions = {lane: tuple(lane_state[lane]) for lane in self.lanes}
        self._state = dict(self._positions)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="token-loader", daemon=True)
        self._thread.start()

    def _row(self, lane: int) -> np.ndarray:
        """seq_len + 1 tokens of this lane; advances it by seq_len (the last token starts the next row)."""
        count, offset = self._positions[lane]
        parts, consumed = [], 0
        while consumed < self.seq_len + 1:
            tokens = self.docs.tokens(lane + count * self.num_lanes)
            take = tokens[offset:offset + self.seq_len + 1 - consumed]
            if consumed <= self.seq_len < consumed + len(take):  # the next row starts in this document
                self._positions[lane] = (count, offset + self.seq_len - consumed)
            parts.append(take)
            consumed += len(take)
            count, offset = count + 1, 0
        return np.concatenate(parts)

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                micro_batches = []
                for micro in range(self.grad_accum_steps):
                    first = self.lanes.start + micro * self.device_batch_size
                    lanes = range(first, first + self.device_batch_size)
                    rows = np.stack([self._row(lane) for lane in lanes])
                    batch = torch.from_numpy(rows.astype(np.int64))
                    if self.pin_memory:
                        batch = batch.pin_memory()
                    micro_batches.append((batch[:, :-1], batch[:, 1:]))
                item = (micro_batches, dict(self._positions))
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # handed to the training loop, which raises it there
            self._queue.put(exc)

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        micro_batches, self._state = item
        return micro_batches

    def state_dict(self) -> dict[int, tuple[int, int]]:
        """Positions of this rank's lanes after the last step handed out; merge across ranks to save."""
        return dict(self._state)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def validation_rows(store: ShardStore, tokenizer: Tokenizer, seq_len: int, num_rows: int) -> torch.Tensor:
    """The first `num_rows` rows (seq_len + 1 tokens) of the validation shard: the same on every run."""
    needed = num_rows * seq_len + 1
    stream: list[np.ndarray] = []
    have = 0
    for batch in pq.ParquetFile(store.path(store.val_shard)).iter_batches(batch_size=256, columns=["text"]):
        for ids in tokenizer.encode_batch(batch.column(0).to_pylist(), prepend_bos=True):
            stream.append(np.asarray(ids, dtype=np.int64))
            have += len(ids)
        if have >= needed:
            break
    if have < needed:
        raise DataError(f"validation shard {store.val_shard} has {have} tokens; need {needed} "
                        "(lower --eval-tokens)")
    flat = np.concatenate(stream)[:needed]
    rows = np.lib.stride_tricks.sliding_window_view(flat, seq_len + 1)[::seq_len][:num_rows]
    return torch.from_numpy(np.ascontiguousarray(rows))
