"""Stage processes for `phoenix run`: torchrun's command line, and a launcher that relays and stops them.

Every line a child prints passes through the secret redaction on its way to the container log and
`logs/phoenix_run.log`. A stop goes to torchrun's workers (torchrun itself would SIGKILL them in 30 s),
and again to each worker that appears later; a preparation process is simply ended.
"""

from __future__ import annotations

import ctypes
import logging
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import suppress
from pathlib import Path
from typing import IO, Any

from entrypoint.launch.config import RunConfig
from entrypoint.launch.procs import descendants, signal_pids
from entrypoint.launch.volume import VolumeLock
from entrypoint.logs import log_file, redact
from trainer.out_of_memory import OutOfMemory, parse_report

log = logging.getLogger("phoenix.run")

# The last line of a Python traceback: what a crash is remembered by.
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b")


def torchrun_command(cfg: RunConfig, module: str, nproc: int, args: list[str]) -> list[str]:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if cfg.nnodes > 1:
        # c10d rendezvous; node 0 hosts the store so the others always know where it is.
        command += [f"--nnodes={cfg.nnodes}", f"--node_rank={cfg.node_rank}", "--rdzv_backend=c10d",
                    f"--rdzv_endpoint={cfg.master_addr}:{cfg.master_port}", f"--rdzv_id={cfg.model_tag}",
                    f"--rdzv_conf=is_host={int(cfg.node_rank == 0)}"]
    else:
        command += ["--standalone"]
    return [*command, "-m", module, "--preset", cfg.preset, *args]


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the parent (this entrypoint) dies, however it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Launcher:
    """Runs one child at a time (torchrun, or a preparation process); `stopping` is set by the first stop
    signal and stays set, so a stop while torchrun is still starting reaches its workers once they exist."""

    def __init__(self, log_file: Path | None) -> None:
        self.log_file = log_file
        self.proc: subprocess.Popen | None = None
        self.stopping = threading.Event()
        self.error: str | None = None  # the first `error:` line a child printed
        self.out_of_memory: OutOfMemory | None = None  # the first out-of-memory report a worker logged
        self.last_exception: str | None = None  # the last line of a child's traceback
        self._to_workers = True
        self._signaled: set[int] = set()
        self._signal_seen = False

    @property
    def stop_requested(self) -> bool:
        return self.stopping.is_set()

    def on_signal(self, signum: int, _frame: Any) -> None:
        # A storm of signals re-enters this handler mid-way (Event.set's lock is not reentrant, and the
        # recursion would end in RecursionError): only the first one acts; run() forwards the stop.
        if self._signal_seen:
            return
        self._signal_seen = True
        self.stop(f"received {signal.Signals(signum).name}: asking the workers for an emergency checkpoint")

    def stop(self, announcement: str | None = None) -> None:
        """Stop the launch, from a signal handler or another thread (a preemption notice): the workers
        write an emergency checkpoint at their next step boundary, a preparation process just ends.
        `announcement` is logged by the first stop only."""
        if announcement and not self.stopping.is_set():
            log.warning(announcement)
        self.stopping.set()

    def _forward_stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        # Workers catch SIGTERM and checkpoint; a preparation process has nothing to save and just ends.
        if not self._to_workers:
            # Again on every pass: a child still between fork and exec runs our own SIGTERM handler, so
            # the first signal can be lost, and the download it then starts could outlast the grace period.
            signal_pids([proc.pid, *descendants(proc.pid)], signal.SIGTERM)
            return
        fresh = [pid for pid in descendants(proc.pid) if pid not in self._signaled]
        self._signaled.update(fresh)
        signal_pids(fresh, signal.SIGTERM)

    def run(self, command: list[str], env: dict[str, str], lock: VolumeLock, to_workers: bool = True) -> int:
        log.info("launch %s", " ".join(command))
        self.error = self.last_exception = self.out_of_memory = None
        self._to_workers, self._signaled = to_workers, set()
        # The child inherits the lock (held until it exits, even if we die first) and dies with us;
        # torchrun's workers exit when it does (trainer.runtime's orphan watchdog).
        self.proc = subprocess.Popen(command, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, pass_fds=(lock.fileno(),),
                                     preexec_fn=_die_with_parent)
        relay = threading.Thread(target=self._relay, args=(self.proc.stdout,), name="relay", daemon=True)
        relay.start()
        try:
            while self.proc.poll() is None:
                if self.stopping.wait(0.2):
                    self._forward_stop()  # again and again: workers that appear later get it too
                    time.sleep(0.2)
            relay.join()
            return self.proc.returncode
        finally:
            self.proc = None

    def _relay(self, stream: IO[bytes]) -> None:
        """Every line, redacted, to our stdout and log file; after a child's first `error:` line only to
        the file (the other ranks' copies and torchrun's failure report would bury the one line). Nothing
        stops the draining: a worker blocked on a full pipe would stop training and never see a stop."""
        sink = log_file(self.log_file) if self.log_file else None  # never raises (logs.LogFile)
        for raw in stream:
            line = redact(raw.decode(errors="replace"))
            quiet = self.error is not None
            if line.startswith("error: ") and self.error is None:
                self.error, quiet = line[len("error: "):].strip(), False
            elif _EXCEPTION_LINE.match(line) and "ChildFailedError" not in line:
                self.last_exception = line.strip()
            elif self.out_of_memory is None:
                self.out_of_memory = parse_report(line)
            if sink is not None:
                sink.write(line)
            if not quiet:
                with suppress(OSError, ValueError):  # a broken or closed stdout: the file still has it
                    sys.stdout.write(line)
                    sys.stdout.flush()
