"""Pretraining shards: fetched from the Hub onto the volume, or found there when the Hub is out of reach.

Shards (`shard_NNNNN.parquet`, one `text` column; the last shard is validation) are fetched on demand
into $NANOCHAT_BASE_DIR/base_data/ (base_data_climbmix/ for ClimbMix, as nanochat) with retries, never
twice, and the next ones are prefetched in the background so the GPU does not wait on the network.
When the Hub is unreachable or HF_HUB_OFFLINE=1, the shards already on the volume are used.
The loader that packs them into rows is trainer/dataloader.py.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq

from trainer.checkpoint_layout import write_json_atomic

log = logging.getLogger("phoenix.data")

DEFAULT_DATASET_REPO = "karpathy/fineweb-edu-100b-shuffle"
CLIMBMIX_DATASET_REPO = "karpathy/climbmix-400b-shuffle"  # nanochat's dataset since 2026-03
_SHARD_NAME = re.compile(r"^shard_\d{5}\.parquet$")
# Both datasets name their shards alike, so each gets its own folder (nanochat's names for these two).
_DATA_DIRS = {DEFAULT_DATASET_REPO: "base_data", CLIMBMIX_DATASET_REPO: "base_data_climbmix"}


def dataset_dir(base_dir: Path, repo_id: str) -> Path:
    """Where a dataset's shards live on the volume: one folder per dataset repo."""
    return Path(base_dir) / _DATA_DIRS.get(repo_id, "base_data_" + repo_id.replace("/", "--"))


class DataError(RuntimeError):
    """A data problem the user must fix (bad repo id, no shards reachable, data exhausted)."""


def gated(repo_id: str, variable: str) -> str:
    """A gated dataset is a read problem: someone has to accept its conditions, no retry can help."""
    return (f"dataset repo {repo_id!r} is gated and HF_TOKEN may not read it yet: accept its conditions on "
            f"its Hub page with the account of HF_TOKEN, or set {variable} to another dataset")


class ShardStore:
    """The dataset's parquet shards on the volume, downloaded from the Hub on first use."""

    def __init__(self, data_dir: Path, repo_id: str = DEFAULT_DATASET_REPO, attempts: int = 5,
                 prefetch: int = 2, announce: bool = True) -> None:
        self.data_dir = Path(data_dir)
        self.announce = announce  # warn when falling back to the volume's shards (one process says it)
        self.repo_id = repo_id
        self.attempts = attempts
        self.prefetch_depth = prefetch
        self._names: list[str] | None = None
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="shard-prefetch")
        self._pending: dict[str, Future[Path]] = {}
        self._lock = threading.Lock()
        self._offline_reason = ""

    def shard_names(self) -> list[str]:
        """All shard file names, sorted; the listing is cached on the volume so restarts need no Hub."""
        if self._names is None:
            listing = self.data_dir / "shards.json"
            cached = json.loads(listing.read_text()) if listing.exists() else None
            if cached is not None and cached.get("repo_id", self.repo_id) == self.repo_id:
                self._names = cached["shards"]
                return self._names
            if cached is not None:
                # Same file names, other data: the old repo's shards must not stand in for the new.
                stale = sorted(self.data_dir.glob("shard_*.parquet"))
                log.warning("dataset changed from=%s to=%s: re-listing, removing %d cached shards",
                            cached.get("repo_id"), self.repo_id, len(stale))
                for path in stale:
                    path.unlink()
                listing.unlink()
            if (names := self._list_remote()) is not None:
                self._names = names
                write_json_atomic(listing, {"repo_id": self.repo_id, "shards": self._names})
            else:  # not cached: a partial listing must not outlive the outage
                self._names = self._list_local()
        return self._names

    def _list_local(self) -> list[str]:
        names = sorted(p.name for p in self.data_dir.glob("shard_*.parquet") if _SHARD_NAME.match(p.name))
        if len(names) < 2:
            raise DataError(f"no shards reachable: listing {self.repo_id!r} failed ({self._offline_reason}) "
                            f"and {self.data_dir} has {len(names)} shards; check the network and HF_ENDPOINT")
        if self.announce:
            log.warning("event=offline_shards repo=%s shards=%d reason=%s: training from the shards on the "
                        "volume, the last one as validation", self.repo_id, len(names), self._offline_reason)
        return names

    def _list_remote(self) -> list[str] | None:
        """The Hub's shard names, or None when the Hub cannot be asked (unreachable, HF_HUB_OFFLINE=1)."""
        from huggingface_hub import HfApi, constants
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

        if constants.HF_HUB_OFFLINE:
            self._offline_reason = "HF_HUB_OFFLINE=1"
            return None
        last_error: Exception | None = None
        for attempt in range(self.attempts):
            try:
                files = HfApi().list_repo_files(self.repo_id, repo_type="dataset")
                break
            except GatedRepoError:
                raise DataError(gated(self.repo_id, "DATASET_REPO")) from None
            except RepositoryNotFoundError:
                raise DataError(f"dataset repo {self.repo_id!r} not found on the Hub: set DATASET_REPO to a "
                                "dataset with shard_NNNNN.parquet files") from None
            except Exception as exc:  # network errors come in many classes; all are retried
                last_error = exc
                time.sleep(min(2.0**attempt, 30.0))
        else:
            self._offline_reason = last_error.__class__.__name__
            return None
        names = sorted(f for f in files if _SHARD_NAME.match(f))
        if len(names) < 2:
            raise DataError(f"dataset repo {self.repo_id!r} has {len(names)} shard_NNNNN.parquet files; "
                            "need at least 2 (the last one is the validation split)")
        return names

    @property
    def train_shards(self) -> list[str]:
        return self.shard_names()[:-1]

    @property
    def val_shard(self) -> str:
        return self.shard_names()[-1]

    def path(self, name: str) -> Path:
        """Local path of a shard, downloading it now if needed (joining a prefetch already under way)."""
        self.shard_names()  # a cached file is this repo's only once the listing says so
        local = self.data_dir / name
        if local.exists():
            return local
        with self._lock:
            future = self._pending.get(name) or self._pool.submit(self._download, name)
            self._pending[name] = future
        return future.result()

    def prefetch(self, names: list[str]) -> None:
        with self._lock:
            for name in names:
                if name not in self._pending and not (self.data_dir / name).exists():
                    self._pending[name] = self._pool.submit(self._download, name)

    def _download(self, name: str) -> Path:
        from huggingface_hub import constants, hf_hub_download
        from huggingface_hub.errors import GatedRepoError

        if constants.HF_HUB_OFFLINE:
            raise DataError(f"{name} is not in {self.data_dir} and HF_HUB_OFFLINE=1: unset HF_HUB_OFFLINE or "
                            "copy the shards there")
        last_error: Exception | None = None
        for attempt in range(self.attempts):
            try:
                # local_dir downloads go to a .incomplete file first and are renamed when whole.
                return Path(hf_hub_download(self.repo_id, name, repo_type="dataset",
                                            local_dir=self.data_dir))
            except GatedRepoError:  # retrying cannot help: someone has to accept the dataset's conditions
                raise DataError(gated(self.repo_id, "DATASET_REPO")) from None
            except Exception as exc:  # retried: 5xx, resets, timeouts
                last_error = exc
                log.warning("shard download failed name=%s attempt=%d error=%s", name, attempt + 1,
                            exc.__class__.__name__)
                time.sleep(min(0.5 * 2.0**attempt, 30.0))
        raise DataError(f"could not download {name} from {self.repo_id!r} after {self.attempts} attempts "
                        f"({last_error.__class__.__name__}); check the network or HF_ENDPOINT")

    def iter_texts(self, max_chars: int, doc_chars: int) -> Iterator[str]:
        """Training texts from the first shards, each cut to `doc_chars`, up to `max_chars` of them (for
        tokenizer training, as nanochat's tok_train counts: the cut lengths, until past max_chars)."""
        seen = 0
        for name in self.train_shards:
            for batch in pq.ParquetFile(self.path(name)).iter_batches(columns=["text"]):
                for text in batch.column(0).to_pylist():
                    text = text[:doc_chars]
                    yield text
                    seen += len(text)
                    if seen > max_chars:
                        return
