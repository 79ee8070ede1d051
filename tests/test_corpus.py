"""bench/corpus.py writes shards the trainer reads as it reads the Hub's: train shards, then validation
last; and man pages come out as text, not troff. (~1 s: a handful of short documents.)"""

from pathlib import Path

import pyarrow.parquet as pq
from huggingface_hub import constants

from bench.corpus import ROW_GROUP_DOCS, man_page_text, write_shards
from trainer.data import ShardStore


def test_shards_read_back_as_train_then_validation(tmp_path: Path, monkeypatch):
    # The volume's shards, as the CPU comparison trains. The library reads HF_HUB_OFFLINE once, at import:
    # setting the variable here would leave ShardStore asking the Hub (minutes of retries in the suite).
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    docs = [f"document {i} " + "word " * (i % 50) for i in range(2 * ROW_GROUP_DOCS + 10)]
    val_docs = 7
    paths = write_shards(docs, tmp_path, shard_chars=200_000, val_docs=val_docs)  # two train shards
    store = ShardStore(tmp_path, announce=False)
    assert [tmp_path / name for name in [*store.train_shards, store.val_shard]] == paths
    assert pq.read_table(store.path(store.val_shard))["text"].to_pylist() == docs[:val_docs]
    assert len(store.train_shards) == 2
    train = [text for name in store.train_shards
             for text in pq.read_table(store.path(name))["text"].to_pylist()]
    assert train == docs[val_docs:]  # every document once, in order
    assert pq.ParquetFile(paths[0]).metadata.row_group(0).num_rows == ROW_GROUP_DOCS


def test_man_page_markup_is_stripped():
    page = '.\\" a comment\n.TH LS 1\n.SH NAME\nls \\- list \\fBdirectory\\fR contents\n.B \\-a\n'
    assert man_page_text(page) == "NAME\nls - list directory contents\n-a"
