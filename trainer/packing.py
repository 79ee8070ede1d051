"""Best-fit packing of documents into rows, planned from their lengths alone, with an exact, small position.

Both stages pack this way: pretraining (trainer/dataloader.py) fills every row, cropping; SFT
(trainer/chat_data.py) keeps conversations whole and pads. A packer reads documents of a stream in
order (k = 0, 1, ...) into a buffer and plans each row of row_len tokens from it:

- A document longer than a row can only be cropped: it waits in stream order and starts the next row
  alone, so it loses only what lies beyond the row, the least any packing can lose of it.
- The others are packed as nanochat packs them: the largest buffered document that fits what is left of
  the row goes in whole (the earliest on ties), until none fits; then the shortest is cropped to fill
  the row (`crop=True`) or the rest of the row is padding (`crop=False`).
- Before each choice the buffer is topped up in stream order to `buffer_size` documents that fit a row,
  reading at most twice that many in all, so a stretch of long documents cannot grow the position.

Keeping long documents out of the choices is what makes a small buffer enough. nanochat's buffer (1000
documents topped up 128 at a time, or one at a time as this packer once did) fills up with documents
longer than a row, which leave only when no shorter one is left; its best fit then chooses among the
few documents read since. The position is the next unread index and the indices still buffered.
"""

from __future__ import annotations

import bisect
import sys
from collections import deque
from collections.abc import Callable
from typing import Any

Position = dict[str, Any]  # {"next": k, "buffer": [k, ...]}


class BestFitPacker:
    """Plans rows from documents known by stream index; `length(k)` is document k's length in tokens."""

    def __init__(self, length: Callable[[int], int], row_len: int, buffer_size: int, crop: bool,
                 position: Position | None = None) -> None:
        self.length = length
        self.row_len = row_len
        self.buffer_size = buffer_size
        self.crop = crop
        self.next_doc = 0
        self._fitting: list[tuple[int, int]] = []  # (length, k), sorted: best fit is a bisection
        self._long: deque[tuple[int, int]] = deque()  # (k, length) of documents longer than a row, in order
        self.dropped_tokens = 0  # tails cut off by crops, counted since this packer started
        self.packed_tokens = 0  # tokens placed in rows (padding excluded)
        if position is not None:
            self.next_doc = position["next"]
            for k in sorted(position["buffer"]):
                self._add(k)

    def _add(self, k: int) -> None:
        n = self.length(k)
        if n > self.row_len:
            self._long.append((k, n))
        else:
            bisect.insort(self._fitting, (n, k))

    def _top_up(self) -> None:
        while (len(self._fitting) < self.buffer_size
               and len(self._fitting) + len(self._long) < 2 * self.buffer_size):
            self._add(self.next_doc)
            self.next_doc += 1

    def plan_row(self) -> list[tuple[int, int]]:
        """The next row as (k, tokens taken from the start of document k), in row order.

        The tokens taken add up to row_len, or less without crop (the rest of the row is padding)."""
        plan: list[tuple[int, int]] = []
        self._top_up()
        if self._long:
            k, n = self._long.popleft()
            self._take(plan, k, n, self.row_len)
            return plan
        room = self.row_len
        while room:
            self._top_up()
            fits = bisect.bisect_right(self._fitting, (room, sys.maxsize))  # documents no longer than room
            if fits:  # the largest that fits, the earliest of that length
                n, k = self._fitting.pop(bisect.bisect_left(self._fitting, (self._fitting[fits - 1][0], -1)))
            elif not self.crop:
                break
            elif self._fitting:  # none fits: the shortest loses the least when cropped to the room left
                n, k = self._fitting.pop(0)
            else:  # only long documents are buffered (the read-ahead bound): the oldest fills the row
                k, n = self._long.popleft()
            room -= self._take(plan, k, n, room)
        return plan

    def _take(self, plan: list[tuple[int, int]], k: int, n: int, room: int) -> int:
        """Put document k (n tokens) into the plan, cropped to room; returns the tokens taken."""
        take = min(n, room)
        plan.append((k, take))
        self.dropped_tokens += n - take
        self.packed_tokens += take
        return take

    def placed(self) -> int:
        """Documents put in rows (whole or cropped) since the stream began."""
        return self.next_doc - len(self._fitting) - len(self._long)

    def position(self) -> Position:
        buffered = [k for _, k in self._fitting] + [k for k, _ in self._long]
        return {"next": self.next_doc, "buffer": sorted(buffered)}
