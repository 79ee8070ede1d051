"""SAVE_EVERY=auto on simulated interruptions: the interval it picks, and the time lost against fixed ones.

    python bench/save_interval.py                    # d26 on 8 H100s, its 5.3 h of training (assumed figures)
    python bench/save_interval.py --step-s 0.9 --publish-s 10 --hours 1.2 --mtbi-h 0.5,2   # d20

A stage of --hours of training runs step by step through the trainer's own SaveSchedule; interruptions
arrive at random (Poisson, mean --mtbi-h apart, the same draws for every policy). An interruption loses
the steps since the last *published* checkpoint (a save counts once its background write is done,
--publish-s after it starts) plus --restart-s to the next first step; each save holds training --stall-s.
Printed per interruption rate and policy: the interval in force at the end (auto: the median over the
draws, and their range), saves, interruptions, and the wall time lost to saving and to interruptions as
a share of the training time.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass

from trainer.save_policy import SaveSchedule


@dataclass
class Outcome:
    policy: str
    every: int
    saves: int
    interruptions: int
    stall_s: float
    lost_s: float

    def overhead_pct(self, train_s: float) -> float:
        return 100 * (self.stall_s + self.lost_s) / train_s


def simulate(policy: str, train_s: float, step_s: float, stall_s: float, publish_s: float, restart_s: float,
             mtbi_s: float, seed: int) -> Outcome:
    """Train `train_s` seconds of steps; wall time runs on through stalls, lost work and restarts."""
    draws = random.Random(seed)
    next_interruption = draws.expovariate(1 / mtbi_s)
    history: list[float] = []  # seconds each interruption cost
    step, wall, trained, published, saves = 0, 0.0, 0.0, (0, 0.0), 0  # published: (step, trained time)
    pending: tuple[int, float, float] | None = None  # a save in flight: (step, trained time, publish time)
    schedule = SaveSchedule(policy, "base", 0, lambda: (sum(history), len(history)))
    stall_total = 0.0
    while trained < train_s:
        wall += step_s
        if wall >= next_interruption:  # the machine goes mid-step: back to the last published save
            if pending and pending[2] <= next_interruption:
                published = pending[:2]
            pending = None
            lost = trained - published[1] + restart_s
            history.append(lost)
            step, trained = published
            wall = next_interruption + restart_s
            next_interruption = wall + draws.expovariate(1 / mtbi_s)
            schedule = SaveSchedule(policy, "base", step, lambda: (sum(history), len(history)))
            continue
        step, trained = step + 1, trained + step_s
        schedule.observe_step(step_s)
        if pending and pending[2] <= wall:
            published, pending = pending[:2], None
        if schedule.due(step):
            if pending:  # the save in flight must finish first: the training thread waits for it
                wall, published = max(wall, pending[2]), pending[:2]
            wall += stall_s
            stall_total += stall_s
            saves += 1
            pending = (step, trained, wall + publish_s)
            schedule.saved(step, stall_s, publish_s, trained)
    return Outcome(policy, schedule.every, saves, len(history), stall_total, sum(history))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=5.3, help="training time of the stage")
    parser.add_argument("--step-s", type=float, default=1.9, help="seconds per step (d26: 8 H100s, 40%% MFU)")
    parser.add_argument("--stall-s", type=float, default=0.4, help="training held per save (C)")
    parser.add_argument("--publish-s", type=float, default=19.0, help="save call to published (1 GB/s)")
    parser.add_argument("--restart-s", type=float, default=150.0, help="relaunch to first step")
    parser.add_argument("--mtbi-h", default="1,6,24", help="mean hours between interruptions to simulate")
    parser.add_argument("--fixed", default="50,250,1000", help="fixed SAVE_EVERY values to compare")
    parser.add_argument("--seeds", type=int, default=20, help="random draws averaged per case")
    args = parser.parse_args()
    train_s = args.hours * 3600
    print(f"stage of {args.hours:g} h training, step {args.step_s:g} s, stall {args.stall_s:g} s, publish "
          f"{args.publish_s:g} s, restart {args.restart_s:g} s; means over {args.seeds} random draws")
    for mtbi_h in (float(h) for h in args.mtbi_h.split(",")):
        for policy in ["auto", *args.fixed.split(",")]:
            runs = [simulate(policy, train_s, args.step_s, args.stall_s, args.publish_s, args.restart_s,
                             mtbi_h * 3600, seed) for seed in range(args.seeds)]
            n = len(runs)
            finals = sorted(r.every for r in runs)
            print(f"mtbi_h={mtbi_h:g} save_every={policy:>4s} final_interval_steps={finals[n // 2]:5d} "
                  f"({finals[0]}-{finals[-1]}) "
                  f"saves={sum(r.saves for r in runs) / n:6.0f} "
                  f"interruptions={sum(r.interruptions for r in runs) / n:5.1f} "
                  f"stall_pct={100 * sum(r.stall_s for r in runs) / n / train_s:5.2f} "
                  f"lost_pct={100 * sum(r.lost_s for r in runs) / n / train_s:5.2f} "
                  f"overhead_pct={sum(r.overhead_pct(train_s) for r in runs) / n:5.2f}")


if __name__ == "__main__":
    main()
