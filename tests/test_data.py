"""The data pipeline: shards from the (local) Hub, and a loader whose global batch ignores world size."""

from __future__ import annotations

import json
import random

import pytest
import torch

from entrypoint.synthetic import synthetic_document, write_shards
from tests.helpers import DATASET_REPO, publish_corpus
from trainer.data import DataError, DistributedTokenLoader, DocumentSource, ShardStore, validation_rows
from trainer.tokenizer import train_tokenizer

SEQ_LEN = 32
LANES = 8  # rows per global step


@pytest.fixture(scope="module")
def local_data(tmp_path_factory):
    """Shards on disk with their listing cached (no Hub needed), and a small tokenizer."""
    root = tmp_path_factory.mktemp("data")
    paths = write_shards(root / "base_data", num_shards=3, docs_per_shard=120, row_group_size=16)
    (root / "base_data" / "shards.json").write_text(json.dumps({"shards": [p.name for p in paths]}))
    rng = random.Random(0)
    tokenizer = train_tokenizer((synthetic_document(rng) for _ in range(300)), 512, root / "tokenizer")
    return root, tokenizer


def make_loader(local_data, rank, world_size, device_batch_size=2, lane_state=None):
    root, tokenizer = local_data
    per_rank = LANES // world_size
    docs = DocumentSource(ShardStore(root / "base_data"), tokenizer, LANES,
                          range(rank * per_rank, (rank + 1) * per_rank))
    return DistributedTokenLoader(docs, SEQ_LEN, device_batch_size, LANES, rank, world_size, lane_state)


def global_batch(loaders) -> torch.Tensor:
    """Inputs of one optimizer step across all ranks and micro-batches, in lane order."""
    return torch.cat([x for loader in loaders for x, _ in loader.next_step()])


def test_global_batch_is_identical_for_world_size_1_and_2(local_data):
    single = make_loader(local_data, 0, 1)
    pair = [make_loader(local_data, rank, 2) for rank in range(2)]
    assert (single.grad_accum_steps, pair[0].grad_accum_steps) == (4, 2)  # accumulation adjusts
    for _ in range(6):
        assert torch.equal(global_batch([single]), global_batch(pair))


def test_targets_are_inputs_shifted_by_one_and_rows_continue(local_data):
    loader = make_loader(local_data, 0, 1, device_batch_size=LANES)
    (x1, y1), = loader.next_step()
    (x2, _), = loader.next_step()
    assert torch.equal(x1[:, 1:], y1[:, :-1])
    # The last target of a row is the first input of the same lane's next row: no token is skipped.
    assert torch.equal(y1[:, -1], x2[:, 0])


def test_ranks_read_disjoint_documents(local_data):
    loaders = [make_loader(local_data, rank, 2) for rank in range(2)]
    for _ in range(5):
        global_batch(loaders)
    seen = [{doc for cached in loader.docs._cache.values() for doc in cached} for loader in loaders]
    assert seen[0] and seen[1]
    assert not seen[0] & seen[1]
    assert all(doc % LANES < 4 for doc in seen[0]) and all(doc % LANES >= 4 for doc in seen[1])


def test_state_names_the_exact_next_token_across_world_sizes(local_data):
    reference = make_loader(local_data, 0, 1)
    expected = [global_batch([reference]) for _ in range(7)]

    pair = [make_loader(local_data, rank, 2) for rank in range(2)]
    for _ in range(4):
        global_batch(pair)
    merged = {lane: pos for loader in pair for lane, pos in loader.state_dict().items()}
    lane_state = [merged[lane] for lane in range(LANES)]

    resumed = make_loader(local_data, 0, 1, lane_state=lane_state)  # resume 2 ranks -> 1 rank
    for step in range(4, 7):
        assert torch.equal(global_batch([resumed]), expected[step])


def test_validation_rows_are_fixed(local_data):
    root, tokenizer = local_data
    store = ShardStore(root / "base_data")
    rows = validation_rows(store, tokenizer, SEQ_LEN, 5)
    assert rows.shape == (5, SEQ_LEN + 1)
    assert torch.equal(rows, validation_rows(store, tokenizer, SEQ_LEN, 5))
    with pytest.raises(DataError, match="lower --eval-tokens"):
        validation_rows(store, tokenizer, SEQ_LEN, 10**6)


def test_shard_download_retries_after_a_server_error(hub, tmp_path):
    publish_corpus(hub.server, tmp_path / "shards", num_shards=2, docs_per_shard=20)
    hub.server.fail_next(1, status=500, path_contains="shard_00000.parquet", method="GET")
    store = ShardStore(tmp_path / "base_data", DATASET_REPO)
    path = store.path("shard_00000.parquet")
    assert path.read_bytes() == (tmp_path / "shards" / "shard_00000.parquet").read_bytes()
    statuses = [r.status for r in hub.server.request_log if r.path.endswith("shard_00000.parquet")
                and r.method == "GET"]
    assert statuses[0] == 500 and statuses[-1] == 200


def test_present_shard_is_not_downloaded_again(hub, tmp_path):
    publish_corpus(hub.server, tmp_path / "shards", num_shards=2, docs_per_shard=20)
    first = ShardStore(tmp_path / "base_data", DATASET_REPO)
    first.shard_names()
    first.path("shard_00000.parquet")
    before = len(hub.server.request_log)
    again = ShardStore(tmp_path / "base_data", DATASET_REPO)  # a restarted trainer
    assert again.shard_names() == ["shard_00000.parquet", "shard_00001.parquet"]
    again.path("shard_00000.parquet")
    assert hub.server.request_log[before:] == []


def test_a_changed_dataset_repo_is_listed_and_downloaded_anew(hub, tmp_path):
    publish_corpus(hub.server, tmp_path / "shards", num_shards=2, docs_per_shard=20)
    ShardStore(tmp_path / "base_data", DATASET_REPO).path("shard_00000.parquet")
    other = tmp_path / "other_shards"
    other.mkdir()
    (other / "shard_00000.parquet").write_bytes((tmp_path / "shards" / "shard_00001.parquet").read_bytes())
    (other / "shard_00001.parquet").write_bytes((tmp_path / "shards" / "shard_00000.parquet").read_bytes())
    hub.server.publish_dataset("someone/other-corpus", {p.name: p for p in other.iterdir()})
    store = ShardStore(tmp_path / "base_data", "someone/other-corpus")
    assert store.path("shard_00000.parquet").read_bytes() == (other / "shard_00000.parquet").read_bytes()
    listing = json.loads((tmp_path / "base_data" / "shards.json").read_text())
    assert listing["repo_id"] == "someone/other-corpus"


def test_missing_dataset_repo_is_one_clear_error(hub, tmp_path):
    with pytest.raises(DataError, match="'nobody/no-such-data' not found on the Hub: set DATASET_REPO"):
        ShardStore(tmp_path / "base_data", "nobody/no-such-data").shard_names()


def test_unreachable_hub_is_one_clear_error(hub, tmp_path):
    hub.server.down = True  # huggingface_hub itself retries a refused connection for ~23 s
    with pytest.raises(DataError, match="no shards reachable"):
        ShardStore(tmp_path / "base_data", DATASET_REPO, attempts=1).shard_names()
