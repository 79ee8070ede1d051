"""The local Hub's request handler: every route mixed into one class, a request's dispatch (fault hooks
first), and the URL routing."""

from __future__ import annotations

from urllib.parse import parse_qs, unquote, urlsplit

from entrypoint.demo.localhub.api_buckets import BucketRoutes
from entrypoint.demo.localhub.api_files import FileRoutes
from entrypoint.demo.localhub.api_repos import RepoRoutes
from entrypoint.demo.localhub.common import API_TYPES, HubError, LoggedRequest


class Handler(RepoRoutes, FileRoutes, BucketRoutes):
    def _dispatch(self) -> None:
        hub = self.hub
        self._status, self._body_read = 0, False
        url = urlsplit(self.path)
        self._query = parse_qs(url.query)
        self._base = f"http://{self.headers.get('Host') or hub.url.split('://', 1)[1]}"
        hub._count_in_flight(+1)
        try:
            try:
                hub._hold(self.command, url.path)
                hub._end_xet_traps(url.path)
                if fault := hub._take(hub._faults, self.command, url.path):
                    headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
                    message = fault.message or f"Injected failure ({fault.status})"
                    raise HubError(fault.status, message, headers=headers)
                self._route([unquote(p) for p in url.path.split("/")[1:]])
            except HubError as err:
                self._drain()
                self._error(err)
            except Exception as exc:  # a localhub bug: answer 500 rather than drop the connection
                self.close_connection = True
                if self._status:
                    raise
                self._error(HubError(500, f"localhub internal error: {exc!r}"))
        except (ConnectionError, TimeoutError):
            self.close_connection = True  # the client went away, e.g. killed mid-transfer
        finally:
            if not self._status:  # no answer sent: the client went away first
                hub._record(LoggedRequest(self.command, url.path, 0))
            hub._count_in_flight(-1)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    # ------------------------------------------------------------------ routing

    def _route(self, parts: list[str]) -> None:
        cmd = self.command
        if parts[:1] == ["api"]:
            if parts[1:] == ["whoami-v2"] and cmd == "GET":
                return self._whoami()
            if parts[1:] == ["repos", "create"] and cmd == "POST":
                return self._create_repo()
            if parts[1:] == ["validate-yaml"] and cmd == "POST":
                # The client asks before committing a README.md; this double accepts any model card.
                self._json_body()
                return self._json(200, {"errors": [], "warnings": []})
            if parts[1:2] == ["buckets"] and self._bucket_route(parts[2:]):
                return None
            if len(parts) >= 4 and parts[1] in API_TYPES:
                repo, tail = (API_TYPES[parts[1]], f"{parts[2]}/{parts[3]}"), parts[4:]
                action, rev = (tail + ["", ""])[:2]
                sub = "/".join(tail[2:])
                routes = {
                    ("GET", "revision"): self._repo_info,
                    ("GET", "commits"): self._list_commits,
                    ("POST", "preupload"): self._preupload,
                    ("POST", "commit"): self._post_commit,
                    ("POST", "super-squash"): self._super_squash,
                    ("GET", "xet-write-token"): self._xet_write_token,
                    ("GET", "xet-read-token"): self._xet_read_token,
                }
                if not tail and cmd in ("GET", "HEAD"):
                    return self._repo_info(repo, "main")
                if action == "tree" and rev and cmd == "GET":
                    return self._list_tree(repo, rev, sub)
                if action == "lfs-files" and not sub:
                    if not rev and cmd == "GET":
                        return self._list_lfs_files(repo)
                    if rev == "batch" and cmd == "POST":
                        return self._delete_lfs_files(repo)
                route = routes.get(("GET" if cmd == "HEAD" else cmd, action))
                if route is not None and rev and not sub:
                    return route(repo, rev)
        elif parts[:1] == ["buckets"] and parts[3:4] == ["resolve"] and len(parts) >= 5:
            if cmd not in ("GET", "HEAD"):
                raise HubError(405, f"Method not allowed: {cmd}")
            return self._bucket_download(f"{parts[1]}/{parts[2]}", "/".join(parts[4:]))
        elif parts[:1] == ["lfs-upload"] and len(parts) == 2 and cmd == "PUT":
            return self._lfs_put(parts[1])
        else:
            repo_type = "dataset" if parts[:1] == ["datasets"] else "model"
            parts = parts[1:] if repo_type == "dataset" else parts
            if (
                parts[2:] == ["info", "lfs", "objects", "batch"]
                and parts[1].endswith(".git")
                and cmd == "POST"
            ):
                return self._lfs_batch((repo_type, f"{parts[0]}/{parts[1][:-4]}"))
            if len(parts) >= 5 and parts[2] == "resolve" and cmd in ("GET", "HEAD"):
                return self._download((repo_type, f"{parts[0]}/{parts[1]}"), parts[3], "/".join(parts[4:]))
        raise HubError(404, f"Not found: {cmd} {urlsplit(self.path).path}")
