"""When to checkpoint: every SAVE_EVERY steps, or with SAVE_EVERY=auto at the interval that loses the
least time to saving and to interruptions together (Young/Daly).

Young's interval is sqrt(2 x C x M): C what one save costs the training (the stall the training thread
pays, measured at every save), M the mean time between interruptions, estimated as the stage's exposure
(its training time so far plus what its interruptions cost, trainer.recovery) over the interruptions it
has seen plus one, so a run that has seen none is never taken to be safe forever. The interval is bounded
below by twice the time the last save took to be published (a save sooner than that waits for the one
in flight, and C would no longer be the stall) and above by AUTO_MAX_INTERVAL_S of training, and turned
into steps with the measured step time. A process's first save comes AUTO_FIRST_SAVE steps in, to
measure C. Rank 0 decides; every rank learns the decision in the step's one all-reduce. Torch-free:
bench/save_interval.py runs it on simulated interruption rates.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("phoenix.train")

AUTO = "auto"
AUTO_FIRST_SAVE = 10  # steps into a process: the save that measures C
AUTO_MAX_INTERVAL_S = 3600.0  # at most an hour of training at risk, however rare interruptions are
STEP_WINDOW = 20  # recent step times the median is taken over


def parse_save_every(value: str) -> int | None:
    """SAVE_EVERY: a positive number of steps, or `auto` (None). ValueError saying what is wrong."""
    if value.strip().lower() == AUTO:
        return None
    try:
        steps = int(value)
    except ValueError:
        steps = 0
    if steps <= 0:
        raise ValueError(f"SAVE_EVERY must be a positive number of steps or auto, got {value!r}")
    return steps


@dataclass(frozen=True)
class Choice:
    """An interval in steps, and what it was chosen from."""

    every: int
    interval_s: float
    cost_s: float
    publish_s: float
    step_s: float
    exposure_s: float
    interruptions: int

    @property
    def mtbi_s(self) -> float:
        return self.exposure_s / (self.interruptions + 1)

    def describe(self) -> str:
        return (f"save_every={self.every} interval_s={self.interval_s:.1f} save_cost_s={self.cost_s:.3f} "
                f"mtbi_s={self.mtbi_s:.0f} interruptions={self.interruptions} "
                f"exposure_s={self.exposure_s:.0f} step_s={self.step_s:.3f} "
                f"min_interval_s={2 * self.publish_s:.1f} max_interval_s={AUTO_MAX_INTERVAL_S:.0f}")


def choose(cost_s: float, publish_s: float, step_s: float, exposure_s: float, interruptions: int) -> Choice:
    """Young's interval sqrt(2 C M), bounded (see the module's docstring), in steps of `step_s`."""
    mtbi_s = exposure_s / (interruptions + 1)
    interval_s = min(max(math.sqrt(2 * cost_s * mtbi_s), 2 * publish_s), AUTO_MAX_INTERVAL_S)
    every = max(1, round(interval_s / max(step_s, 1e-9)))
    return Choice(every, interval_s, cost_s, publish_s, step_s, exposure_s, interruptions)


class SaveSchedule:
    """Which steps save: `due(step)` after each step, `saved(...)` after each save (any kind)."""

    def __init__(self, save_every: str, stage: str, start_step: int,
                 history: Callable[[], tuple[float, int]]) -> None:
        """history: (seconds the stage's interruptions cost, how many there were), read when choosing."""
        self.fixed = parse_save_every(save_every)
        self.stage = stage
        self.history = history
        self.last_saved = start_step
        self.every = self.fixed or AUTO_FIRST_SAVE
        self.steps: deque[float] = deque(maxlen=STEP_WINDOW)
        self.first = True

    def observe_step(self, dt: float) -> None:
        if not self.first:  # a process's first step holds the compile: not a step time
            self.steps.append(dt)
        self.first = False

    def due(self, step: int) -> bool:
        if self.fixed:
            return step % self.fixed == 0
        return step - self.last_saved >= self.every

    def saved(self, step: int, stall_s: float, publish_s: float, train_time_s: float) -> None:
        """After a save at `step` that held training `stall_s`; the previous save took `publish_s` from the
        call to published; the stage has trained `train_time_s` so far."""
        self.last_saved = step
        if self.fixed or not self.steps:
            return
        lost_s, interruptions = self.history()
        step_s = statistics.median(self.steps)
        choice = choose(stall_s, publish_s, step_s, train_time_s + lost_s, interruptions)
        if choice.every != self.every:
            log.info("event=save_interval stage=%s step=%d previous=%d %s", self.stage, step, self.every,
                     choice.describe())
            self.every = choice.every
