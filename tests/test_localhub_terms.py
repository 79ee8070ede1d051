"""localhub on the real Hub's terms, each rule switched on, driven by the real huggingface_hub + hf_xet."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from huggingface_hub import CommitOperationDelete, HfApi, hf_hub_download
from huggingface_hub.errors import BucketNotFoundError, HfHubHTTPError, RepositoryNotFoundError
from huggingface_hub.utils import parse_ratelimit_headers

from entrypoint.demo.localhub.terms import COMMIT_QUOTA_MESSAGE, STORAGE_PATTERNS_MESSAGE, Storage

KiB = 1024


def _api(hub, token: str | None = None) -> HfApi:
    return HfApi(endpoint=hub.url, token=token or hub.token)


def _upload(hub, repo: str, path: str, data: bytes) -> None:
    _api(hub).upload_file(path_or_fileobj=data, path_in_repo=path, repo_id=repo)


def _download(hub, repo: str, path: str, cache: Path) -> bytes:
    return Path(hf_hub_download(repo, path, endpoint=hub.url, token=hub.token, cache_dir=cache)).read_bytes()


@pytest.fixture
def repo(hub) -> str:
    """A private model repo holding one 50 KiB and one 70 KiB file (through Xet)."""
    repo_id = f"{hub.user}/ckpt"
    _api(hub).create_repo(repo_id, private=True)
    _upload(hub, repo_id, "a/one.bin", os.urandom(50 * KiB))
    _upload(hub, repo_id, "b/two.bin", os.urandom(70 * KiB))
    return repo_id


def test_squashed_and_purged_storage_counts_until_its_credit_lands(hub, repo) -> None:
    api, server = _api(hub), hub.server
    server.credit_delay_s = 3600
    api.delete_folder("a", repo_id=repo)
    api.super_squash_history(repo)
    assert len(api.list_repo_commits(repo)) == 1  # the history is gone at once...
    assert api.repo_info(repo, expand=["usedStorage"]).used_storage == server.storage_used(repo) == 120 * KiB
    assert server.storage_settled(repo) == sum(f.size for f in api.list_lfs_files(repo)) == 70 * KiB
    assert server.storage(hub.user) == Storage(counted=120 * KiB, settled=70 * KiB)
    # ...but the quota sees the counted figure: 40 KiB more would fit what is stored, not what is counted.
    server.set_quota(hub.user, 150 * KiB)
    with pytest.raises(HfHubHTTPError) as err:
        _upload(hub, repo, "c/three.bin", os.urandom(40 * KiB))
    assert err.value.response.status_code == 403 and "storage limit reached" in str(err.value)
    server.settle_storage()
    assert server.storage_used(repo) == 70 * KiB
    _upload(hub, repo, "c/three.bin", os.urandom(40 * KiB))
    # A purge is credited late too, after `credit_delay_s` seconds of wall time.
    server.credit_delay_s = 1.0
    api.permanently_delete_lfs_files(repo, [f for f in api.list_lfs_files(repo) if f.filename[:2] == "b/"])
    assert server.storage(hub.user) == Storage(counted=110 * KiB, settled=40 * KiB)
    time.sleep(1.1)
    assert server.storage_used(repo) == 40 * KiB


def test_bucket_deletes_free_at_once_and_a_namespace_counts_repos_as_counted(hub, repo) -> None:
    api, server = _api(hub), hub.server
    server.credit_delay_s = 3600
    bucket = f"{hub.user}/runs"
    api.create_bucket(bucket, private=True)
    api.batch_bucket_files(bucket, add=[(os.urandom(30 * KiB), "step1/model.bin")])
    api.batch_bucket_files(bucket, delete=["step1/model.bin"])
    assert api.bucket_info(bucket).size == server.bucket_size(bucket) == 0  # no credit to wait for
    api.create_commit(repo, [CommitOperationDelete("b/")], commit_message="prune")
    api.super_squash_history(repo)
    assert server.storage(hub.user) == Storage(counted=120 * KiB, settled=50 * KiB)
    server.set_quota(hub.user, 140 * KiB)  # the bucket's 30 KiB fit what is stored, not what is counted
    with pytest.raises(HfHubHTTPError) as err:
        api.batch_bucket_files(bucket, add=[(os.urandom(30 * KiB), "step2/model.bin")])
    assert err.value.response.status_code == 403
    server.settle_storage()
    api.batch_bucket_files(bucket, add=[(os.urandom(30 * KiB), "step2/model.bin")])
    assert server.storage(hub.user) == Storage(counted=80 * KiB, settled=80 * KiB)


def test_the_hourly_commit_quota_answers_429_with_the_hubs_words_and_headers(hub, repo) -> None:
    api, server = _api(hub), hub.server
    bucket = f"{hub.user}/runs"
    api.create_bucket(bucket)
    server.set_commit_quota(2, window_s=4)
    _upload(hub, repo, "x.txt", b"x")
    api.create_commit(repo, [CommitOperationDelete("x.txt")], commit_message="delete")  # a delete counts
    for refused in (lambda: _upload(hub, repo, "y.txt", b"y"), lambda: api.super_squash_history(repo),
                    lambda: api.permanently_delete_lfs_files(repo, list(api.list_lfs_files(repo))[:1])):
        with pytest.raises(HfHubHTTPError) as err:
            refused()
        response = err.value.response
        assert response.status_code == 429 and COMMIT_QUOTA_MESSAGE in str(err.value)
        limit = parse_ratelimit_headers(response.headers)
        wait = int(response.headers["Retry-After"])
        assert limit is not None and (limit.resource_type, limit.remaining, limit.limit) == ("api", 0, 2)
        assert limit.reset_in_seconds == wait and limit.window_seconds == 4 and 1 <= wait <= 4
    assert len(list(api.list_lfs_files(repo))) == 2  # nothing refused was done
    api.batch_bucket_files(bucket, add=[(b"m", "m.txt")])  # bucket batches are no commits...
    server.add_token("hf_other", "someone-else")  # ...and the quota is each user's own
    other = _api(hub, "hf_other")
    other.create_repo("someone-else/r")
    other.upload_file(path_or_fileobj=b"o", path_in_repo="o.txt", repo_id="someone-else/r")
    time.sleep(wait)  # the window ends
    _upload(hub, repo, "y.txt", b"y")
    server.set_commit_quota(1, window_s=2, buckets=True)  # a stricter Hub, for tests that want one
    api.batch_bucket_files(bucket, add=[(b"n", "n.txt")])
    api.batch_bucket_files(bucket, add=[(b"p", "p.txt")])  # huggingface_hub waits out a batch's 429
    batches = [r.status for r in server.request_log if r.path.endswith("/batch")]
    assert batches[-3:] == [200, 429, 200]


def test_tripped_storage_patterns_refuse_new_files_until_unlocked(hub, repo, tmp_path) -> None:
    api, server = _api(hub), hub.server
    bucket = f"{hub.user}/runs"
    api.create_bucket(bucket)
    server.trip_storage_patterns(hub.user)
    for _ in range(2):  # sticky: a retry meets it again, after uploading the bytes again
        with pytest.raises(HfHubHTTPError) as err:
            _upload(hub, repo, "c/three.bin", os.urandom(40 * KiB))
        assert err.value.response.status_code == 403 and STORAGE_PATTERNS_MESSAGE in str(err.value)
    assert [r.status for r in server.request_log if "/xet-write-token/" in r.path][-2:] == [200, 200]
    with pytest.raises(HfHubHTTPError) as err:
        api.batch_bucket_files(bucket, add=[(b"m", "m.txt")])
    assert err.value.response.status_code == 403 and STORAGE_PATTERNS_MESSAGE in str(err.value)
    api.create_commit(repo, [CommitOperationDelete("a/")], commit_message="prune")  # freeing is allowed
    api.super_squash_history(repo)
    assert _download(hub, repo, "b/two.bin", tmp_path / "cache")  # and reading
    server.unlock_storage(hub.user)
    _upload(hub, repo, "c/three.bin", os.urandom(40 * KiB))
    api.batch_bucket_files(bucket, add=[(b"m", "m.txt")])


def test_a_refused_xet_token_refresh_fails_the_next_upload_and_download(hub, repo, tmp_path) -> None:
    """hf_xet 1.8, as huggingface_hub 2.x calls it, lets no XetAuthenticationError out: the refused refresh
    comes in a middleware error: a ConnectionError on upload, a RuntimeError (a failed task) on download."""
    api, server = _api(hub), hub.server
    bucket = f"{hub.user}/runs"
    api.create_bucket(bucket)
    api.batch_bucket_files(bucket, add=[(b"w" * 20 * KiB, "w.bin")])
    def bucket_upload() -> None:  # as the sidecar does: the bucket is listed first
        list(api.list_bucket_tree(bucket))
        api.batch_bucket_files(bucket, add=[(os.urandom(KiB), "v.bin")])

    for transfer, error_type, call in (
        ("upload", ConnectionError, lambda: _upload(hub, repo, "c/three.bin", os.urandom(40 * KiB))),
        ("upload", ConnectionError, bucket_upload),
        ("download", RuntimeError, lambda: _download(hub, repo, "b/two.bin", tmp_path / "c1")),
        ("download", RuntimeError, lambda: api.download_bucket_files(bucket, [("w.bin", tmp_path / "w")])),
    ):
        server.fail_xet_next("auth", transfer)
        with pytest.raises(error_type, match="Auth error: Token refresh failed"):
            call()
        call()  # the next attempt is served as usual
    assert (tmp_path / "w").read_bytes() == b"w" * 20 * KiB
    assert "c/three.bin" in api.list_repo_files(repo)


def test_xet_objects_gone_from_the_cas_fail_the_next_download(hub, repo, tmp_path) -> None:
    api, server = _api(hub), hub.server
    bucket = f"{hub.user}/runs"
    api.create_bucket(bucket)
    api.batch_bucket_files(bucket, add=[(b"w" * 20 * KiB, "w.bin")])
    for call in (lambda: _download(hub, repo, "b/two.bin", tmp_path / "c1"),
                 lambda: api.download_bucket_files(bucket, [("w.bin", tmp_path / "w.bin")])):
        server.fail_xet_next("not_found", "download")
        with pytest.raises(RuntimeError, match="CAS object not found"):  # not XetObjectNotFoundError (above)
            call()
        call()
    assert len(_download(hub, repo, "b/two.bin", tmp_path / "c2")) == 70 * KiB
    with pytest.raises(ValueError, match="no Xet fault"):
        server.fail_xet_next("not_found", "upload")  # hf_xet's upload path reads no object back


def test_a_bucket_and_a_repo_cannot_share_an_id_when_the_hub_refuses_it(hub, repo) -> None:
    api, server = _api(hub), hub.server
    assert api.create_bucket(repo).bucket_id == repo  # localhub's default: separate names, as far as is known
    api.delete_bucket(repo)
    server.refuse_shared_names = True
    with pytest.raises(HfHubHTTPError) as err:
        api.create_bucket(repo)
    assert err.value.response.status_code == 409 and err.value.response.json()["url"] == f"{hub.url}/{repo}"
    # huggingface_hub takes the 409 for "exists already": no error, and no bucket.
    assert api.create_bucket(repo, exist_ok=True).bucket_id == repo
    with pytest.raises(BucketNotFoundError):
        api.bucket_info(repo)
    bucket = f"{hub.user}/runs"
    api.create_bucket(bucket)
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(bucket, repo_type="dataset")
    assert err.value.response.status_code == 409
    api.create_repo(bucket, repo_type="dataset", exist_ok=True)  # swallowed the same way
    with pytest.raises(RepositoryNotFoundError):
        api.repo_info(bucket, repo_type="dataset")


def test_the_standalone_server_takes_each_rule_as_a_flag(tmp_path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "entrypoint.demo.localhub", "--data", str(tmp_path / "hub"), "--token",
         "hf_cli:cli", "--token", "hf_locked:locked", "--credit-delay", "600", "--commit-quota", "3/600",
         "--refuse-shared-names", "--storage-locked", "locked", "--xet-fault", "auth:upload"],
        stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip().removeprefix("url=")
        api, locked = HfApi(endpoint=url, token="hf_cli"), HfApi(endpoint=url, token="hf_locked")
        api.create_repo("cli/r")
        with pytest.raises(HfHubHTTPError) as err:
            api.create_bucket("cli/r")
        assert err.value.response.status_code == 409
        with pytest.raises(ConnectionError, match="Token refresh failed"):  # the armed Xet fault
            api.upload_file(path_or_fileobj=os.urandom(20 * KiB), path_in_repo="w.bin", repo_id="cli/r")
        api.upload_file(path_or_fileobj=os.urandom(20 * KiB), path_in_repo="w.bin", repo_id="cli/r")
        api.create_commit("cli/r", [CommitOperationDelete("w.bin")], commit_message="prune")
        api.super_squash_history("cli/r")  # the quota's third commit-like action
        assert api.repo_info("cli/r", expand=["usedStorage"]).used_storage == 20 * KiB  # credited later
        with pytest.raises(HfHubHTTPError) as err:
            api.super_squash_history("cli/r")
        assert err.value.response.status_code == 429
        locked.create_repo("locked/r")
        with pytest.raises(HfHubHTTPError, match="storage patterns"):
            locked.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="locked/r")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
