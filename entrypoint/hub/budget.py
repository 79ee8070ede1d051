"""What the Hub counts against the account's storage, and whether the next checkpoint fits within it.

A bucket frees a deleted file at once. A repo's history does not: a squash (`super_squash_history`) is
credited only "within 36 hours" (HF_SQUASH_CREDIT_HOURS), so pruned checkpoints keep counting meanwhile,
and a repo pushed every 20 min counts every checkpoint of the last 36 h. So the sidecar keeps a ledger on
the volume, `runs/<tag>/hub_credit.json`: the bytes each prune deleted, and when the squash that frees
them ran. Then, for a store:

    settled = what it holds now (a repo's head's large files, a bucket's size): what the Hub counts once
              every credit has landed
    counted = settled + deleted but not yet credited, or the Hub's own figure if it says more

A push goes ahead only while counted + its bytes stays within HF_STORAGE_LIMIT_GB; otherwise it waits,
with one line saying until when, instead of being refused by the Hub (a 403 after a whole upload).
`plan_peak` and `plan_problem` say what a preset's checkpoints reach at given settings (`phoenix doctor`,
`phoenix status`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from entrypoint.hub.config import HubConfig
from trainer import checkpoint_layout as layout

CREDIT_FILE = "hub_credit.json"


@dataclass(frozen=True)
class Credit:
    """Bytes deleted from a repo's head that its history (or the Hub's late credit) still counts."""

    nbytes: int
    what: str
    squashed_at: float | None = None  # time.time() of the squash that freed them; None: not squashed yet

    def lands_at(self, delay: float) -> float:
        return math.inf if self.squashed_at is None else self.squashed_at + delay


class Ledger:
    """The volume's record of deleted bytes the Hub still counts (lost with the volume: then the Hub's own
    figure is all there is)."""

    def __init__(self, cfg: HubConfig) -> None:
        self.cfg = cfg
        self.path = cfg.local(cfg.run_path(CREDIT_FILE))

    def pending(self, now: float | None = None) -> list[Credit]:
        """Credits that have not landed yet."""
        now = time.time() if now is None else now
        try:
            entries = json.loads(self.path.read_text()).get("pending", [])
        except (FileNotFoundError, ValueError, AttributeError):  # none yet, or not ours to trust
            return []
        credits = [Credit(int(e["bytes"]), str(e.get("what", "")), e.get("squashed_at"))
                   for e in entries if isinstance(e, dict) and isinstance(e.get("bytes"), int)]
        return [c for c in credits if c.lands_at(self.cfg.credit_delay) > now]

    def deleted(self, nbytes: int, what: str) -> None:
        """A commit deleted them from the head: counted until a squash and its credit."""
        self._write([*self.pending(), Credit(nbytes, what)])

    def squashed(self, now: float | None = None) -> None:
        """The history was squashed: the Hub credits what was deleted before it `credit_delay` from now."""
        now = time.time() if now is None else now
        self._write([c if c.squashed_at is not None else Credit(c.nbytes, c.what, now)
                     for c in self.pending()])

    def _write(self, credits: list[Credit]) -> None:
        entries: list[dict[str, Any]] = [{"bytes": c.nbytes, "what": c.what, "squashed_at": c.squashed_at}
                                         for c in credits]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        layout.write_json_atomic(self.path, {"pending": entries})


@dataclass
class Budget:
    """What the Hub counts during one pass, kept current as the pass pushes and prunes."""

    limit: float
    settled: int
    credits: list[Credit] = field(default_factory=list)
    unexplained: int = 0  # the Hub counts this much more than the ledger explains (credited later still)
    delay: float = 0.0

    @classmethod
    def of(cls, cfg: HubConfig, settled: int, reported: int | None) -> Budget:
        """From what the store holds now and the Hub's own figure (None if it gives none)."""
        budget = cls(cfg.storage_limit, settled, Ledger(cfg).pending(), delay=cfg.credit_delay)
        budget.unexplained = max(0, (reported or 0) - budget.counted)
        return budget

    @property
    def pending(self) -> int:
        return sum(c.nbytes for c in self.credits)

    @property
    def counted(self) -> int:
        return self.settled + self.pending + self.unexplained

    def fits(self, nbytes: int) -> bool:
        return self.counted + nbytes <= self.limit

    def fits_at(self, nbytes: int) -> float | None:
        """When enough credit will have landed for `nbytes` more to fit (now if they fit); None if the
        ledger cannot say (what is not credited by then is not ours to predict)."""
        counted, now = self.counted, time.time()
        if counted + nbytes <= self.limit:
            return now
        for credit in sorted(self.credits, key=lambda c: c.lands_at(self.delay)):
            counted -= credit.nbytes
            if counted + nbytes <= self.limit:
                landing = credit.lands_at(self.delay)
                return None if math.isinf(landing) else landing
        return None

    def added(self, nbytes: int) -> None:
        self.settled += nbytes

    def deleted(self, nbytes: int, at_once: bool) -> None:
        """Deleted from the store: freed now (a bucket), or still counted until credited (a repo)."""
        self.settled -= nbytes
        if not at_once:
            self.credits.append(Credit(nbytes, "this pass"))

    def as_dict(self, peak: float | None = None) -> dict[str, Any]:
        return {"counted": self.counted, "settled": self.settled, "limit": round(self.limit),
                "projected_peak": None if peak is None else round(min(peak + self.counted - self.settled,
                                                                      max(self.limit, self.counted)))}


# ------------------------------------------------------------------------------------------------ plans


def plan_peak(cfg: HubConfig, ckpt_bytes: int, run_sft: bool = True) -> float:
    """The most the Hub counts for a run's checkpoints at these settings if every push went ahead: a bucket
    holds HF_KEEP_LAST + 1 of the stage being pushed (plus base's final one during SFT); a repo counts each
    checkpoint from its push until `credit_delay` after the squash that prunes it, HF_KEEP_LAST pushes
    later, so every push of that span at once."""
    if cfg.keep_last is None:
        return math.inf
    final_base = ckpt_bytes if run_sft else 0
    if cfg.in_bucket:
        return (cfg.keep_last + 1) * ckpt_bytes + final_base
    return (math.ceil(cfg.credit_delay / cfg.sync_interval) + cfg.keep_last + 1) * ckpt_bytes + final_base


def push_spacing(cfg: HubConfig, ckpt_bytes: int, run_sft: bool = True) -> float:
    """Seconds between pushes that the budget allows in the long run (a repo: each one counts until the
    credit for its prune lands); inf if not even one more checkpoint fits."""
    room = cfg.storage_limit - (cfg.keep_last or 0) * ckpt_bytes - (ckpt_bytes if run_sft else 0)
    if room < ckpt_bytes:
        return math.inf
    if cfg.in_bucket:
        return cfg.sync_interval
    return max(cfg.sync_interval, cfg.credit_delay * ckpt_bytes / (room - ckpt_bytes))


def plan_problem(cfg: HubConfig, preset: str, ckpt_bytes: int, run_sft: bool = True) -> str | None:
    """`phoenix doctor`'s one line when these settings cannot keep a current backup within the limit."""
    peak, limit = plan_peak(cfg, ckpt_bytes, run_sft), cfg.storage_limit
    if peak <= limit:
        return None
    gb = f"{ckpt_bytes / 1e9:.1f} GB"
    over = f"over HF_STORAGE_LIMIT_GB={limit / 1e9:g}"
    if cfg.keep_last is None:
        fits = int(limit // ckpt_bytes)
        return (f"HF_KEEP_LAST=all keeps every PRESET={preset} checkpoint ({gb}): the Hub is full after "
                f"{fits}: set HF_KEEP_LAST to 2")
    spacing = push_spacing(cfg, ckpt_bytes, run_sft)
    then = ("never fit" if math.isinf(spacing) else
            f"push only every {spacing / 3600:.1f} h" if spacing > cfg.sync_interval else "push less often")
    if cfg.in_bucket:
        keep = max(1, int((limit - (ckpt_bytes if run_sft else 0)) // ckpt_bytes) - 1)
        return (f"PRESET={preset} checkpoints ({gb}) with HF_KEEP_LAST={cfg.keep_last} peak at "
                f"{peak / 1e9:.0f} GB in the bucket, {over}: the sidecar would {then}; set HF_KEEP_LAST to "
                f"{keep}, or HF_STORAGE_LIMIT_GB to your plan's storage")
    return (f"PRESET={preset} checkpoints ({gb}) pushed to the git repo every {cfg.sync_interval:.0f}s "
            f"with HF_KEEP_LAST={cfg.keep_last} would count {peak / 1e9:.0f} GB (the Hub credits a squash "
            f"{cfg.credit_delay / 3600:g} h late), {over}: the sidecar would {then}; unset "
            "HF_CHECKPOINT_STORE to keep checkpoints in a bucket, which frees a delete at once")
