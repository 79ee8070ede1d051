"""Storage Buckets on entrypoint.demo.localhub, driven by the real huggingface_hub + hf_xet over HTTP."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url
from huggingface_hub.errors import BucketBatchError, BucketNotFoundError, HfHubHTTPError

from entrypoint.demo.localhub import LocalHub

KiB = 1024


def _api(hub, token: str | bool | None = None) -> HfApi:
    return HfApi(endpoint=hub.url, token=hub.token if token is None else token)


@pytest.fixture
def bucket(hub) -> str:
    bucket_id = f"{hub.user}/ckpts"
    _api(hub).create_bucket(bucket_id, private=True)
    return bucket_id


def _rebuilt_files(hub) -> list[str]:
    """Bucket files the server had to rebuild from Xet (plain GETs, copies); an upload itself needs none."""
    return os.listdir(hub.server.data_dir / "xet" / "files")


def test_create_exist_ok_conflict_info_and_delete(hub) -> None:
    api = _api(hub)
    url = api.create_bucket("runs", private=True)  # no namespace: the caller's own
    assert url.bucket_id == f"{hub.user}/runs" and url.url == f"{hub.url}/buckets/{hub.user}/runs"
    assert api.create_bucket(f"{hub.user}/runs", private=True, exist_ok=True).bucket_id == url.bucket_id
    with pytest.raises(HfHubHTTPError) as err:
        api.create_bucket(f"{hub.user}/runs")
    assert err.value.response.status_code == 409
    info = api.bucket_info(f"{hub.user}/runs")
    assert (info.id, info.private, info.size, info.total_files) == (f"{hub.user}/runs", True, 0, 0)
    assert [b.id for b in api.list_buckets()] == [f"{hub.user}/runs"]
    api.delete_bucket(f"{hub.user}/runs")
    with pytest.raises(BucketNotFoundError):
        api.bucket_info(f"{hub.user}/runs")
    api.delete_bucket(f"{hub.user}/runs", missing_ok=True)


def test_batch_add_list_paths_info_and_download_bitwise(hub, bucket: str, tmp_path: Path) -> None:
    api = _api(hub)
    weights, optim = os.urandom(300 * KiB), tmp_path / "optim.pt"
    optim.write_bytes(os.urandom(120 * KiB))
    api.batch_bucket_files(bucket, add=[(weights, "step1/model.pt"), (optim, "step1/optim.pt"),
                                        (b'{"step": 1}', "latest.json")])

    top = list(api.list_bucket_tree(bucket))
    assert [(i.type, i.path) for i in top] == [("file", "latest.json"), ("directory", "step1")]
    files = {i.path: i for i in api.list_bucket_tree(bucket, recursive=True) if i.type == "file"}
    assert {p: f.size for p, f in files.items()} == {
        "latest.json": 11, "step1/model.pt": 300 * KiB, "step1/optim.pt": 120 * KiB}
    step1 = [i.path for i in api.list_bucket_tree(bucket, prefix="step1/")]
    assert step1 == ["step1/model.pt", "step1/optim.pt"]
    assert list(api.list_bucket_tree(bucket, prefix="nothing/")) == []

    infos = list(api.get_bucket_paths_info(bucket, ["step1/model.pt", "missing.pt"]))
    assert [(i.path, i.xet_hash) for i in infos] == [("step1/model.pt", files["step1/model.pt"].xet_hash)]
    meta = api.get_bucket_file_metadata(bucket, "step1/model.pt")
    assert (meta.size, meta.xet_file_data.file_hash) == (300 * KiB, files["step1/model.pt"].xet_hash)
    assert meta.xet_file_data.refresh_route == f"{hub.url}/api/buckets/{bucket}/xet-read-token"

    out = tmp_path / "restored"
    api.download_bucket_files(bucket, [(p, out / p) for p in files])  # one read token for every file
    assert (out / "step1/model.pt").read_bytes() == weights
    assert (out / "step1/optim.pt").read_bytes() == optim.read_bytes()
    assert (out / "latest.json").read_bytes() == b'{"step": 1}'
    assert _rebuilt_files(hub) == []  # the upload folder became the bucket's store as it was

    hub.server.bucket_page_size = 2  # the client follows the Link header page after page
    assert len(list(api.list_bucket_tree(bucket, recursive=True))) == 4
    assert sum(r.path.endswith("/tree") for r in hub.server.request_log) >= 2


def test_replace_in_place_and_delete_frees_storage_at_once(hub, bucket: str, tmp_path: Path) -> None:
    api = _api(hub)
    old, new = os.urandom(200 * KiB), os.urandom(50 * KiB)
    api.batch_bucket_files(bucket, add=[(old, "model.pt"), (b"x" * 1000, "keep.txt")])
    api.batch_bucket_files(bucket, add=[(new, "model.pt")])  # a second upload on top of the first's store
    info = api.bucket_info(bucket)
    assert (info.size, info.total_files) == (50 * KiB + 1000, 2)
    api.download_bucket_files(bucket, [(p, tmp_path / p) for p in ("model.pt", "keep.txt")])
    assert (tmp_path / "model.pt").read_bytes() == new and (tmp_path / "keep.txt").read_bytes() == b"x" * 1000
    assert _rebuilt_files(hub) == []  # each batch froze its own upload folder into the store

    stamp = 1_700_000_000  # the client's mtime is what the bucket keeps
    os.utime(tmp_path / "keep.txt", (stamp, stamp))
    api.batch_bucket_files(bucket, add=[(tmp_path / "keep.txt", "keep.txt")], delete=["model.pt", "gone.pt"])
    assert api.bucket_info(bucket).size == 1000 == hub.server.bucket_size(bucket)
    [keep] = api.get_bucket_paths_info(bucket, ["keep.txt"])
    assert keep.mtime is not None and keep.mtime.timestamp() == stamp
    api.batch_bucket_files(bucket, delete=["keep.txt"])
    assert (api.bucket_info(bucket).size, api.bucket_info(bucket).total_files) == (0, 0)


def test_quota_refuses_the_batch_that_would_exceed_it(hub, bucket: str) -> None:
    api = _api(hub)
    hub.server.set_quota(bucket, 100 * KiB)
    api.batch_bucket_files(bucket, add=[(os.urandom(60 * KiB), "step1.pt")])
    with pytest.raises(HfHubHTTPError) as err:
        api.batch_bucket_files(bucket, add=[(os.urandom(60 * KiB), "step2.pt")])
    assert err.value.response.status_code == 403
    assert "Private repository storage limit reached" in str(err.value)
    assert list(api.get_bucket_paths_info(bucket, ["step2.pt"])) == []
    assert api.bucket_info(bucket).size == 60 * KiB
    api.batch_bucket_files(bucket, add=[(os.urandom(60 * KiB), "step2.pt")], delete=["step1.pt"])  # room made
    assert api.bucket_info(bucket).size == 60 * KiB

    hub.server.set_quota(bucket, None)
    hub.server.set_quota(hub.user, 100 * KiB)  # a namespace quota counts its repos and buckets together
    with pytest.raises(HfHubHTTPError) as err:
        api.batch_bucket_files(bucket, add=[(os.urandom(60 * KiB), "step3.pt")])
    assert err.value.response.status_code == 403


def test_partial_and_total_failures_raise_bucket_batch_error(hub, bucket: str) -> None:
    api = _api(hub)
    hub.server.fail_bucket_op("step2/", message="Injected storage error")
    with pytest.raises(BucketBatchError) as err:
        api.batch_bucket_files(bucket, add=[(b"a" * 100, "step2/a.pt"), (b"b" * 100, "step1/b.pt")])
    assert err.value.response.status_code == 200
    assert err.value.failures == [{"path": "step2/a.pt", "error": "Injected storage error"}]
    listed = api.list_bucket_tree(bucket, recursive=True)
    assert [f.path for f in listed if f.type == "file"] == ["step1/b.pt"]

    hub.server.fail_bucket_op("step3/")
    with pytest.raises(BucketBatchError) as err:
        api.batch_bucket_files(bucket, add=[(b"c" * 100, "step3/c.pt")])
    assert err.value.response.status_code == 422
    assert api.bucket_info(bucket).total_files == 1


def test_batch_5xx_is_retried_and_xet_token_refusal_fails_before_any_batch(hub, bucket: str) -> None:
    api = _api(hub)
    hub.server.fail_next(1, 503, path_contains=f"/api/buckets/{bucket}/batch")
    api.batch_bucket_files(bucket, add=[(b"a" * 100, "a.pt")])
    assert [r.status for r in hub.server.request_log if r.path.endswith("/batch")] == [503, 200]

    hub.server.fail_next(1, 403, path_contains=f"/api/buckets/{bucket}/xet-write-token")
    with pytest.raises(Exception, match="403"):  # hf_xet raises it as a ConnectionError
        api.batch_bucket_files(bucket, add=[(b"b" * 100, "b.pt")])
    assert [r.status for r in hub.server.request_log if r.path.endswith("/batch")] == [503, 200]
    assert api.bucket_info(bucket).total_files == 1


def test_private_bucket_auth(hub, bucket: str) -> None:
    _api(hub).batch_bucket_files(bucket, add=[(b"secret", "a.txt")])
    with pytest.raises(BucketNotFoundError) as err:
        _api(hub, False).bucket_info(bucket)
    assert err.value.response.status_code == 401  # anonymous: 401, as on the Hub
    hub.server.add_token("hf_other_user", "someone-else")
    with pytest.raises(BucketNotFoundError) as err:
        list(_api(hub, "hf_other_user").list_bucket_tree(bucket))
    assert err.value.response.status_code == 404  # another user: the bucket is not revealed
    with pytest.raises(HfHubHTTPError) as err:
        _api(hub, "hf_other_user").create_bucket(f"{hub.user}/theirs")
    assert err.value.response.status_code == 403

    public = f"{hub.user}/public"
    _api(hub).create_bucket(public)
    _api(hub).batch_bucket_files(public, add=[(b"open", "a.txt")])
    assert _api(hub, False).bucket_info(public).total_files == 1
    with pytest.raises(HfHubHTTPError) as err:
        _api(hub, "hf_other_user").batch_bucket_files(public, delete=["a.txt"])
    assert err.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as err:
        _api(hub, False).delete_bucket(public)
    assert err.value.response.status_code == 401


def test_plain_http_range_get_and_head(hub, bucket: str) -> None:
    data = os.urandom(100 * KiB)
    _api(hub).batch_bucket_files(bucket, add=[(data, "dir/model.pt")])
    url, auth = f"{hub.url}/buckets/{bucket}/resolve/dir/model.pt", {"Authorization": f"Bearer {hub.token}"}
    head = httpx2.head(url, headers=auth)
    assert head.status_code == 200 and int(head.headers["Content-Length"]) == len(data)
    assert head.headers["X-Xet-Hash"] and 'rel="xet-auth"' in head.headers["Link"]
    part = httpx2.get(url, headers=auth | {"Range": "bytes=1000-1999"})
    assert (part.status_code, part.content) == (206, data[1000:2000])
    assert httpx2.get(url, headers=auth).content == data
    assert httpx2.get(url).status_code == 401
    assert httpx2.get(url.replace("model.pt", "absent.pt"), headers=auth).status_code == 404


def test_concurrent_batches_both_land(hub, bucket: str, tmp_path: Path) -> None:
    """A batch held after its upload while another one lands: its upload folder lacks the other's files,
    so the server merges them into the store; both are then downloadable through one read token."""
    api, first, second = _api(hub), os.urandom(40 * KiB), os.urandom(40 * KiB)
    pause = hub.server.pause_next(f"/api/buckets/{bucket}/batch")
    held = threading.Thread(target=api.batch_bucket_files, args=(bucket,), kwargs={"add": [(first, "a.pt")]})
    held.start()
    assert pause.reached.wait(30)
    api.batch_bucket_files(bucket, add=[(second, "b.pt")])
    pause.release()
    held.join(30)
    assert len(_rebuilt_files(hub)) == 1  # a.pt, merged into the store b.pt's batch had made
    api.download_bucket_files(bucket, [(p, tmp_path / p) for p in ("a.pt", "b.pt")])
    assert (tmp_path / "a.pt").read_bytes() == first and (tmp_path / "b.pt").read_bytes() == second


def test_copy_between_buckets_and_restart_keep_the_files(hub, bucket: str, tmp_path: Path) -> None:
    api = _api(hub)
    data = os.urandom(80 * KiB)
    api.batch_bucket_files(bucket, add=[(data, "model.pt")])
    api.create_bucket(f"{hub.user}/backup", private=True)
    api.copy_files(f"hf://buckets/{bucket}/model.pt", f"hf://buckets/{hub.user}/backup/model.pt")
    repo = api.create_repo(f"{hub.user}/final", private=True).repo_id  # a server-side copy from a repo too
    api.upload_file(path_or_fileobj=data, path_in_repo="model.pt", repo_id=repo)
    xet_hash = get_hf_file_metadata(hf_hub_url(repo, "model.pt"), token=hub.token).xet_file_data.file_hash
    api.batch_bucket_files(f"{hub.user}/backup", copy=[("model", repo, xet_hash, "from_repo.pt")])
    hub.server.stop()
    with LocalHub(hub.server.data_dir, tokens={hub.token: hub.user}) as again:  # a new instance, same data
        api = HfApi(endpoint=again.url, token=hub.token)
        assert api.bucket_info(f"{hub.user}/backup").size == 2 * len(data)  # each file counts
        copies = [(p, tmp_path / p) for p in ("model.pt", "from_repo.pt")]
        api.download_bucket_files(f"{hub.user}/backup", copies)
        api.download_bucket_files(bucket, [("model.pt", tmp_path / "orig.pt")])
    assert (tmp_path / "model.pt").read_bytes() == data == (tmp_path / "orig.pt").read_bytes()
    assert (tmp_path / "from_repo.pt").read_bytes() == data
