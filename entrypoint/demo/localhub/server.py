"""The local Hub server: lifecycle (start, stop, down) over the Hub's state, and the CLI."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import threading
from collections.abc import Mapping

from entrypoint.demo.localhub.common import DEFAULT_USER
from entrypoint.demo.localhub.handler import Handler
from entrypoint.demo.localhub.request import HubServer
from entrypoint.demo.localhub.state import HubState
from entrypoint.demo.localhub.terms import XET_FAULTS


class LocalHub(HubState):
    """The server. Use it as a context manager, or call `start()` / `stop()`; `url` is valid once started."""

    def __init__(self, data_dir: str | os.PathLike[str], tokens: Mapping[str, str] | None = None,
                 host: str = "127.0.0.1", port: int = 0):
        super().__init__(data_dir, tokens, host, port)
        self._server: HubServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> LocalHub:
        if self._server is None:
            self._server = HubServer((self.host, self.port), Handler, self)
            self.port = self._server.server_address[1]  # a restart reuses the port: clients keep the URL
            self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._obs_lock:
            conns = list(self._conns)
        for conn in conns:  # keep-alive connections would otherwise go on being served
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join()

    @property
    def down(self) -> bool:
        return self._server is None

    @down.setter
    def down(self, value: bool) -> None:
        """`down = True` closes the listening socket and live connections: clients get ECONNREFUSED."""
        if value:
            self.stop()
        else:
            self.start()

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m entrypoint.demo.localhub", description="A local Hugging Face Hub"
    )
    parser.add_argument("--data", required=True, help="data directory (created if missing, reused if not)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument(
        "--token",
        action="append",
        default=[],
        metavar="TOKEN[:USER]",
        help=f"an accepted token and the user it authenticates (default {DEFAULT_USER}); repeatable",
    )
    parser.add_argument("--quota", action="append", default=[], metavar="OWNER=BYTES",
                        help="cap the storage of a namespace, or of one repo or bucket (ns/name); repeatable")
    terms = parser.add_argument_group("the real Hub's terms (all off by default)")
    terms.add_argument("--credit-delay", type=float, default=0.0, metavar="SECONDS",
                       help="storage a super-squash or LFS purge frees keeps counting this long (Hub: 36 h)")
    terms.add_argument("--commit-quota", metavar="N[/WINDOW_S]",
                       help="N commits/squashes/LFS purges per user per window (default 3600 s); then 429")
    terms.add_argument("--commit-quota-buckets", action="store_true",
                       help="bucket batches count towards --commit-quota too")
    terms.add_argument("--storage-locked", action="append", default=[], metavar="NAMESPACE",
                       help="a namespace that tripped the storage patterns: 403 on adding files; repeatable")
    terms.add_argument("--refuse-shared-names", action="store_true",
                       help="409 for a bucket with a repo's id, and for a repo with a bucket's")
    terms.add_argument("--xet-fault", action="append", default=[], choices=[":".join(f) for f in XET_FAULTS],
                       help="make the next Xet transfer of that kind fail in hf_xet; repeatable")
    args = parser.parse_args(argv)
    tokens = {token: user or DEFAULT_USER for token, _, user in (spec.partition(":") for spec in args.token)}
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with LocalHub(args.data, tokens, host=args.host, port=args.port) as hub:
        for spec in args.quota:
            owner, _, nbytes = spec.partition("=")
            hub.set_quota(owner, int(nbytes))
        hub.credit_delay_s, hub.refuse_shared_names = args.credit_delay, args.refuse_shared_names
        if args.commit_quota:
            commits, _, window = args.commit_quota.partition("/")
            hub.set_commit_quota(int(commits), float(window or 3600), buckets=args.commit_quota_buckets)
        for namespace in args.storage_locked:
            hub.trip_storage_patterns(namespace)
        for spec in args.xet_fault:
            error, _, transfer = spec.partition(":")
            hub.fail_xet_next(error, transfer)
        print(f"url={hub.url}", flush=True)  # tokens are never printed
        stop.wait()
