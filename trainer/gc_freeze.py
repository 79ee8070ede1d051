"""Python's garbage collector frozen after a process's first training step, as nanochat's loops do.

The cyclic collector scans every tracked object each time its allocation counter trips, and a training
process holds millions of them (model, optimizer, tokenizer, datasets): nanochat measured pauses of ~500 ms
that reclaim almost nothing. After the first step the set-up garbage is collected once, everything alive
is frozen out of the collector's view (gc.freeze) and automatic collection is turned off; a manual collect
every COLLECT_EVERY steps bounds what reference cycles created during training can pile up to. Reference
counting still frees everything else at once, so memory does not grow. It changes no number the run
computes, so resume stays exact; it is the same on CPU and GPU.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger("phoenix.train")

COLLECT_EVERY = 5000  # steps between manual collections once frozen (nanochat's choice)


class FrozenGC:
    """Call `after_step(step)` after every optimizer step of this process (fresh or resumed)."""

    def __init__(self, collect_every: int = COLLECT_EVERY) -> None:
        self.collect_every = collect_every
        self.frozen = False

    def after_step(self, step: int) -> None:
        if not self.frozen:
            # The first step of this process (which may be step 4001 of a resumed run) built the compiled
            # graphs and the loader's buffers: collect their garbage once, then freeze what survives.
            collected = gc.collect()
            gc.freeze()
            gc.disable()
            self.frozen = True
            log.info("gc_frozen step=%d collected=%d frozen_objects=%d manual_collect_every=%d", step,
                     collected, gc.get_freeze_count(), self.collect_every)
        elif step % self.collect_every == 0:
            gc.collect()
