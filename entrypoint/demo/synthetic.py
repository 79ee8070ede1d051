"""Synthetic FineWeb-like parquet shards (one `text` column) for the offline demo and the tests.

The text comes from a small random grammar: varied enough to train a tokenizer on, regular enough
that a tiny model's loss visibly falls within a few dozen steps.
"""

from __future__ import annotations

import random
from pathlib import Path

_NOUNS = ("model", "river", "student", "teacher", "garden", "planet", "engine", "city", "forest", "signal",
          "market", "library", "cloud", "bridge", "village", "theory", "machine", "ocean", "farmer", "lesson")
_VERBS = ("explains", "follows", "builds", "measures", "crosses", "teaches", "changes", "finds", "carries",
          "describes", "protects", "studies")
_ADJECTIVES = ("small", "bright", "ancient", "quiet", "careful", "rapid", "green", "simple", "heavy",
               "curious", "distant", "gentle")
_OPENERS = ("In the morning,", "Every year,", "According to the book,", "After the storm,", "In most cases,")
_SYLLABLES = ("ka", "lo", "mi", "ren", "to", "sa", "vel", "dor", "qui", "na", "bes", "tra", "ul", "fen", "zo",
              "gri", "pa", "mon", "shi", "er")
# Made-up names drawn with a Zipf-like skew, so a BPE has thousands of merges to learn, as on real text.
_NAMES = tuple(sorted({"".join(random.Random(i).choices(_SYLLABLES, k=random.Random(-i).randint(2, 4)))
                       for i in range(6000)}))


def _sentence(rng: random.Random) -> str:
    subject = f"the {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}"
    if rng.random() < 0.5:
        subject += f" of {_NAMES[int(len(_NAMES) * rng.random() ** 3)].capitalize()}"
    obj = f"the {rng.choice(_NOUNS)}"
    sentence = f"{subject} {rng.choice(_VERBS)} {obj}"
    if rng.random() < 0.3:
        sentence = f"{rng.choice(_OPENERS)} {sentence}"
    if rng.random() < 0.2:
        sentence += f" {rng.randint(2, 1999)} times"
    return sentence[0].upper() + sentence[1:] + "."


def synthetic_document(rng: random.Random) -> str:
    return " ".join(_sentence(rng) for _ in range(rng.randint(3, 40)))


def write_shards(out_dir: Path, num_shards: int, docs_per_shard: int, seed: int = 0,
                 row_group_size: int = 64) -> list[Path]:
    """Write shard_00000.parquet ... ; the last one plays the validation split, as in FineWeb-edu."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for index in range(num_shards):
        texts = [synthetic_document(rng) for _ in range(docs_per_shard)]
        path = out_dir / f"shard_{index:05d}.parquet"
        pq.write_table(pa.table({"text": texts}), path, row_group_size=row_group_size)
        paths.append(path)
    return paths
