"""The data pipeline: shards from the (local) Hub or the volume, and best-fit packed rows whose global
batch and position ignore the world size."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil

import pyarrow.parquet as pq
import pytest
import torch

from bench.packing import crop_share, long_tailed_lengths, phoenix_best_fit, reference_best_fit
from entrypoint.demo.synthetic import synthetic_document, write_shards
from tests.helpers import DATASET_REPO, publish_corpus, run_trainer
from trainer.data import CLIMBMIX_DATASET_REPO, DataError, ShardStore, dataset_dir
from trainer.dataloader import (
    DistributedTokenLoader,
    DocumentSource,
    lane_state,
    loader_meta,
    validation_rows,
)
from trainer.tokenizer import train_tokenizer

SEQ_LEN = 256  # the generated documents are 22-517 tokens: some fit a row whole, some are cropped
LANES = 8  # rows per global step
BUFFER = 8  # small, so that the buffer's bound shapes the packing


@pytest.fixture(scope="module")
def local_data(tmp_path_factory):
    """Shards on disk with their listing cached (no Hub needed), and a small tokenizer."""
    root = tmp_path_factory.mktemp("data")
    paths = write_shards(root / "base_data", num_shards=3, docs_per_shard=120, row_group_size=16)
    (root / "base_data" / "shards.json").write_text(json.dumps({"shards": [p.name for p in paths]}))
    rng = random.Random(0)
    tokenizer = train_tokenizer((synthetic_document(rng) for _ in range(300)), 512, root / "tokenizer")
    return root, tokenizer


@pytest.fixture(scope="module")
def train_documents(local_data) -> list[list[int]]:
    """Every training document (BOS + tokens) in stream order, tokenized here, not by the loader."""
    root, tokenizer = local_data
    texts = [t for name in ("shard_00000.parquet", "shard_00001.parquet")
             for t in pq.read_table(root / "base_data" / name).column("text").to_pylist()]
    return tokenizer.encode_batch(texts, prepend_bos=True)


def make_loader(local_data, rank, world_size, device_batch_size=2, lane_state=None):
    root, tokenizer = local_data
    per_rank = LANES // world_size
    docs = DocumentSource(ShardStore(root / "base_data"), tokenizer, LANES,
                          range(rank * per_rank, (rank + 1) * per_rank))
    return DistributedTokenLoader(docs, SEQ_LEN, device_batch_size, LANES, rank, world_size, lane_state,
                                  buffer_docs=BUFFER)


def global_batch(loaders) -> torch.Tensor:
    """Inputs and last targets of one optimizer step across all ranks and micro-batches, in lane order."""
    return torch.cat([torch.cat([x, y[:, -1:]], dim=1) for loader in loaders for x, y in loader.next_step()])


def merged_state(loaders) -> list[dict]:
    """Every rank's lanes merged, written as in meta.json and read back as a resume does."""
    positions = {lane: pos for loader in loaders for lane, pos in loader.state_dict().items()}
    return lane_state(json.loads(json.dumps(loader_meta(positions, LANES))), "checkpoint")


def best_fit_reference(documents, row_len, buffer_size, num_rows):
    """trainer.packing's rule written plainly, on a list in stream order: read on until buffer_size held
    documents fit a row, or twice that many are held; a row starts with the first held document longer
    than a row, cropped; else the largest that fits goes in (the first on ties) until none fits, then the
    shortest of those that fit a row (the first on ties; none: the first held) is cropped. Returns rows and
    dropped tokens."""
    stream = iter(documents)
    held, rows, dropped = [], [], 0

    def top_up():
        while sum(len(d) <= row_len for d in held) < buffer_size and len(held) < 2 * buffer_size:
            held.append(next(stream))

    for _ in range(num_rows):
        top_up()
        longer = [i for i, doc in enumerate(held) if len(doc) > row_len]
        if longer:
            doc = held.pop(longer[0])
            rows.append(doc[:row_len])
            dropped += len(doc) - row_len
            continue
        row = []
        while len(row) < row_len:
            top_up()
            room = row_len - len(row)
            fitting = [i for i, doc in enumerate(held) if len(doc) <= room]
            if fitting:
                row += held.pop(max(fitting, key=lambda i: len(held[i])))
                continue
            shorter = [i for i, doc in enumerate(held) if len(doc) <= row_len]
            doc = held.pop(min(shorter, key=lambda i: len(held[i])) if shorter else 0)
            row += doc[:room]
            dropped += len(doc) - room
        rows.append(row)
    return rows, dropped


def test_each_lane_packs_its_documents_best_fit_long_ones_first_across_epochs(local_data, train_documents,
                                                                                caplog):
    steps = 60  # 240 documents, 30 per lane: lanes go through 2 wraps
    loader = make_loader(local_data, 0, 1, device_batch_size=LANES)
    with caplog.at_level(logging.INFO, logger="phoenix.data"):
        rows = torch.stack([global_batch([loader]) for _ in range(steps)], dim=1)  # lane, step, token
    loader.close()
    bos = local_data[1].bos_id
    assert bool((rows[:, :, 0] == bos).all())  # every row starts at a document start
    dropped = 0
    for lane in range(LANES):
        stream = (train_documents[(lane + k * LANES) % len(train_documents)] for k in range(10**6))
        expected, lane_dropped = best_fit_reference(stream, SEQ_LEN + 1, BUFFER, steps)
        assert rows[lane].tolist() == expected
        dropped += lane_dropped
    assert dropped > 0  # some documents were cropped, and the loader counted exactly those tokens
    assert loader.crop_fraction() == pytest.approx(dropped / (dropped + rows.numel()))
    wraps = [r.getMessage() for r in caplog.records if "event=epoch_wrap" in r.getMessage()]
    assert wraps == [f"event=epoch_wrap epoch={e} documents_per_epoch=240" for e in (2, 3)]


def test_no_token_is_lost_but_the_cropped_tails(local_data, train_documents):
    loader = make_loader(local_data, 0, 1, device_batch_size=LANES)
    rows = torch.stack([global_batch([loader]) for _ in range(12)], dim=1).tolist()
    state = merged_state([loader])
    loader.close()
    bos = local_data[1].bos_id
    dropped = 0
    for lane in range(LANES):
        document = {k: train_documents[(lane + k * LANES) % len(train_documents)]
                    for k in range(state[lane]["next"])}
        segments = []  # each row split where a document starts (at every BOS): (tokens, ends the row)
        for row in rows[lane]:
            starts = [i for i, token in enumerate(row) if token == bos] + [len(row)]
            segments += [(row[a:b], b == len(row)) for a, b in zip(starts, starts[1:], strict=False)]
        unmatched = {k: d for k, d in document.items() if k not in state[lane]["buffer"]}
        cut = []
        for segment, ends_row in segments:  # documents packed whole
            k = next((k for k, d in unmatched.items() if d == segment), None)
            if k is None:
                assert ends_row  # only a row's last document may be cut, and only at the row's end
                cut.append(segment)
            else:
                del unmatched[k]
        for segment in sorted(cut, key=len, reverse=True):  # crops: each a prefix of one taken document
            k = next(k for k, d in unmatched.items() if d[:len(segment)] == segment)
            dropped += len(unmatched.pop(k)) - len(segment)
        assert not unmatched  # every document taken is in the rows, whole or cropped, or still buffered
        assert BUFFER - 1 <= len(state[lane]["buffer"]) <= 2 * BUFFER
    assert dropped > 0  # and the loader's count of dropped tokens is exactly the tails found here
    assert dropped / (dropped + LANES * 12 * (SEQ_LEN + 1)) == pytest.approx(loader.crop_fraction())


def test_global_batch_is_identical_on_1_2_and_4_ranks(local_data):
    single = make_loader(local_data, 0, 1)
    pair = [make_loader(local_data, rank, 2) for rank in range(2)]
    quad = [make_loader(local_data, rank, 4) for rank in range(4)]
    assert (single.grad_accum_steps, pair[0].grad_accum_steps, quad[0].grad_accum_steps) == (4, 2, 1)
    for _ in range(6):
        expected = global_batch([single])
        assert torch.equal(global_batch(pair), expected)
        assert torch.equal(global_batch(quad), expected)
    # Ranks read disjoint documents: each tokenizes only its own lanes' ones.
    seen = [{i for cached in loader.docs._cache.values() for i in cached} for loader in pair]
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert all(i % LANES < 4 for i in seen[0]) and all(i % LANES >= 4 for i in seen[1])
    for loader in [single, *pair, *quad]:
        loader.close()


def test_state_names_every_rows_continuation_across_world_sizes_and_epochs(local_data, train_documents):
    reference = make_loader(local_data, 0, 1)
    expected = [global_batch([reference]) for _ in range(100)]  # ~2.5 epochs of these documents
    reference.close()

    for stop in (4, 57):  # within the first epoch; after the wrap, lanes' buffers holding both epochs
        pair = [make_loader(local_data, rank, 2) for rank in range(2)]
        for _ in range(stop):
            global_batch(pair)
        state = merged_state(pair)
        # Mid-buffer: lanes hold documents that fit a row and ones longer than a row, waiting to start one.
        held = [len(train_documents[(lane + k * LANES) % len(train_documents)])
                for lane in range(LANES) for k in state[lane]["buffer"]]
        assert min(held) <= SEQ_LEN + 1 < max(held)
        for loader in pair:
            loader.close()
        resumed = make_loader(local_data, 0, 1, lane_state=state)  # 2 ranks -> 1 rank
        quad = [make_loader(local_data, rank, 4, lane_state=state) for rank in range(4)]  # 2 -> 4
        for step in range(stop, stop + 3):
            assert torch.equal(global_batch([resumed]), expected[step])
            assert torch.equal(global_batch(quad), expected[step])
        for loader in [resumed, *quad]:
            loader.close()


def test_a_checkpoint_of_another_packing_cannot_resume(tmp_path):
    old = {"lanes": [[3, 17]] * LANES}  # written by the concatenating loader
    with pytest.raises(DataError, match="written with data packing concatenated rows .* start anew"):
        lane_state(old, tmp_path)
    former = {"packing": "bos-bestfit-64", "lanes": [{"next": 70, "buffer": "3 17"}] * LANES}
    with pytest.raises(DataError, match="written with data packing bos-bestfit-64, this trainer packs bos"):
        lane_state(former, tmp_path)


@pytest.mark.parametrize("seq_len", [256, 2048])
def test_crops_within_2_points_of_nanochats_refill_on_a_long_tailed_stream(seq_len):
    """nanochat's buffer (1000 documents, topped up 128 at a time) against a lane's, on the same stream;
    crop % counts what the documents still buffered will lose at the least too (bench/packing.py)."""
    lengths = long_tailed_lengths(200_000)
    rows = 20_000 if seq_len == 256 else 3_000
    phoenix = crop_share(phoenix_best_fit(lengths, seq_len + 1, rows), seq_len + 1)
    nanochat = crop_share(reference_best_fit(lengths, seq_len + 1, rows), seq_len + 1)
    assert phoenix <= nanochat + 0.02, (phoenix, nanochat)


def test_validation_rows_are_fixed_and_start_at_documents(local_data):
    root, tokenizer = local_data
    store = ShardStore(root / "base_data")
    rows = validation_rows(store, tokenizer, SEQ_LEN, 5)
    assert rows.shape == (5, SEQ_LEN + 1)
    assert bool((rows[:, 0] == tokenizer.bos_id).all())
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


def test_climbmix_is_selectable_and_kept_apart_from_fineweb(hub, tmp_path):
    fineweb = write_shards(tmp_path / "fineweb", 2, 10, seed=1)
    climbmix = write_shards(tmp_path / "climbmix", 3, 10, seed=2)
    hub.server.publish_dataset(DATASET_REPO, {p.name: p for p in fineweb})
    hub.server.publish_dataset(CLIMBMIX_DATASET_REPO, {p.name: p for p in climbmix})
    base = tmp_path / "volume"
    stores = {repo: ShardStore(dataset_dir(base, repo), repo)
              for repo in (DATASET_REPO, CLIMBMIX_DATASET_REPO)}
    assert stores[DATASET_REPO].data_dir == base / "base_data"  # the seed's folder, unchanged
    assert stores[CLIMBMIX_DATASET_REPO].data_dir == base / "base_data_climbmix"  # nanochat's folder
    for repo, paths in ((DATASET_REPO, fineweb), (CLIMBMIX_DATASET_REPO, climbmix)):
        store = stores[repo]
        assert store.val_shard == paths[-1].name  # the last shard is validation, as in nanochat
        assert store.path(store.train_shards[0]).read_bytes() == paths[0].read_bytes()


def test_offline_or_failing_hub_lists_the_shards_on_the_volume_with_one_warning(hub, tmp_path, caplog):
    from huggingface_hub import constants

    paths = write_shards(tmp_path / "base_data", 3, 10)
    names = [p.name for p in paths]
    with caplog.at_level(logging.WARNING, logger="phoenix.data"):
        hub.server.fail_next(1, status=501, path_contains="/tree/")  # a proxy in the way: nothing cached
        assert ShardStore(tmp_path / "base_data", DATASET_REPO, attempts=1).shard_names() == names
        before = len(hub.server.request_log)
        with pytest.MonkeyPatch.context() as offline:
            offline.setattr(constants, "HF_HUB_OFFLINE", True)
            store = ShardStore(tmp_path / "base_data", DATASET_REPO)
            assert store.train_shards == names[:2] and store.val_shard == names[2]
            paths[0].unlink()
            with pytest.raises(DataError, match="shard_00000.parquet is not in .* HF_HUB_OFFLINE=1: unset"):
                store.path("shard_00000.parquet")
        assert hub.server.request_log[before:] == []  # offline means no request at all
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert "reason=HfHubHTTPError" in warnings[0] and "reason=HF_HUB_OFFLINE=1" in warnings[1]
    assert all("event=offline_shards repo=karpathy/fineweb-edu-100b-shuffle shards=3" in w for w in warnings)
    assert not (tmp_path / "base_data" / "shards.json").exists()  # a partial listing is not pinned


def test_trainer_runs_offline_from_the_shards_on_the_volume(local_data, tmp_path):
    root, _ = local_data
    base = tmp_path / "volume"
    shutil.copytree(root / "tokenizer", base / "tokenizer")
    shutil.copytree(root / "base_data", base / "base_data", ignore=shutil.ignore_patterns("shards.json"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9",  # nothing listens
           "HF_HOME": str(tmp_path / "hf_home"), "WANDB_MODE": "offline"}
    code, out = run_trainer(base, env, "--vocab-size", "512", "--num-iterations", "3", "--eval-every", "3",
                            "--save-every", "3")
    assert code == 0, out
    assert out.count("event=offline_shards") == 1 and "reason=HF_HUB_OFFLINE=1" in out
    assert "base stage finished at step 3" in out and "Traceback" not in out


def test_missing_dataset_repo_is_one_clear_error(hub, tmp_path):
    with pytest.raises(DataError, match="'nobody/no-such-data' not found on the Hub: set DATASET_REPO"):
        ShardStore(tmp_path / "base_data", "nobody/no-such-data").shard_names()


def test_unreachable_hub_is_one_clear_error(hub, tmp_path):
    hub.server.down = True  # huggingface_hub itself retries a refused connection for ~23 s
    with pytest.raises(DataError, match="no shards reachable"):
        ShardStore(tmp_path / "base_data", DATASET_REPO, attempts=1).shard_names()
