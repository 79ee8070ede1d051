"""How a stage that ran out of device memory ends: one report line naming its device batch, exit code 4.

A CUDA out-of-memory is not a crash to relaunch as it was: the same device batch would run out again.
The stage ends with this report (rank by rank: the first one printed wins) and `phoenix run` relaunches
it from its newest checkpoint with half the device batch. Torch-free: `phoenix run` parses the line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Exit code of a stage process that ran out of device memory (torchrun itself exits 1 on any failed
# worker: `phoenix run` goes by the report line, a bare trainer's caller by this code).
OUT_OF_MEMORY_EXIT_CODE = 4
_REPORT = re.compile(r"event=out_of_memory stage=(?P<stage>\w+) step=(?P<step>\d+) "
                     r"device_batch_size=(?P<device_batch_size>\d+) card_gib=(?P<card_gib>[\d.]+)")


@dataclass
class OutOfMemory(Exception):
    """The stage ran out of device memory during `step` (0: before the first step, in the device batch
    search) with `device_batch_size` rows per forward, on a card of `card_gib` GiB usable memory."""

    stage: str
    step: int
    device_batch_size: int
    card_gib: float

    def __str__(self) -> str:
        return self.report()

    def report(self) -> str:
        """The one line a worker logs, which `phoenix run` parses back (parse_report)."""
        return (f"event=out_of_memory stage={self.stage} step={self.step} "
                f"device_batch_size={self.device_batch_size} card_gib={self.card_gib:.1f}")


def parse_report(line: str) -> OutOfMemory | None:
    """The report in a line of a worker's output, or None."""
    match = _REPORT.search(line)
    if match is None:
        return None
    return OutOfMemory(match["stage"], int(match["step"]), int(match["device_batch_size"]),
                       float(match["card_gib"]))
