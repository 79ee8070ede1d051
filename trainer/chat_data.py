"""Chat conversations for SFT: loaded with `datasets`, ordered deterministically, batched per rank.

The order is defined globally, independent of the world size, so resume works on any GPU count: the
training rows are visited epoch by epoch, each epoch in a permutation seeded by (seed, epoch), and a
position p (conversations consumed since SFT began) names slot p % N of epoch p // N. A step takes the
next `conversations_per_step` positions; rank r renders the r-th of world_size equal slices of them.
The loader's state is that one position, saved as (epoch, index): exact and tiny.

A batch holds whole conversations, padded to the longest in its micro-batch; the targets are -1 (ignored
by the loss) everywhere except on what the assistant says, so SFT learns answers, not questions.
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
from trainer.tokenizer import Tokenizer

if TYPE_CHECKING:
    import datasets

log = logging.getLogger("phoenix.sft")

DEFAULT_SFT_DATASET = "HuggingFaceTB/smol-smoltalk"

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


def render(tokenizer: Tokenizer, messages: Messages, row: int) -> tuple[list[int], list[int]]:
    """(ids, mask) of a conversation; a malformed one becomes a fully masked stub and is logged.

    Skipping rather than failing: the same row would fail again after every relaunch, stalling the run
    on one bad record, and the skip is as deterministic as the order, so resume stays exact.
    """
    try:
        return tokenizer.render_conversation(messages)
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("skipping malformed conversation at dataset row %d: %s", row, exc)
        return [tokenizer.bos_id], [0]


def collate(rows: Sequence[tuple[list[int], list[int]]], pad_id: int, max_seq_len: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rendered conversations -> (inputs, targets), both (B, T) with T the longest input, at most max_seq_len.

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

    def __init__(self, fetch: Fetch, num_rows: int, tokenizer: Tokenizer, conversations_per_step: int,
                 device_batch_size: int, max_seq_len: int, rank: int, world_size: int, seed: int,
                 state: dict[str, int] | None = None) -> None:
        if conversations_per_step % world_size:
            raise ValueError(f"{conversations_per_step} conversations do not split over {world_size} ranks")
        self.fetch = fetch
        self.num_rows = num_rows
        self.tokenizer = tokenizer
        self.conversations_per_step = conversations_per_step
        self.device_batch_size = device_batch_size
        self.max_seq_len = max_seq_len
        self.seed = seed
        per_rank = conversations_per_step // world_size
        self.slice = (rank * per_rank, (rank + 1) * per_rank)
        self.position = 0 if state is None else state["epoch"] * num_rows + state["index"]

    def rows(self, start: int, stop: int) -> list[int]:
        """Dataset rows at global positions [start, stop)."""
        return [int(epoch_order(self.num_rows, self.seed, p // self.num_rows)[p % self.num_rows])
                for p in range(start, stop)]

    def next_step(self) -> StepBatch:
        lo, hi = self.slice
        rows = self.rows(self.position + lo, self.position + hi)
        self.position += self.conversations_per_step
        rendered = [render(self.tokenizer, messages, row) for row, messages in zip(rows, self.fetch(rows),
                                                                                    strict=True)]
        micro_batches = [collate(rendered[i:i + self.device_batch_size], self.tokenizer.bos_id,
                                 self.max_seq_len) for i in range(0, len(rendered), self.device_batch_size)]
        num_targets = sum(int((y != -1).sum()) for _, y in micro_batches)
        num_tokens = sum(min(len(ids), self.max_seq_len + 1) - 1 for ids, _ in rendered)
        return StepBatch(micro_batches, num_targets, num_tokens)

    def state_dict(self) -> dict[str, Any]:
        """Where the next step starts: epoch and index into that epoch's order (the same on every rank)."""
        return {"epoch": self.position // self.num_rows, "index": self.position % self.num_rows}


def eval_batches(fetch: Fetch, rows: range, tokenizer: Tokenizer, batch_size: int, max_seq_len: int,
                 rank: int, world_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of the held-out conversations, rendered once and kept for every evaluation."""
    mine = list(rows)[rank::world_size]
    rendered = [render(tokenizer, messages, row) for row, messages in zip(mine, fetch(mine), strict=True)]
    return [collate(rendered[i:i + batch_size], tokenizer.bos_id, max_seq_len)
            for i in range(0, len(rendered), batch_size)]
