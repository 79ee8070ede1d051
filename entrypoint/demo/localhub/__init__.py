"""A local, stdlib-only Hugging Face Hub look-alike that the real huggingface_hub and hf_xet clients talk to.

It serves the part of the Hub HTTP API phoenix relies on: whoami, repo create/info (`expand=usedStorage`),
tree and commit listings, preupload, NDJSON commits, super-squash, LFS file listing and permanent deletion,
the git-LFS batch API (single-PUT uploads), Xet read/write tokens, `resolve` downloads with Range
support, and Storage Buckets (buckets.py). Point a client at it with `HF_ENDPOINT=<url>`; with hf_xet
installed, large files go through Xet.

Xet and storage model. A write token hands the client a fresh folder as its CAS (`casUrl` `local://<dir>`,
hf_xet's own local CAS: hf_xet locks that folder for the life of the client's session, so no folder is ever
shared between processes). The commit names each large file by sha256 only, as on the Hub; the server finds
the upload holding it in the shards hf_xet wrote, freezes that folder into a pack (hard links), and records
the file's Xet hash and pack. `resolve` answers such a file with `X-Xet-Hash` and an `xet-auth` link to a
read token for its pack (each read token gets its own hard-linked copy), and serves plain bytes with Range
to clients without Xet, from a blob rebuilt once from the pack with hf_xet and checked against its sha256.
The tree listing carries no `xetHash`, so clients ask per file. Storage is counted as on the Hub: every
large file (LFS or Xet) referenced by any stored commit of a repo, each content once; a delete commit frees
nothing, super-squash and permanent LFS deletion do (content nothing references any more is deleted); a
quota per namespace or repo (`set_quota`) answers 403 "Private repository storage limit reached".

The real Hub's terms (terms.py), each off by default; a test switches on what it needs (CLI flag in []):

- `credit_delay_s = S` [--credit-delay S]: storage a super-squash or LFS purge frees keeps counting for S
  seconds (the Hub: "within 36 hours", users report days). Two figures: counted (quotas, `usedStorage`,
  `storage_used(repo)`) and settled (`storage_settled(repo)`, and what `list_lfs_files` lists at once);
  `storage(owner)` gives both for a namespace, its repos and buckets together, or one id; `settle_storage()`
  lets the delay pass now. Bucket deletes free at once, as the Hub documents.
- `set_commit_quota(n, window_s=3600, buckets=False)` [--commit-quota N[/WINDOW_S], --commit-quota-buckets]:
  per user, a fixed window of n commit-like actions (commits, deletions included, super-squashes and LFS
  purges; bucket batches only with `buckets`); the next answer 429 "You have exceeded our hourly quotas for
  action: commit. We invite you to retry later." with `Retry-After`, `RateLimit: "api";r=0;t=N` and
  `RateLimit-Policy: "fixed window";"api";q=n;w=window`. An action counts once let through, even if it
  then fails (412, 403), as at a gateway; a 429 does not count.
- `trip_storage_patterns(ns)` / `unlock_storage(ns)` [--storage-locked NS]: the Hub's 403 "Your storage
  patterns tripped our internal systems! Please contact us at website@huggingface.co ..." on every commit
  or bucket batch of the namespace that adds a file, until unlocked; Xet uploads, deletes, squashes and
  reads go on (huggingface_hub#3325 met it at the commit, after the upload).
- `fail_xet_next(error, transfer, n=1)` [--xet-fault ERROR:TRANSFER]: the next Xet upload or download
  (repo or bucket) fails inside hf_xet: "auth" hands out an expired token for a CAS over HTTP and refuses
  hf_xet's refresh (401); "not_found" (downloads) leaves the xorbs out of the read token's CAS folder.
  hf_xet 1.8 lets neither XetAuthenticationError nor XetObjectNotFoundError out through huggingface_hub:
  uploads raise ConnectionError("... Auth error: Token refresh failed ..."), downloads RuntimeError("Task
  error: ... Auth error: Token refresh failed" / "... CAS object not found ...").
- `refuse_shared_names = True` [--refuse-shared-names]: creating a bucket whose id a model or dataset repo
  has, or a repo whose id a bucket has, answers 409 with the `url` of what holds the id, the shape of the
  Hub's "already created" answer, which `create_bucket`/`create_repo(exist_ok=True)` take for success.
- `gate(repo_id, repo_type)`: a gated repo; anyone may see it and list its files, only its owner download
  them (403 `GatedRepo`, the Hub's "Access to model X is restricted and you are not in the authorized list")

State lives in a data directory, so a server can be restarted over the same data:

    blobs/<sha256>                                          file contents, content-addressed
    xet/{uploads,packs,reads}/<id>/, xet/files/<xet hash>   local Xet CAS folders (see storage.py)
    repos/<model|dataset>/<ns>/<name>/repo.json             visibility, creation date, branch heads
    repos/<model|dataset>/<ns>/<name>/commits/<sha>.json    one immutable file tree per commit
    buckets/<ns>/<name>/bucket.json                         a bucket's files, visibility and Xet pack

Tests drive it through the Python API (`fail_next`, `cut_next`, `pause_next`, `fail_bucket_op`, `down`,
`throttle_bps`, byte counters, `request_log`, `set_quota`, `storage_used`, `bucket_size`, and the terms
above); `python -m entrypoint.demo.localhub --data DIR --port 0 --token TOKEN[:USER]` runs it standalone.
"""

from entrypoint.demo.localhub.common import HubError, LoggedRequest
from entrypoint.demo.localhub.server import LocalHub, main

__all__ = ["HubError", "LocalHub", "LoggedRequest", "main"]
