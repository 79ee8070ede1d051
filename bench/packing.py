"""Packing yield: tokens cropped from pretraining rows, padding in SFT rows, and SFT useful tok/s on CPU.

    python bench/packing.py          # ~3 minutes on 2 busy cores

Pretraining: one long-tailed synthetic stream of document lengths (lognormal, median 493 tokens, sigma
1.1: a fifth of its tokens lie beyond a 2,049-token row) packed at T=256 and T=2048 by phoenix's
LanePacker and by two references of the rule nanochat's dataloader.py and phoenix's former loader
share (largest that fits, else crop the shortest), differing in their buffer: nanochat's (1000
documents, topped up 128 at a time) and phoenix's former one (64, one at a time). The crop % counts the
tails cut off plus what the documents still buffered will lose at the least (their part beyond a row),
over every token read: a buffer keeps its longest documents, so counting cut tails alone flatters a big
one over a short stream (nanochat's own count is printed beside it). The state is the checkpoint's
loader record (JSON) for 256 lanes, a d20 run's rows at T=2048, after 200 steps.

SFT: synthetic chats (lognormal, median ~300 tokens, sigma 0.8) at T=2048; padding % of the batch's
token slots. Before: phoenix's former batches (32 conversations a step, micro-batches of 16 padded to
the longest); after: ChatLoader's packed rows (16 a step); nanochat: its chat_sft rule (buffer 100, pad
when none fits), whose buffer keeps every conversation longer than a row for good. Useful tok/s: forward
and backward of the tiny preset's model at T=2048 on this CPU over the same conversations, in turns.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainer.chat_data import ChatLoader, collate, render
from trainer.dataloader import LanePacker, loader_meta
from trainer.model import build_model, config_for_depth
from trainer.tokenizer import train_tokenizer

WORDS = ("quiet", "rapid", "gentle", "heavy", "bright", "simple", "distant", "curious", "careful", "ancient",
         "river", "garden", "planet", "engine", "forest", "signal", "bridge", "ocean", "cloud", "apple")


def long_tailed_lengths(count: int, seed: int = 0) -> list[int]:
    """Document lengths in tokens (BOS included), lognormal around a median of e^6.2 = 493."""
    rng = np.random.default_rng(seed)
    return np.maximum(2, rng.lognormal(6.2, 1.1, count)).astype(int).tolist()


@dataclass
class Packed:
    dropped: int  # tokens cut off by crops
    packed: int  # tokens placed in rows
    buffered: list[tuple[int, int]]  # (k, length) of the documents read but not yet packed
    next_doc: int  # documents read


def reference_best_fit(lengths: list[int], row_len: int, num_rows: int, buffer_size: int = 1000,
                       refill: int = 128) -> Packed:
    """nanochat's best fit on document lengths: while fewer than buffer_size are buffered, read `refill`
    more; the largest that fits the room left goes in (the earliest on ties), else the shortest is cropped
    to it. refill=1, buffer_size=64 is phoenix's former loader."""
    buffer: list[tuple[int, int]] = []  # (length, k), sorted
    dropped = next_doc = 0
    for _ in range(num_rows):
        room = row_len
        while room:
            while len(buffer) < buffer_size:
                for _ in range(refill):
                    bisect.insort(buffer, (lengths[next_doc], next_doc))
                    next_doc += 1
            fits = bisect.bisect_right(buffer, (room, sys.maxsize))
            n, k = buffer.pop(bisect.bisect_left(buffer, (buffer[fits - 1][0], -1)) if fits else 0)
            dropped += max(0, n - room)
            room -= min(n, room)
    return Packed(dropped, num_rows * row_len, [(k, n) for n, k in buffer], next_doc)


def phoenix_best_fit(lengths: list[int], row_len: int, num_rows: int) -> Packed:
    """phoenix's LanePacker on the same lengths."""
    lane = LanePacker(lambda k: np.zeros(lengths[k], dtype=np.int32), row_len)
    for _ in range(num_rows):
        lane.row()
    position = lane.position()
    return Packed(lane.packer.dropped_tokens, lane.packer.packed_tokens,
                  [(k, lengths[k]) for k in position["buffer"]], position["next"])


def crop_share(result: Packed, row_len: int) -> float:
    """Tokens lost (cut off, or sure to be: buffered beyond a row) over the tokens of every document read."""
    beyond = sum(max(0, n - row_len) for _, n in result.buffered)
    return (result.dropped + beyond) / (result.dropped + result.packed + sum(n for _, n in result.buffered))


def state_bytes(lengths: list[int], lanes: int, steps: int, row_len: int) -> tuple[int, int]:
    """Bytes of the loader record in meta.json after `steps` steps of `lanes` rows: (former, phoenix)."""
    former, now = [], {}
    for lane in range(lanes):
        docs = lengths[lane::lanes]
        old = reference_best_fit(docs, row_len, steps, buffer_size=64, refill=1)
        former.append({"next": old.next_doc, "buffer": " ".join(str(k) for k, _ in sorted(old.buffered))})
        packer = LanePacker(lambda k, docs=docs: np.zeros(docs[k], dtype=np.int32), row_len)
        for _ in range(steps):
            packer.row()
        now[lane] = packer.position()
    return (len(json.dumps({"packing": "bos-bestfit-64", "lanes": former})),
            len(json.dumps(loader_meta(now, lanes))))


def pretraining(quick: bool) -> None:
    lengths = long_tailed_lengths(3_000_000)
    for seq_len, rows in ((256, 100_000), (2048, 40_000)):
        rows //= 10 if quick else 1
        row_len = seq_len + 1
        floor = sum(max(0, n - row_len) for n in lengths) / sum(lengths)
        nanochat = reference_best_fit(lengths, row_len, rows)
        former = reference_best_fit(lengths, row_len, rows, buffer_size=64, refill=1)
        phoenix = phoenix_best_fit(lengths, row_len, rows)
        own_count = nanochat.dropped / (nanochat.dropped + nanochat.packed)
        print(f"crop T={seq_len} rows={rows}: phoenix {crop_share(phoenix, row_len):.1%} (before "
              f"{crop_share(former, row_len):.1%}), nanochat {crop_share(nanochat, row_len):.1%} "
              f"(its own count of cut tails {own_count:.1%}); beyond a row in the stream {floor:.1%}")
    steps = 20 if quick else 200
    former_bytes, phoenix_bytes = state_bytes(lengths, 256, steps, 2049)
    print(f"loader state, 256 lanes after {steps} steps at T=2048: phoenix {phoenix_bytes:,} bytes "
          f"(before {former_bytes:,}); nanochat keeps ~1,100 documents a rank and resumes approximately")


# --------------------------------------------------------------------------------------------------- SFT


def long_tailed_chats(count: int, seed: int = 0, median_words: float = 115, sigma: float = 0.8
                      ) -> list[list[dict[str, str]]]:
    """One exchange each, the assistant repeating n words (n lognormal): ~2.6n tokens rendered (with the
    360-token vocabulary sft() trains), a median of ~300."""
    rng = random.Random(seed)
    chats = []
    for _ in range(count):
        words = " ".join(rng.choices(WORDS, k=max(1, int(rng.lognormvariate(math.log(median_words), sigma)))))
        chats.append([{"role": "user", "content": f"Repeat after me: {words}"},
                      {"role": "assistant", "content": words}])
    return chats


def nanochat_sft_padding(lengths: list[int], row_len: int, num_rows: int, buffer_size: int = 100
                         ) -> tuple[float, int]:
    """nanochat's chat_sft rows on conversation lengths: (padding share, conversations longer than a row
    left in its buffer, which it never takes)."""
    stream: Iterator[int] = iter(lengths)
    buffer: list[int] = []  # sorted lengths
    padding = 0
    for _ in range(num_rows):
        room = row_len
        while True:
            while len(buffer) < buffer_size:
                bisect.insort(buffer, next(stream))
            fits = bisect.bisect_right(buffer, room)
            if not fits:
                break
            room -= buffer.pop(fits - 1)
        padding += room
    return padding / (num_rows * row_len), sum(n > row_len for n in buffer)


def sft(quick: bool) -> None:
    seq_len, count = 2048, 4000
    chats = long_tailed_chats(count)
    tokenizer = train_tokenizer([" ".join(WORDS), "Repeat after me:"] * 20, 360,
                                Path(tempfile.mkdtemp(prefix="phoenix-packing-")))
    rendered = [render(tokenizer, messages, row) for row, messages in enumerate(chats)]
    Step = tuple[list[tuple[torch.Tensor, torch.Tensor]], int]  # micro-batches, input tokens not padding
    before: list[Step] = [([collate(rendered[i + j:i + j + 16], tokenizer.bos_id, seq_len) for j in (0, 16)],
                           sum(min(len(ids), seq_len + 1) - 1 for ids, _ in rendered[i:i + 32]))
                          for i in range(0, count - 31, 32)]  # the former batches: 32 conversations a step
    loader = ChatLoader(lambda rows: [chats[r] for r in rows], count, tokenizer, rows_per_step=16,
                        device_batch_size=16, max_seq_len=seq_len, rank=0, world_size=1, seed=0)
    after: list[Step] = [(batch.micro_batches, batch.num_tokens)
                         for batch in (loader.next_step() for _ in range(len(before) // 2))]
    lengths = [len(ids) for ids, _ in rendered]
    nanochat, stuck = nanochat_sft_padding(lengths * 2, seq_len + 1, 16 * len(after))

    def padding(steps: list[Step]) -> float:
        return 1 - sum(tokens for _, tokens in steps) / sum(x.numel() for step, _ in steps for x, _ in step)

    print(f"sft padding T={seq_len}: phoenix {padding(after):.1%} (before {padding(before):.1%}), nanochat "
          f"{nanochat:.1%} over as many rows, its buffer then holding {stuck} conversations longer than a "
          f"row ({sum(n > seq_len + 1 for n in lengths)} of {count} are)")

    torch.manual_seed(0)
    tiny = config_for_depth(2, tokenizer.vocab_size, seq_len, aspect_ratio=32, head_dim=32)  # the tiny preset
    model = build_model(tiny, "cpu")
    timings = {"before": [0.0, 0], "after": [0.0, 0]}
    for i in range(2 if quick else 6):  # in turns, so a busy neighbour slows both alike
        for name, steps in (("before", before), ("after", after)):
            micro_batches, tokens = steps[i]
            start = time.perf_counter()
            for x, y in micro_batches:
                model(x, y, loss_reduction="sum").backward()
            if i:  # the first of each is a warm-up
                timings[name][0] += time.perf_counter() - start
                timings[name][1] += tokens
    after_rate, before_rate = (tokens / seconds for seconds, tokens in (timings["after"], timings["before"]))
    print(f"sft useful tok/s on CPU (tiny preset's model, T={seq_len}, {torch.get_num_threads()} threads): "
          f"phoenix {after_rate:,.0f} (before {before_rate:,.0f}), {after_rate / before_rate:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the rows, fewer timed steps")
    args = parser.parse_args()
    pretraining(args.quick)
    sft(args.quick)


if __name__ == "__main__":
    main()
