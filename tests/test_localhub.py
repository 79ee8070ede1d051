"""entrypoint.demo.localhub driven by the real, unmocked huggingface_hub client."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

from entrypoint.demo.localhub import LocalHub

MiB = 1024 * 1024
SHARDS = "karpathy/fineweb-edu-100b-shuffle"


def _api(hub, token: str | bool | None = None) -> HfApi:
    return HfApi(endpoint=hub.url, token=hub.token if token is None else token)


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _resolve_gets(hub) -> list[tuple[str, int]]:
    return [(r.path, r.status) for r in hub.server.request_log if r.method == "GET" and "/resolve/" in r.path]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A small text file (regular upload) and a 200 KiB binary one (LFS upload)."""
    root = tmp_path / "upload"
    (root / "ckpt").mkdir(parents=True)
    (root / "README.txt").write_text("phoenix checkpoint\n")
    (root / "ckpt" / "model.bin").write_bytes(os.urandom(200 * 1024))
    return root


@pytest.fixture
def model_repo(hub, folder: Path) -> str:
    repo_id = f"{hub.user}/ckpt"
    _api(hub).create_repo(repo_id, private=True)
    _api(hub).upload_folder(repo_id=repo_id, folder_path=folder, commit_message="step 1")
    return repo_id


def test_whoami_and_invalid_token(hub) -> None:
    assert _api(hub).whoami()["name"] == hub.user
    with pytest.raises(HfHubHTTPError) as err:
        _api(hub, "hf_not_a_token").whoami()
    assert err.value.response.status_code == 401


def test_create_private_model_and_dataset_repos(hub) -> None:
    api = _api(hub)
    for repo_type in ("model", "dataset"):
        url = api.create_repo(f"{hub.user}/runs", repo_type=repo_type, private=True)
        assert url.repo_id == f"{hub.user}/runs" and url.repo_type == repo_type
        assert api.create_repo(f"{hub.user}/runs", repo_type=repo_type, private=True, exist_ok=True) == url
        with pytest.raises(HfHubHTTPError) as err:
            api.create_repo(f"{hub.user}/runs", repo_type=repo_type)
        assert err.value.response.status_code == 409
        info = api.repo_info(f"{hub.user}/runs", repo_type=repo_type)
        assert info.private is True and len(info.sha) == 40
        assert [s.rfilename for s in info.siblings] == [".gitattributes"]  # like the Hub's initial commit
    api.upload_file(
        path_or_fileobj=b"a,b\n", path_in_repo="x.csv", repo_id=f"{hub.user}/runs", repo_type="dataset"
    )
    path = hf_hub_download(
        f"{hub.user}/runs", "x.csv", repo_type="dataset", endpoint=hub.url, token=hub.token
    )
    assert Path(path).read_bytes() == b"a,b\n"


def test_upload_folder_tree_and_download_round_trip(hub, folder: Path, model_repo: str) -> None:
    api = _api(hub)
    binary, text = (folder / "ckpt" / "model.bin").read_bytes(), (folder / "README.txt").read_bytes()
    tree = {f.path: f for f in api.list_repo_tree(model_repo, recursive=True)}
    assert set(tree) == {".gitattributes", "README.txt", "ckpt", "ckpt/model.bin"}
    assert tree["README.txt"].size == len(text) and tree["README.txt"].lfs is None
    assert tree["README.txt"].blob_id == _git_sha1(text)
    lfs = tree["ckpt/model.bin"].lfs
    assert lfs is not None and lfs.sha256 == hashlib.sha256(binary).hexdigest() and lfs.size == len(binary)
    assert tree["ckpt/model.bin"].size == len(binary)
    assert [f.path for f in api.list_repo_tree(model_repo, "ckpt")] == ["ckpt/model.bin"]
    assert hub.server.bytes_uploaded == len(binary)  # through Xet; the text file went inline in the commit
    meta = get_hf_file_metadata(hf_hub_url(model_repo, "ckpt/model.bin", endpoint=hub.url), token=hub.token)
    assert meta.etag == hashlib.sha256(binary).hexdigest() and meta.size == len(binary)
    assert meta.xet_file_data is not None and "xet-read-token" in meta.xet_file_data.refresh_route
    for name, content, cache_name in (
        ("ckpt/model.bin", binary, meta.xet_file_data.file_hash),  # a Xet file is cached under its Xet hash
        ("README.txt", text, _git_sha1(text)),  # others under the etag
    ):
        path = Path(hf_hub_download(model_repo, name, endpoint=hub.url, token=hub.token))
        assert path.read_bytes() == content
        assert path.resolve().name == cache_name
    # The binary came through Xet (a resolve HEAD, then a read token for its pack), the text as plain bytes.
    assert hub.server.bytes_downloaded == len(text)
    assert [r.status for r in hub.server.request_log if "/xet-read-token/" in r.path] == [200]
    assert api.file_exists(model_repo, "ckpt/model.bin") and not api.file_exists(model_repo, "ckpt/other.bin")
    last = next(iter(api.list_repo_tree(model_repo, "ckpt", expand=True))).last_commit
    assert last is not None and last.title == "step 1"


def test_lfs_content_is_uploaded_once(hub, folder: Path, model_repo: str) -> None:
    api = _api(hub)
    binary = (folder / "ckpt" / "model.bin").read_bytes()
    head = api.repo_info(model_repo).sha
    before = hub.server.bytes_uploaded
    # Same file at the same path: preupload reports its oid, so the client skips it (no commit at all).
    api.upload_file(path_or_fileobj=binary, path_in_repo="ckpt/model.bin", repo_id=model_repo)
    assert api.repo_info(model_repo).sha == head
    # Same content at a new path: committed, and no new content is stored (the Hub dedups it).
    api.upload_file(path_or_fileobj=binary, path_in_repo="latest/model.bin", repo_id=model_repo)
    assert hub.server.bytes_uploaded == before
    assert "latest/model.bin" in api.list_repo_files(model_repo)
    path = hf_hub_download(model_repo, "latest/model.bin", endpoint=hub.url, token=hub.token)
    assert Path(path).read_bytes() == binary


def test_commit_with_deletions_and_stale_parent(hub, model_repo: str) -> None:
    api = _api(hub)
    head = api.repo_info(model_repo).sha
    ops = [CommitOperationAdd("step2/model.bin", os.urandom(20_000)), CommitOperationDelete("README.txt")]
    new = api.create_commit(model_repo, ops, commit_message="step 2", parent_commit=head)
    assert new.oid != head and len(new.oid) == 40 and new.repo_url.repo_id == model_repo
    api.create_commit(
        model_repo, [CommitOperationDelete("ckpt/")], commit_message="prune", parent_commit=new.oid
    )
    assert sorted(api.list_repo_files(model_repo)) == [".gitattributes", "step2/model.bin"]
    current = api.repo_info(model_repo).sha
    with pytest.raises(HfHubHTTPError) as err:  # `head` is two commits behind: the fence must hold
        api.create_commit(
            model_repo, [CommitOperationAdd("x.txt", b"x")], commit_message="late", parent_commit=head
        )
    assert err.value.response.status_code == 412
    assert api.repo_info(model_repo).sha == current
    titles = [c.title for c in api.list_repo_commits(model_repo)]
    assert titles == ["prune", "step 2", "step 1", "initial commit"]


def _raw(hub, method: str, path: str, body: object = None, token: str | None = None) -> tuple[int, dict]:
    """A request without huggingface_hub, to send what the client never would."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(hub.url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_lfs_objects_are_verified_before_anything_is_committed(hub, model_repo: str) -> None:
    head = _api(hub).repo_info(model_repo).sha
    oid = hashlib.sha256(b"abc").hexdigest()
    batch = {"operation": "upload", "objects": [{"oid": oid, "size": 3}]}
    status, answer = _raw(hub, "POST", f"/{model_repo}.git/info/lfs/objects/batch", batch, hub.token)
    assert status == 200
    upload_path = answer["objects"][0]["actions"]["upload"]["href"].removeprefix(hub.url)
    commit = [
        {"key": "header", "value": {"summary": "add w.bin"}},
        {"key": "file", "value": {"path": "ok.txt", "content": "b2sK", "encoding": "base64"}},
        {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": oid, "size": 3}},
    ]
    ndjson = b"".join(json.dumps(line).encode() + b"\n" for line in commit)
    commit_path = f"/api/models/{model_repo}/commit/main"
    assert _raw(hub, "PUT", upload_path, b"abd")[0] == 400  # content that doesn't hash to `oid`
    assert _raw(hub, "POST", commit_path, ndjson, hub.token)[0] == 400  # `oid` was never stored
    assert _api(hub).repo_info(model_repo).sha == head  # ok.txt was not committed alone
    assert _raw(hub, "PUT", upload_path, b"abc")[0] == 200
    assert _raw(hub, "POST", commit_path, ndjson, hub.token)[0] == 200
    assert {"ok.txt", "w.bin"} <= set(_api(hub).list_repo_files(model_repo))


def test_private_repo_is_hidden_without_token(hub, model_repo: str) -> None:
    anonymous = _api(hub, False)
    with pytest.raises(RepositoryNotFoundError):
        anonymous.repo_info(model_repo)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(model_repo, "README.txt", endpoint=hub.url, token=False)
    hub.server.add_token("hf_other", "someone-else")
    with pytest.raises(RepositoryNotFoundError):
        _api(hub, "hf_other").list_repo_files(model_repo)


def test_public_dataset_is_readable_anonymously(hub, tmp_path: Path) -> None:
    local = tmp_path / "shard_00001.parquet"
    local.write_bytes(os.urandom(50_000))
    hub.server.publish_dataset(
        SHARDS, {"shard_00000.parquet": os.urandom(30_000), "shard_00001.parquet": local}
    )
    anonymous = _api(hub, False)
    assert anonymous.list_repo_files(SHARDS, repo_type="dataset") == [
        ".gitattributes",
        "shard_00000.parquet",
        "shard_00001.parquet",
    ]
    path = hf_hub_download(SHARDS, "shard_00001.parquet", repo_type="dataset", endpoint=hub.url, token=False)
    assert Path(path).read_bytes() == local.read_bytes()


def test_other_user_cannot_write(hub) -> None:
    repo_id = f"{hub.user}/public"
    _api(hub).create_repo(repo_id)
    hub.server.add_token("hf_other", "someone-else")
    intruder = _api(hub, "hf_other")
    with pytest.raises(HfHubHTTPError) as err:
        intruder.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)
    assert err.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as err:
        intruder.create_repo(f"{hub.user}/squat")
    assert err.value.response.status_code == 403
    assert intruder.list_repo_files(repo_id) == [".gitattributes"]  # public: readable, untouched


def test_injected_500_on_head_is_retried_by_the_client(hub, model_repo: str) -> None:
    hub.server.fail_next(1, status=500, path_contains="/resolve/", method="HEAD")
    path = hf_hub_download(model_repo, "README.txt", endpoint=hub.url, token=hub.token)
    assert Path(path).read_text() == "phoenix checkpoint\n"
    heads = [r.status for r in hub.server.request_log if r.method == "HEAD"]
    assert heads == [500, 200]


def test_injected_500_on_get_fails_then_next_call_works(hub, model_repo: str) -> None:
    hub.server.fail_next(1, status=500, path_contains="/resolve/", method="GET")
    with pytest.raises(HfHubHTTPError) as err:  # a plain-HTTP file: Xet files are not read with a GET
        hf_hub_download(model_repo, "README.txt", endpoint=hub.url, token=hub.token)
    assert err.value.response.status_code == 500
    assert hf_hub_download(model_repo, "README.txt", endpoint=hub.url, token=hub.token)


def test_429_and_retry_after_reach_the_client(hub, model_repo: str) -> None:
    hub.server.fail_next(1, status=429, path_contains="/api/whoami-v2", retry_after=7)
    with pytest.raises(HfHubHTTPError) as err:
        _api(hub).whoami()
    assert err.value.response.status_code == 429 and err.value.response.headers["Retry-After"] == "7"
    # The client's backoff honours Retry-After (waits it + 1 s) on endpoints it retries, such as preupload.
    hub.server.fail_next(1, status=429, path_contains="/preupload/", retry_after=0)
    _api(hub).upload_file(path_or_fileobj=b"y", path_in_repo="y.txt", repo_id=model_repo)
    assert [r.status for r in hub.server.request_log if "/preupload/" in r.path][-2:] == [429, 200]


def test_dropped_download_resumes_with_range(hub) -> None:
    # The client resumes from what it wrote to disk, and it writes in 10 MiB chunks: the file must be bigger.
    data = os.urandom(10 * MiB + 512 * 1024)
    hub.server.publish_dataset(SHARDS, {"shard.bin": data})
    hub.server.cut_next(after_bytes=10 * MiB + 256 * 1024)
    path = hf_hub_download(SHARDS, "shard.bin", repo_type="dataset", endpoint=hub.url, token=hub.token)
    assert Path(path).read_bytes() == data
    assert [status for _, status in _resolve_gets(hub)] == [200, 206]
    assert hub.server.bytes_downloaded == (10 * MiB + 256 * 1024) + (len(data) - 10 * MiB)


# Persistent partial file + `http_get(resume_size=...)`: hf_hub_download itself starts over in a new process.
_RESUMABLE_GET = """
import sys
from huggingface_hub import hf_hub_url
from huggingface_hub.file_download import http_get
from huggingface_hub.utils import build_hf_headers
with open(sys.argv[3], "ab") as f:
    http_get(hf_hub_url(sys.argv[1], sys.argv[2], repo_type="dataset"), f, resume_size=f.tell(),
             headers=build_hf_headers())
"""


def test_killed_download_resumes_with_range(hub, tmp_path: Path) -> None:
    data = os.urandom(14 * MiB)  # written to disk at 10 MiB, then 0.5 s left to kill the client
    hub.server.publish_dataset(SHARDS, {"shard.bin": data})
    partial = tmp_path / "shard.bin.part"
    cmd = [sys.executable, "-c", _RESUMABLE_GET, SHARDS, "shard.bin", str(partial)]
    hub.server.throttle_bps = 8 * MiB
    proc = subprocess.Popen(cmd, env=hub.env)
    deadline = time.monotonic() + 20
    while not (partial.exists() and partial.stat().st_size > 0) and proc.poll() is None:
        assert time.monotonic() < deadline, "the first 10 MiB never arrived"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = partial.stat().st_size
    assert 0 < kept < len(data)
    hub.server.throttle_bps = None
    # The server notices the dead client and finishes that request: then its byte count is final.
    while not _resolve_gets(hub) or hub.server.requests_in_flight:
        assert time.monotonic() < deadline, "the killed transfer never ended on the server"
        time.sleep(0.005)
    before = hub.server.bytes_downloaded
    subprocess.run(cmd, env=hub.env, check=True, timeout=60)
    assert partial.read_bytes() == data
    assert hub.server.bytes_downloaded - before == len(data) - kept
    assert _resolve_gets(hub)[-1][1] == 206


def test_snapshot_download_honours_allow_patterns(hub, model_repo: str, tmp_path: Path) -> None:
    _api(hub).upload_file(path_or_fileobj=b"{}", path_in_repo="ckpt/meta.json", repo_id=model_repo)
    local = snapshot_download(
        model_repo, endpoint=hub.url, token=hub.token, local_dir=tmp_path / "snap", allow_patterns=["ckpt/*"]
    )
    files = sorted(p.relative_to(local).as_posix() for p in Path(local).glob("ckpt/*"))
    assert files == ["ckpt/meta.json", "ckpt/model.bin"]
    resolves = [r.path for r in hub.server.request_log if "/resolve/" in r.path]  # HEADs, GETs if not Xet
    asked = {path.split("/resolve/", 1)[1].split("/", 1)[1] for path in resolves}
    assert sorted(asked) == files


def test_restart_and_outage_keep_repos(hub, model_repo: str, tmp_path: Path) -> None:
    api = _api(hub)
    head = api.repo_info(model_repo).sha
    cached = hf_hub_download(model_repo, "README.txt", endpoint=hub.url, token=hub.token)
    hub.server.down = True
    with pytest.raises(httpx2.ConnectError):
        api.repo_info(model_repo)
    # Down Hub: the client falls back to its cache for files it has.
    assert hf_hub_download(model_repo, "README.txt", endpoint=hub.url, token=hub.token) == cached
    hub.server.down = False
    assert api.repo_info(model_repo).sha == head
    hub.server.stop()
    with LocalHub(hub.server.data_dir, tokens={hub.token: hub.user}) as restarted:
        again = HfApi(endpoint=restarted.url, token=hub.token)
        assert again.repo_info(model_repo).sha == head
        cache = tmp_path / "c2"
        path = hf_hub_download(
            model_repo, "ckpt/model.bin", endpoint=restarted.url, token=hub.token, cache_dir=cache
        )
        assert Path(path).stat().st_size == 200 * 1024


def test_cli_serves_until_sigterm(tmp_path: Path) -> None:
    token = "hf_cli_secret_token"
    proc = subprocess.Popen(
        [sys.executable, "-m", "entrypoint.demo.localhub", "--data", str(tmp_path),
         "--token", f"{token}:cli"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("url=http://127.0.0.1:")
        assert HfApi(endpoint=line[4:], token=token).whoami()["name"] == "cli"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()  # never leave a server behind
            raise
    assert proc.returncode == 0
    assert token not in line + out + err
