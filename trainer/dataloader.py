"""The distributed loader of BOS-aligned, best-fit packed rows, whose position is exact on any world size.

The loader is defined globally, independent of the world size, so resume works on any GPU count:
a global batch is R = total_batch_size / seq_len rows, and row j of every step comes from "lane" j,
whose k-th document is document j + kR of the training stream. The stream is the training shards in
order, repeated: index i is document i mod N of epoch i // N + 1 (N documents per epoch), so the
data never runs out and the epoch is part of every position. Rank r owns a contiguous block of
R / world_size lanes, so ranks read disjoint documents and tokenize only their own.

Each lane packs its documents (BOS + tokens) into rows of seq_len + 1 tokens, each row starting at a
document start, by trainer.packing's best fit: a document longer than a row starts a row alone and loses
its tail; the others go in whole, the largest that fits first, and when none fits the shortest is cropped
to fill the row. Those tails are the only tokens lost (nanochat reports ~35% of web text at seq 2048; on
a long-tailed synthetic stream, bench/packing.py, this packing loses 23.2% at 2048 against nanochat's
23.6%, 20.1% being beyond any packing's reach). A lane's position is exact and small: (next document k,
the k's still buffered). The loader state is R such positions; a new loader given it continues every row
bit for bit, on any world size.
"""

from __future__ import annotations

import bisect
import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from trainer.data import DataError, ShardStore
from trainer.packing import BestFitPacker, Position
from trainer.tokenizer import Tokenizer

log = logging.getLogger("phoenix.data")

BUFFER_DOCS = 32  # documents that fit a row a lane chooses among; 64 crops 0.1 point less (bench/packing.py)
PACKING = f"bos-bestfit-longfirst-{BUFFER_DOCS}"  # recorded in checkpoints: another packing is another run


class DocumentSource:
    """Tokenized documents by stream index (the training shards, repeated), for one rank's lanes.

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
        self.docs_per_epoch: int | None = None  # known once every training shard is indexed
        self._cache: OrderedDict[tuple[int, int, int], dict[int, np.ndarray]] = OrderedDict()
        self._cached_tokens = 0

    def epoch(self, index: int) -> int:
        """The epoch (from 1) that stream index `index` belongs to."""
        return self._locate(index)[0] + 1

    def _locate(self, index: int) -> tuple[int, int]:
        """(completed epochs, document within the epoch) of a stream index, indexing shards as needed."""
        shards = self.store.train_shards
        while self.docs_per_epoch is None and self._total_docs <= index:
            if self._indexed_shards == len(shards):
                if self._total_docs == 0:
                    raise DataError(f"the {len(shards)} training shards of {self.store.repo_id!r} hold no "
                                    "documents: set DATASET_REPO to a dataset with text")
                self.docs_per_epoch = self._total_docs
                break
            metadata = pq.ParquetFile(self.store.path(shards[self._indexed_shards])).metadata
            for rg in range(metadata.num_row_groups):
                self._row_groups.append((self._total_docs, self._indexed_shards, rg))
                self._starts.append(self._total_docs)
                self._total_docs += metadata.row_group(rg).num_rows
            self._indexed_shards += 1
            self.store.prefetch(shards[self._indexed_shards:self._indexed_shards + self.store.prefetch_depth])
        if self.docs_per_epoch is None:
            return 0, index
        return divmod(index, self.docs_per_epoch)

    def tokens(self, index: int) -> np.ndarray:
        epoch, doc = self._locate(index)
        first_doc, shard, rg = self._row_groups[bisect.bisect_right(self._starts, doc) - 1]
        key = (epoch, shard, rg)
        if key not in self._cache:
            self._load(key, first_doc)
        self._cache.move_to_end(key)
        return self._cache[key][index]

    def _load(self, key: tuple[int, int, int], first_doc: int) -> None:
        epoch, shard, rg = key
        table = pq.ParquetFile(self.store.path(self.store.train_shards[shard])).read_row_group(rg, ["text"])
        texts = table.column(0).to_pylist()
        first = epoch * (self.docs_per_epoch or 0) + first_doc  # stream index of the row group's first text
        mine = [i for i in range(len(texts)) if (first + i) % self.num_lanes in self.lanes]
        encoded = self.tokenizer.encode_batch([texts[i] for i in mine], prepend_bos=True)
        docs = {first + i: np.asarray(ids, dtype=np.int32) for i, ids in zip(mine, encoded, strict=True)}
        self._cache[key] = docs
        self._cached_tokens += sum(len(d) for d in docs.values())
        while self._cached_tokens > self.cache_tokens and len(self._cache) > 1:
            _, evicted = self._cache.popitem(last=False)
            self._cached_tokens -= sum(len(d) for d in evicted.values())


class LanePacker:
    """One lane's rows: its documents packed best fit (trainer.packing), each row starting at a BOS.

    `document(k)` gives the lane's k-th document (BOS first). The position {"next": k, "buffer": [k, ...]}
    names the next unread document and the ones waiting in the buffer; rows follow from it alone.
    """

    def __init__(self, document: Callable[[int], np.ndarray], row_len: int, buffer_docs: int = BUFFER_DOCS,
                 position: Position | None = None) -> None:
        self.document = document
        self._tokens: dict[int, np.ndarray] = {}  # the buffered documents
        self.packer = BestFitPacker(self._read, row_len, buffer_docs, crop=True, position=position)

    def _read(self, k: int) -> int:
        self._tokens[k] = self.document(k)
        return len(self._tokens[k])

    def row(self) -> np.ndarray:
        """The next row_len tokens."""
        return np.concatenate([self._tokens.pop(k)[:take] for k, take in self.packer.plan_row()])

    def position(self) -> Position:
        return self.packer.position()


class DistributedTokenLoader:
    """Yields, per optimizer step, this rank's micro-batches; `state_dict()` names every lane's position.

    A background thread builds steps ahead (the tokenizer releases the GIL), and each step carries the
    lane positions after it, so the state returned is always that of the last step handed out.
    """

    def __init__(self, docs: DocumentSource, seq_len: int, device_batch_size: int, num_lanes: int,
                 rank: int, world_size: int, lane_state: list[dict[str, Any]] | None = None,
                 pin_memory: bool = False, queue_depth: int = 2, buffer_docs: int = BUFFER_DOCS) -> None:
        per_rank = num_lanes // world_size
        if num_lanes % (world_size * device_batch_size):
            raise ValueError(f"{num_lanes} rows per step do not split into {world_size} ranks x "
                             f"{device_batch_size} rows per micro-batch")
        self.docs = docs
        self.device_batch_size = device_batch_size
        self.num_lanes = num_lanes
        self.lanes = range(rank * per_rank, (rank + 1) * per_rank)
        self.grad_accum_steps = per_rank // device_batch_size
        self.pin_memory = pin_memory
        self._packers = {lane: LanePacker(lambda k, lane=lane: docs.tokens(lane + k * num_lanes), seq_len + 1,
                                          buffer_docs, lane_state[lane] if lane_state else None)
                         for lane in self.lanes}
        self._state = self._positions()
        self._crop_counts = (0, 0)  # (tokens dropped by crops, tokens in rows) of the steps handed out
        # The wrap is logged when lane 0 (always on rank 0, whatever the world size) enters a new epoch.
        self._epoch = self._lane0_epoch()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="token-loader", daemon=True)
        self._thread.start()

    def _positions(self) -> dict[int, dict[str, Any]]:
        return {lane: packer.position() for lane, packer in self._packers.items()}

    def _lane0_epoch(self) -> int:
        lane0 = self._packers.get(0)
        next_doc = lane0.packer.next_doc if lane0 else 0
        return self.docs.epoch(self.num_lanes * (next_doc - 1)) if next_doc else 1

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                micro_batches = []
                for micro in range(self.grad_accum_steps):
                    first = self.lanes.start + micro * self.device_batch_size
                    lanes = range(first, first + self.device_batch_size)
                    rows = np.stack([self._packers[lane].row() for lane in lanes])
                    batch = torch.from_numpy(rows.astype(np.int64))
                    if self.pin_memory:
                        batch = batch.pin_memory()
                    micro_batches.append((batch[:, :-1], batch[:, 1:]))
                for epoch in range(self._epoch + 1, self._lane0_epoch() + 1):
                    log.info("event=epoch_wrap epoch=%d documents_per_epoch=%d", epoch,
                             self.docs.docs_per_epoch)
                    self._epoch = epoch
                counts = (sum(p.packer.dropped_tokens for p in self._packers.values()),
                          sum(p.packer.packed_tokens for p in self._packers.values()))
                item = (micro_batches, self._positions(), counts)
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
        micro_batches, self._state, self._crop_counts = item
        return micro_batches

    def state_dict(self) -> dict[int, dict[str, Any]]:
        """Positions of this rank's lanes after the last step handed out; merge across ranks to save."""
        return dict(self._state)

    def crop_fraction(self) -> float:
        """Share of the tokens of the documents packed so far that crops dropped (this process and rank)."""
        cropped, packed = self._crop_counts
        return cropped / max(1, cropped + packed)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def loader_meta(lanes: dict[int, dict[str, Any]], num_lanes: int) -> dict[str, Any]:
    """The checkpoint's record of the loader: the packing and every lane's position, in lane order.

    A buffer is written as one string of each document's distance back from `next` (a few digits, where
    the indices grow with the run); meta.json would put each list item on a line of its own."""
    return {"packing": PACKING, "lanes": [{"next": lanes[lane]["next"], "buffer_back": " ".join(
        str(lanes[lane]["next"] - k) for k in lanes[lane]["buffer"])} for lane in range(num_lanes)]}


def lane_state(loader: dict[str, Any], checkpoint: Path) -> list[dict[str, Any]]:
    """Lane positions from a checkpoint's loader record; one written under another packing cannot resume."""
    packing = loader.get("packing", "concatenated rows (before best-fit packing)")
    if packing != PACKING:
        raise DataError(f"{checkpoint} was written with data packing {packing}, this trainer packs "
                        f"{PACKING}: finish that run with the phoenix version that started it, or start anew "
                        "under another MODEL_TAG")
    return [{"next": lane["next"], "buffer": [lane["next"] - int(b) for b in lane["buffer_back"].split()]}
            for lane in loader["lanes"]]


def validation_rows(store: ShardStore, tokenizer: Tokenizer, seq_len: int, num_rows: int) -> torch.Tensor:
    """The first `num_rows` rows of the validation shard, packed as training rows: the same on every run."""
    batches = pq.ParquetFile(store.path(store.val_shard)).iter_batches(batch_size=256, columns=["text"])
    documents: list[np.ndarray] = []

    def document(k: int) -> np.ndarray:
        while len(documents) <= k:
            batch = next(batches, None)
            if batch is None:
                raise DataError(f"validation shard {store.val_shard} has {len(documents)} documents, too few "
                                f"for {num_rows} rows of {seq_len} tokens (lower --eval-tokens)")
            documents.extend(np.asarray(ids, dtype=np.int32)
                             for ids in tokenizer.encode_batch(batch.column(0).to_pylist(), prepend_bos=True))
        return documents[k]

    packer = LanePacker(document, seq_len + 1)
    return torch.from_numpy(np.stack([packer.row() for _ in range(num_rows)]).astype(np.int64))
