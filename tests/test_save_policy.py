"""SAVE_EVERY=auto (trainer.save_policy) and the interruption history it reads (trainer.recovery), in
process: Young's interval and its bounds, which steps save, the start-up clock and what a record holds.
The trainer runs them end to end in tests/test_train.py (auto interval, kill -9, bitwise resume)."""

from __future__ import annotations

import json
import logging
import math
import time

import pytest

from trainer import recovery
from trainer.save_policy import AUTO_FIRST_SAVE, AUTO_MAX_INTERVAL_S, SaveSchedule, choose, parse_save_every


def test_save_every_is_a_positive_step_count_or_auto():
    assert parse_save_every("250") == 250 and parse_save_every(" Auto ") is None
    for bad in ("0", "-3", "often", "2.5"):
        with pytest.raises(ValueError, match="positive number of steps or auto"):
            parse_save_every(bad)


def test_young_interval_and_its_bounds():
    # C = 2 s, one interruption in 2 h: M = 1 h, sqrt(2 x 2 x 3600) = 120 s, 80 steps of 1.5 s.
    choice = choose(cost_s=2.0, publish_s=10.0, step_s=1.5, exposure_s=7200, interruptions=1)
    assert choice.mtbi_s == 3600 and math.isclose(choice.interval_s, 120) and choice.every == 80
    # Never sooner than twice the time a save takes to publish (the next save would wait for it) ...
    assert choose(2.0, publish_s=100.0, step_s=1.5, exposure_s=7200, interruptions=1).interval_s == 200
    # ... nor later than an hour of training, however rare interruptions are.
    rare = choose(2.0, publish_s=10.0, step_s=1.5, exposure_s=1e9, interruptions=0)
    assert rare.interval_s == AUTO_MAX_INTERVAL_S and rare.every == 2400
    # More interruptions, shorter interval: sqrt(M) scaling.
    often = choose(2.0, publish_s=0.0, step_s=1.5, exposure_s=7200, interruptions=15)
    assert math.isclose(often.interval_s, 120 / math.sqrt(8)) and often.every == 28


def test_a_fixed_number_saves_exactly_as_before():
    schedule = SaveSchedule("7", "base", 0, history=lambda: pytest.fail("a fixed interval reads no history"))
    for step in range(1, 50):
        schedule.observe_step(0.1)
        if schedule.due(step):
            schedule.saved(step, stall_s=5.0, publish_s=60.0, train_time_s=step * 0.1)
    assert [s for s in range(1, 50) if schedule.due(s)] == [7, 14, 21, 28, 35, 42, 49]


def test_auto_saves_first_to_measure_then_follows_the_chosen_interval(caplog):
    calls = []

    def history() -> tuple[float, int]:
        calls.append(1)
        return 100.0, 3  # what this stage's interruptions cost, and how many

    schedule = SaveSchedule("auto", "sft", 40, history)
    for dt in (30.0, 1.0, 1.2, 0.8):  # the first step (compile) is no step time
        schedule.observe_step(dt)
    assert [s for s in range(41, 60) if schedule.due(s)][0] == 40 + AUTO_FIRST_SAVE
    with caplog.at_level(logging.INFO, logger="phoenix.train"):
        schedule.saved(50, stall_s=0.5, publish_s=2.0, train_time_s=700.0)
        # M = (700 + 100) / (3 + 1) = 200 s; sqrt(2 x 0.5 x 200) = 14.1 s; median step 1 s: 14 steps.
        assert schedule.every == 14 and [s for s in range(51, 70) if schedule.due(s)][0] == 64
        schedule.saved(64, stall_s=0.5, publish_s=2.0, train_time_s=700.0)  # unchanged: no new line
    lines = [r.getMessage() for r in caplog.records if "event=save_interval" in r.getMessage()]
    assert len(lines) == 1 and len(calls) == 2
    assert ("stage=sft step=50 previous=10 save_every=14 interval_s=14.1 save_cost_s=0.500 mtbi_s=200 "
            "interruptions=3 exposure_s=800 step_s=1.000 min_interval_s=4.0 max_interval_s=3600") in lines[0]


def test_the_startup_clock_splits_launch_to_first_step(monkeypatch):
    launched = time.time() - 30
    monkeypatch.setenv(recovery.LAUNCH_ENV, recovery.launch_env(launched, restore_s=12.0, data_s=3.0)
                       [recovery.LAUNCH_ENV])
    clock = recovery.StartupClock()
    time.sleep(0.05)
    clock.lap()  # not a phase of its own: other_s
    time.sleep(0.05)
    clock.lap("restore_s")
    startup = clock.first_step(step_s=9.0, compile_s=10.5, compile_in_step_s=7.5)  # 3 s before the step
    assert 30 <= startup["launch_to_first_step_s"] < 40
    assert 12.05 <= startup["restore_s"] < 13 and startup["data_s"] == 3.0
    assert startup["compile_s"] == 10.5 and startup["first_step_s"] == 1.5
    total = startup["launch_to_first_step_s"]
    assert math.isclose(sum(startup[phase] for phase in recovery.PHASES), total, abs_tol=0.01)
    monkeypatch.delenv(recovery.LAUNCH_ENV)  # a bare torchrun: from this process's start
    assert 0 < time.time() - recovery.StartupClock().launch < 3600


def test_an_interruption_record_and_the_history(tmp_path):
    startup = {"launch_to_first_step_s": 40.0, "restore_s": 20.0, "data_s": 5.0, "compile_s": 10.0,
               "first_step_s": 2.0, "other_s": 3.0}
    resumed = {"step": 500, "loop_state": {"train_time": 1000.0}, "world_size": 8, "stopped": False}
    killed = recovery.interruption("base", resumed, {"step": 530, "elapsed": 1090.0}, startup, world_size=4)
    assert killed["steps_lost"] == 30 and killed["lost_compute_s"] == 90 and killed["cause"] == "killed"
    assert killed["gpu_s_lost"] == 90 * 8 + 40 * 4  # lost steps on 8 GPUs, the relaunch on 4
    stopped = recovery.interruption("base", {**resumed, "stopped": True}, {"step": 500, "elapsed": 1000.0},
                                    startup, world_size=8)
    assert stopped["steps_lost"] == 0 and stopped["cause"] == "stopped" and stopped["gpu_s_lost"] == 320
    recovery.append(tmp_path, "tag", killed)
    recovery.append(tmp_path, "tag", {**stopped, "stage": "sft"})
    with recovery.history_path(tmp_path, "tag").open("a") as f:
        f.write('{"stage": "base", "steps_lo')  # torn by a kill mid-write
    assert [r["stage"] for r in recovery.read(tmp_path, "tag")] == ["base", "sft"]
    assert recovery.stage_history(tmp_path, "tag", "base") == (130.0, 1)
    assert recovery.stage_history(tmp_path, "other", "base") == (0.0, 0)


def test_last_logged_step_skips_evaluations_and_torn_lines(tmp_path):
    metrics = tmp_path / "train_base_tag.jsonl"
    assert recovery.last_logged_step(metrics) is None
    lines = [{"step": 9, "loss": 3.0, "elapsed": 9.0}, {"step": 10, "loss": 2.9, "elapsed": 10.0},
             {"step": 10, "val_bpb": 1.2}]
    metrics.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"step": 11, "lo')
    assert recovery.last_logged_step(metrics)["step"] == 10
