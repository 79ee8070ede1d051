"""Opening the store HF_CHECKPOINT_STORE selects, and claiming a launch generation (fencing older launches).

Kept apart from `store` (the types both stores import), so that no store imports a module that imports it.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from typing import Any

from huggingface_hub import CommitOperationAdd

from entrypoint.hub.bucket_store import BucketStore
from entrypoint.hub.client import Hub, generation_of
from entrypoint.hub.config import GENERATION_FILE, HubConfig, local_generation
from entrypoint.hub.errors import HeadMoved, HubError
from entrypoint.hub.repo_store import RepoStore
from entrypoint.hub.store import CheckpointStore, lineage_for_claim
from entrypoint.logs import kv
from trainer import checkpoint_layout as layout

log = logging.getLogger("phoenix.hub")


def open_store(cfg: HubConfig, hub: Hub | None = None) -> CheckpointStore:
    """The store HF_CHECKPOINT_STORE selects (a bucket unless `repo`), over `hub` (the git repo) if given."""
    hub = hub or Hub(cfg)
    return BucketStore(cfg, hub) if cfg.in_bucket else RepoStore(cfg, hub)


def claim_generation(cfg: HubConfig, hub: Hub | None = None, *, attempts: int = 5) -> int:
    """Fence off every older launch: commit generation max(Hub, volume) + 1, then write it to the volume.

    Called by the entrypoint at launch. The commit carries parent_commit, so two launches racing for the
    same number cannot both win: the loser re-reads and takes the next one. With a bucket the claim also
    freezes the lineage (see `store`'s first lines). Raises HubError if the Hub cannot be reached; the
    volume is then left unchanged.
    """
    store = open_store(cfg, hub)
    store.ensure()
    path = cfg.run_path(GENERATION_FILE)
    for _ in range(attempts):
        view = store.view()
        generation = max(generation_of(view.claim), local_generation(cfg)) + 1
        # When and where, for the one line a fenced instance prints (trainer.fencing).
        claim: dict[str, Any] = {"generation": generation, "host": socket.gethostname(),
                                 "claimed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if cfg.in_bucket:
            claim["lineage"] = lineage_for_claim(view.claim, view)
        body = json.dumps(claim, indent=1, sort_keys=True).encode() + b"\n"
        try:
            store.hub.commit(
                [CommitOperationAdd(path_in_repo=path, path_or_fileobj=body)],
                f"claim generation {generation} of {cfg.model_tag}",
                parent=view.head,
            )
        except HeadMoved:
            continue
        layout.write_json_atomic(cfg.local(path), {"generation": generation})
        log.info(kv(event="generation_claimed", generation=generation, repo=cfg.repo_id))
        return generation
    raise HubError(f"could not claim a generation on {cfg.repo_id}: the repo kept changing under us")
