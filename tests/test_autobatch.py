"""`--device-batch-size auto` (trainer.autobatch): the search against a memory limit, on a memory curve and
on the real training step with an injected out-of-memory, leaving no trace in the trajectory; the fixed
sizes; the out-of-memory report `phoenix run` reads. The halving relaunch: tests/test_run_oom.py."""

from __future__ import annotations

import pytest
import torch

from tests.sharded_worker import TINY, build, global_batch, train
from trainer.autobatch import (
    TEST_OOM_VARIABLE,
    TrialSteps,
    activation_bytes_per_token,
    parse_device_batch,
    power_of_two_sizes,
    resolve_device_batch,
    search,
)
from trainer.distributed import Dist
from trainer.model import config_for_depth
from trainer.out_of_memory import OutOfMemory, parse_report
from trainer.runtime import ConfigError, compute_setup

CPU = torch.device("cpu")
ONE = Dist(0, 0, 1, CPU)


def memory_curve(base: float, per_row: float, oom_above: int = 1 << 30):
    """A card as the search sees it: the peak share of the budget at `rows` (None past `oom_above`),
    and every size asked."""
    asked: list[int] = []

    def measure(rows: int) -> float | None:
        asked.append(rows)
        return None if rows > oom_above else base + per_row * rows

    return measure, asked


SIZES = [1, 2, 4, 8, 16, 32, 64]


@pytest.mark.parametrize("first", SIZES)
def test_search_finds_the_largest_size_under_the_budget_from_any_first_guess(first):
    measure, asked = memory_curve(base=0.2, per_row=0.03)  # 0.2 + 0.03 x 16 = 0.68 fits, x 32 = 1.16 not
    chosen, tried = search(SIZES, first, 0.2, measure)
    assert chosen == 16
    assert all(use is not None and use <= 1 for size, use in tried.items() if size <= 16)
    # From a guess under the answer it never tries 32: the measured memory per row projects it over budget.
    assert 32 not in asked if first <= 16 else asked[0] == first
    assert len(asked) == len(set(asked)) <= 7


def test_search_stops_at_an_out_of_memory_the_projection_did_not_see():
    measure, asked = memory_curve(base=0.1, per_row=0.01, oom_above=8)  # fragmentation, say: 16 runs out
    chosen, tried = search(SIZES, 4, 0.1, measure)
    assert chosen == 8 and tried[16] is None and asked == [4, 8, 16]


def test_search_finds_nothing_when_one_row_does_not_fit():
    measure, asked = memory_curve(base=0.9, per_row=0.2)
    assert search(SIZES, 4, 0.9, measure) == (None, {4: pytest.approx(1.7), 2: pytest.approx(1.3),
                                                       1: pytest.approx(1.1)})


def test_sizes_and_settings():
    assert power_of_two_sizes(64, True) == [1, 2, 4, 8, 16, 32, 64]
    assert power_of_two_sizes(24, True) == [1, 2, 4, 8]  # a micro-batch of lanes must divide them
    assert power_of_two_sizes(24, False) == [1, 2, 4, 8, 16]  # SFT's need not
    assert parse_device_batch("auto") is None and parse_device_batch("16") == 16
    for bad in ("0", "-4", "big", "1.5"):
        with pytest.raises(ConfigError, match="--device-batch-size"):
            parse_device_batch(bad)


def test_a_fixed_size_is_kept_or_lowered_to_split_the_rows_per_rank():
    model, optimizer = build(ONE)
    trials = TrialSteps(model, torch.autocast("cpu", enabled=False), model, optimizer, ONE, TINY.sequence_len)
    assert resolve_device_batch("base", 3, 4, 8, trials, 0, divisors_only=True) == 2  # lanes: 8 / 2
    assert resolve_device_batch("sft", 3, 4, 8, trials, 0) == 3
    assert resolve_device_batch("base", None, 4, 8, trials, 0, divisors_only=True) == 4  # auto on a CPU
    assert resolve_device_batch("base", 32, 4, 8, trials, 0, divisors_only=True) == 8


def test_search_on_the_real_step_against_an_injected_limit_leaves_no_trace(monkeypatch):
    """Real forward + backward + optimizer step of the tiny model at 8, 4, 2 rows; more than 2 rows run
    out of memory. The search picks 2, and the weights, optimizer state, RNG, and therefore the next
    training steps, are bitwise those of a model that was never searched."""
    monkeypatch.setenv(TEST_OOM_VARIABLE, "rows=2")
    model, optimizer = build(ONE)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    rng = torch.get_rng_state()
    train_model, autocast = compute_setup(model, ONE, "off")
    trials = TrialSteps(train_model, autocast, model, optimizer, ONE, TINY.sequence_len)
    chosen, tried = search([1, 2, 4, 8], 8, trials.held(), trials)
    assert (chosen, tried) == (2, {8: None, 4: None, 2: 0.0})
    # The optimizer step ran at 2 rows: the restore below has work to do.
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    torch.rand(1)  # what a step drawing random numbers would do to the RNG
    trials.restore()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert torch.equal(torch.get_rng_state(), rng)

    monkeypatch.delenv(TEST_OOM_VARIABLE)
    never_searched, its_optimizer = build(ONE)
    train(model, optimizer, range(2), slice(None), micro_batches=4)
    train(never_searched, its_optimizer, range(2), slice(None), micro_batches=4)
    for (name, a), b in zip(model.named_parameters(), never_searched.parameters(), strict=True):
        assert torch.equal(a, b), name
    x, y = global_batch(2)
    assert torch.equal(model(x, y), never_searched(x, y))


def test_the_first_guess_arithmetic_grows_with_depth_width_and_vocab():
    d20, d26 = config_for_depth(20, 32768, 2048), config_for_depth(26, 32768, 2048)
    # d20 at bf16: 20 layers x 10.5 x 1280 x 2 bytes + 8 bytes x 32768 vocab.
    assert activation_bytes_per_token(d20) == 20 * 2 * 1280 * 10.5 + 8 * 32768
    assert activation_bytes_per_token(d26) > activation_bytes_per_token(d20)


def test_the_report_line_round_trips():
    stop = OutOfMemory("sft", 13, 32, 79.1)
    line = f"2026-12-01 10:00:00,000 ERROR phoenix.train {stop.report()} rank=3"
    assert parse_report(line) == stop
    assert parse_report("step 00013/00030 | loss 4.2") is None
