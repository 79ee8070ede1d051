"""Chat conversations for SFT: loaded with `datasets`, ordered deterministically, packed into rows.

The order is defined globally, independent of the world size, so resume works on any GPU count: the
training rows are visited epoch by epoch, each epoch in a permutation seeded by (seed, epoch), and a
position p names slot p % N of epoch p // N. Conversations are packed in that order into rows of
max_seq_len + 1 tokens by trainer.packing's best fit, as nanochat's SFT packs them: whole conversations,
the largest that fits first, padding when none fits; one longer than a row fills a row alone, cut to it.
A step is `rows_per_step` rows; every rank plans them all (rendering a step's conversations is cheap)
and builds its own block of them, so the global batch is the same tokens on any world size. The
loader's state is the packer's position: the next position and the ones still buffered.

The targets are -1 (ignored by the loss) everywhere except on what the assistant says, so SFT learns
answers, not questions; padding is -1 too.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from trainer.data import DataError, gated
from trainer.packing import BestFitPacker, Position
from trainer.tokenizer import Tokenizer

if TYPE_CHECKING:
    import datasets

log = logging.getLogger("phoenix.sft")

DEFAULT_SFT_DATASET = "HuggingFaceTB/smol-smoltalk"
BUFFER_CONVERSATIONS = 32  # conversations that fit a row, chosen among (nanochat's SFT: 100)
PACKING = f"bos-bestfit-pad-{BUFFER_CONVERSATIONS}"  # recorded in checkpoints: another is another run
READ_AHEAD = 64  # conversations fetched and rendered at once (one Arrow take)
HORIZON_SAMPLE = 2048  # conversations whose lengths estimate the steps of an epoch

Messages = list[dict[str, str]]  # [{"role": ..., "content": ...}, ...]
Fetch = Callable[[list[int]], list[Messages]]  # dataset row indices -> their conversations, in order


def load_chat_dataset(repo_id: str, split: str, cache_dir: Path, revision: str | None = None
                      ) -> datasets.Dataset:
    """Load the split's `messages` column (at commit `revision` if given), memory-mapped from `cache_dir`.

    cache_dir is on the volume, so a relaunch whose Hub is unreachable still finds the data: `datasets`
    falls back to its cached copy once its retries are spent.
    """
    import datasets  # a heavy import that only this stage needs
    from datasets.exceptions import DatasetNotFoundError

    try:
        ds = datasets.load_dataset(repo_id, split=split, cache_dir=str(cache_dir), revision=revision)
    except DatasetNotFoundError as exc:  # `datasets` words a gated one as not found, saying "gated"
        if "gated" in str(exc).lower():
            raise DataError(gated(repo_id, "SFT_DATASET")) from None
        raise DataError(f"SFT dataset {repo_id!r} not found on the Hub: set SFT_DATASET (or --sft-dataset) "
                        "to a dataset with a `messages` column") from None
    except ConnectionError as exc:
        raise DataError(f"SFT dataset {repo_id!r} is neither reachable nor cached in {cache_dir} ({exc}): "
                        "check the network or HF_ENDPOINT") from None
    except ValueError as exc:  # an unknown split names the ones that exist
        raise DataError(f"SFT dataset {repo_id!r}: {exc}") from None
    if "messages" not in ds.column_names:
        raise DataError(f"SFT dataset {repo_id!r} split {split!r} has columns {ds.column_names}, "
                        "no `messages` column of [{role, content}] lists")
    return ds.select_columns(["messages"])


def dataset_fetch(ds: datasets.Dataset) -> Fetch:
    """Rows by index, fetched in one Arrow `take` per call rather than one lookup per conversation."""
    return lambda rows: ds[rows]["messages"]


@functools.lru_cache(maxsize=2)  # a step straddling an epoch boundary needs two orders at once
def epoch_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the training rows in `epoch`: a permutation that depends only on (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def render(tokenizer: Tokenizer, messages: Messages, row: int, warn: bool = True
           ) -> tuple[list[int], list[int]]:
    """(ids, mask) of a conversation; a malformed one becomes a fully masked stub and is logged (if warn).

    Skipping rather than failing: the same row would fail again after every relaunch, stalling the run
    on one bad record, and the skip is as deterministic as the order, so resume stays exact.
    """
    try:
        return tokenizer.render_conversation(messages)
    except (ValueError, KeyError, TypeError) as exc:
        if warn:
            log.warning("skipping malformed conversation at dataset row %d: %s", row, exc)
        return [tokenizer.bos_id], [0]


def collate(rows: Sequence[tuple[list[int], list[int]]], pad_id: int, max_seq_len: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rendered conversations, one a row -> (inputs, targets), both (B, T) with T the longest input, at most
    max_seq_len. Each row is a packed row of training, or one held-out conversation of evaluation.

    Conversations are cut to max_seq_len + 1 tokens. targets[b, t] is token t + 1 where the mask says the
    assistant wrote it, else -1; padding is -1 too.
    """
    rows = [(ids[:max_seq_len + 1], mask[:max_seq_len + 1]) for ids, mask in rows]
    width = max(1, max(len(ids) for ids, _ in rows) - 1)
    inputs = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), -1, dtype=torch.long)
    for b, (ids, mask) in enumerate(rows):
        n = len(ids) - 1
        if n <= 0:
            continue
        ids_t, mask_t = torch.tensor(ids), torch.tensor(mask, dtype=torch.bool)
        inputs[b, :n] = ids_t[:-1]
        targets[b, :n] = torch.where(mask_t[1:], ids_t[1:], -1)
    return inputs, targets


@dataclass
class StepBatch:
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]]  # this rank's (inputs, targets), in order
    num_targets: int  # assistant tokens the loss is taken on, this rank
    num_tokens: int  # input tokens that are not padding, this rank (for tok/sec)


class ChatLoader:
    """This rank's share of each global SFT batch, as micro-batches; see the module docstring."""

    def __init__(self, fetch: Fetch, num_rows: int, tokenizer: Tokenizer, rows_per_step: int,
                 device_batch_size: int, max_seq_len: int, rank: int, world_size: int, seed: int,
                 state: dict[str, Any] | None = None, buffer_size: int = BUFFER_CONVERSATIONS) -> None:
        if rows_per_step % world_size:
            raise ValueError(f"{rows_per_step} rows do not split over {world_size} ranks")
        self.fetch = fetch
        self.num_rows = num_rows
        self.tokenizer = tokenizer
        self.rows_per_step = rows_per_step
        self.device_batch_size = device_batch_size
        self.row_len = max_seq_len + 1
        self.seed = seed
        self.warn = rank == 0  # every rank renders every conversation: one warning is enough
        per_rank = rows_per_step // world_size
        self.mine = range(rank * per_rank, (rank + 1) * per_rank)
        self._rendered: dict[int, tuple[list[int], list[int]]] = {}  # by position: buffered and read ahead
        position = None if state is None else loader_position(state)
        if position is not None:
            self._render(position["buffer"])
        self.packer = BestFitPacker(self._length, self.row_len, buffer_size, crop=False, position=position)

    def dataset_rows(self, positions: list[int]) -> list[int]:
        """The dataset rows at these global positions."""
        return [int(epoch_order(self.num_rows, self.seed, p // self.num_rows)[p % self.num_rows])
                for p in positions]

    def _render(self, positions: list[int]) -> None:
        rows = self.dataset_rows(positions)
        for p, row, messages in zip(positions, rows, self.fetch(rows), strict=True):
            self._rendered[p] = render(self.tokenizer, messages, row, self.warn)

    def _length(self, position: int) -> int:
        if position not in self._rendered:  # the packer reads on in order: render the next few at once
            self._render(list(range(position, position + READ_AHEAD)))
        return len(self._rendered[position][0])

    def next_step(self) -> StepBatch:
        rows = []
        for j in range(self.rows_per_step):
            pieces = [(self._rendered.pop(p), take) for p, take in self.packer.plan_row()]
            if j in self.mine:
                rows.append(([t for (ids, _), take in pieces for t in ids[:take]],
                             [m for (_, mask), take in pieces for m in mask[:take]]))
        micro_batches = [collate(rows[i:i + self.device_batch_size], self.tokenizer.bos_id, self.row_len - 1)
                         for i in range(0, len(rows), self.device_batch_size)]
        num_targets = sum(int((y != -1).sum()) for _, y in micro_batches)
        num_tokens = sum(len(ids) - 1 for ids, _ in rows)
        return StepBatch(micro_batches, num_targets, num_tokens)

    def consumed(self) -> int:
        """Conversations placed in rows since SFT began (whole, or cut to a row)."""
        return self.packer.placed()

    def state_dict(self) -> dict[str, Any]:
        """The packing and the packer's position (the same on every rank); each buffered position is
        written as its distance back from `next`."""
        position = self.packer.position()
        return {"packing": PACKING, "next": position["next"],
                "buffer_back": " ".join(str(position["next"] - p) for p in position["buffer"])}


def loader_position(state: dict[str, Any]) -> Position:
    """The packer's position from a checkpoint's loader state (ChatLoader.state_dict)."""
    return {"next": state["next"], "buffer": [state["next"] - int(b) for b in state["buffer_back"].split()]}


def steps_per_epoch(fetch: Fetch, num_rows: int, tokenizer: Tokenizer, rows_per_step: int, max_seq_len: int,
                    seed: int) -> float:
    """Steps one pass over the training conversations takes, estimated by packing the first
    HORIZON_SAMPLE of epoch 1's order as training packs them (padding included): the same on every launch."""
    rows = [int(row) for row in epoch_order(num_rows, seed, 0)[:HORIZON_SAMPLE]]
    lengths = [len(render(tokenizer, messages, row, warn=False)[0])
               for row, messages in zip(rows, fetch(rows), strict=True)]
    packer = BestFitPacker(lambda k: lengths[k % len(lengths)], max_seq_len + 1, BUFFER_CONVERSATIONS,
                           crop=False)
    packed_rows = 0
    while packer.placed() < len(lengths):
        packer.plan_row()
        packed_rows += 1
    return num_rows * packed_rows / len(lengths) / rows_per_step


def eval_batches(fetch: Fetch, rows: range, tokenizer: Tokenizer, batch_size: int, max_seq_len: int,
                 rank: int, world_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of the held-out conversations, rendered once and kept for every evaluation."""
    mine = list(rows)[rank::world_size]
    rendered = [render(tokenizer, messages, row) for row, messages in zip(mine, fetch(mine), strict=True)]
    return [collate(rendered[i:i + batch_size], tokenizer.bos_id, max_seq_len)
            for i in range(0, len(rendered), batch_size)]
