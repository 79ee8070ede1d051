"""Data loader throughput: tokens per second one rank's DistributedTokenLoader hands out, and its crop rate.

    python bench/loader.py --seq-len 2048 --lanes 256 --world-size 8     # one rank of an 8-GPU d20 run

Uses generated shards and a tokenizer trained on them (no network). Compare with what a GPU eats:
a d20 run on 8 H100s consumes roughly 1M tokens/s in all, i.e. ~125k per rank.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from entrypoint.demo.synthetic import synthetic_document, write_shards
from trainer.data import ShardStore
from trainer.dataloader import DistributedTokenLoader, DocumentSource
from trainer.tokenizer import train_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--lanes", type=int, default=256, help="rows per global step")
    parser.add_argument("--world-size", type=int, default=8)
    parser.add_argument("--device-batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="phoenix-loader-"))
    start = time.perf_counter()
    paths = write_shards(root / "base_data", num_shards=6, docs_per_shard=20_000, row_group_size=1024)
    (root / "base_data" / "shards.json").write_text(json.dumps({"shards": [p.name for p in paths]}))
    rng = random.Random(0)
    tokenizer = train_tokenizer((synthetic_document(rng) for _ in range(3000)), 4096, root / "tokenizer")
    print(f"setup {time.perf_counter() - start:.1f}s (shards + tokenizer)")

    per_rank = args.lanes // args.world_size
    docs = DocumentSource(ShardStore(root / "base_data"), tokenizer, args.lanes, range(per_rank))
    loader = DistributedTokenLoader(docs, args.seq_len, args.device_batch_size, args.lanes, 0,
                                    args.world_size)
    loader.next_step()  # first step: opens the shards, fills the queue
    start = time.perf_counter()
    for _ in range(args.steps):
        loader.next_step()
    seconds = time.perf_counter() - start
    loader.close()
    tokens = args.steps * per_rank * args.seq_len
    print(f"rank 0 of {args.world_size}: {per_rank} rows x {args.seq_len} per step, "
          f"{seconds / args.steps * 1000:.0f} ms/step, {tokens / seconds:,.0f} tok/s, "
          f"cropped {loader.crop_fraction():.1%} of the documents' tokens")


if __name__ == "__main__":
    main()
