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

State lives in a data directory, so a server can be restarted over the same data:

    blobs/<sha256>                                          file contents, content-addressed
    xet/{uploads,packs,reads}/<id>/, xet/files/<xet hash>   local Xet CAS folders (see storage.py)
    repos/<model|dataset>/<ns>/<name>/repo.json             visibility, creation date, branch heads
    repos/<model|dataset>/<ns>/<name>/commits/<sha>.json    one immutable file tree per commit
    buckets/<ns>/<name>/bucket.json                         a bucket's files, visibility and Xet pack

Tests drive it through the Python API (`fail_next`, `cut_next`, `pause_next`, `fail_bucket_op`, `down`,
`throttle_bps`, byte counters, `request_log`, `set_quota`, `storage_used`, `bucket_size`);
`python -m entrypoint.demo.localhub --data DIR --port 0 --token TOKEN[:USER]` runs it standalone.
"""

from entrypoint.demo.localhub.common import HubError, LoggedRequest
from entrypoint.demo.localhub.server import LocalHub, main

__all__ = ["HubError", "LocalHub", "LoggedRequest", "main"]
