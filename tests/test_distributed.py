"""The sharded optimizer step (trainer.distributed): owners by name, two real ranks over gloo against one
process on the same global batch, each rank's state limited to its names, each rank's share saved in a
file of its own and read back on any world size (1 -> 2 -> 1). The trainer's kill -9 tests (test_train.py,
test_sft.py) run it end to end."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.sharded_worker import STEPS, TINY, build, global_batch
from trainer import checkpoint_layout as layout
from trainer.distributed import Dist, ShardedOptimizer, assign_owners
from trainer.model import build_model
from trainer.optim import HybridOptimizer
from trainer.resume import restore_trajectory

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def test_owners_are_deterministic_balanced_and_cover_every_name_once():
    model = build_model(TINY, "cpu")
    sizes = [(name, p.numel()) for name, p in model.named_parameters()]
    for world in (1, 2, 3, 8):
        owners = assign_owners(sizes, world)
        assert list(owners) == [name for name, _ in sizes]  # every name, once, in model order
        assert owners == assign_owners(list(sizes), world)
        loads = [sum(n for name, n in sizes if owners[name] == r) for r in range(world)]
        assert max(loads) - min(loads) <= max(n for _, n in sizes), loads
        if world <= len(sizes):
            assert min(loads) > 0
    assert set(assign_owners(sizes, 1).values()) == {0}
    # Largest first to the least loaded: three equal big ones on two ranks go 0, 1, 0.
    assert assign_owners([("a", 5), ("b", 9), ("c", 9), ("d", 9)], 2) == {"a": 1, "b": 0, "c": 1, "d": 0}


def test_one_process_is_the_plain_optimizer_bitwise():
    """World size 1 runs the sharded code with no collective: the same trajectory as HybridOptimizer."""
    sharded_model, sharded = build(Dist(0, 0, 1, CPU))
    torch.manual_seed(0)
    plain_model = build_model(TINY, "cpu")
    plain = HybridOptimizer(plain_model, weight_decay=0.1)
    for step in range(3):
        x, y = global_batch(step)
        for model, optimizer in ((sharded_model, sharded), (plain_model, plain)):
            optimizer.set_schedule(step, 6)
            model(x, y).backward()
            optimizer.step()
            optimizer.zero_grad()
    for (name, a), b in zip(sharded_model.named_parameters(), plain_model.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert sharded.state_share().keys() == plain.state_tensors().keys()


def test_a_replaced_gradient_is_a_clear_error_not_a_silent_desync():
    model, optimizer = build(Dist(0, 0, 1, CPU))
    model.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="no longer points into the gradient buffer"):
        optimizer.step()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sharded")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "tests.sharded_worker", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def test_two_ranks_step_exactly_as_one_process_on_the_same_global_batch(two_ranks):
    """Halving is exact in binary, so (g_a + g_b) / 2 equals g_a / 2 + g_b / 2: bitwise on CPU."""
    reference = load_file(str(two_ranks / "reference_model.safetensors"))
    for rank in (0, 1):
        weights = load_file(str(two_ranks / f"model_rank{rank}.safetensors"))
        assert weights.keys() == reference.keys()
        for name, tensor in reference.items():
            assert torch.equal(weights[name], tensor), (rank, name)


def test_each_rank_holds_the_state_of_its_own_names_only(two_ranks):
    ranks = [json.loads((two_ranks / f"rank{r}.json").read_text()) for r in (0, 1)]
    owned = [set(r["owned"]) for r in ranks]
    assert owned[0] and owned[1] and not owned[0] & owned[1]
    assert owned[0] | owned[1] == set(ranks[0]["owners"])
    for rank, info in enumerate(ranks):
        assert {name for name, r in info["owners"].items() if r == rank} == owned[rank]
        # Every state key names one of this rank's parameters, and each of them has its full state.
        assert {key.split(".", 1)[1].rsplit(".", 1)[0] for key in info["state_keys"]} == owned[rank]
    full = load_file(str(two_ranks / "reference_optimizer.safetensors"))
    total = sum(t.numel() for t in full.values())
    assert ranks[0]["state_numel"] + ranks[1]["state_numel"] == total
    assert max(r["state_numel"] for r in ranks) < 0.75 * total  # memory: neither rank holds it all


def test_the_two_shares_together_are_the_one_process_state(two_ranks):
    shares = [load_file(str(two_ranks / f"share_rank{rank}.safetensors")) for rank in (0, 1)]
    reference = load_file(str(two_ranks / "reference_optimizer.safetensors"))
    assert shares[0] and shares[1] and not shares[0].keys() & shares[1].keys()
    merged = {**shares[0], **shares[1]}
    assert sorted(merged) == sorted(reference)
    for key, tensor in reference.items():
        assert merged[key].dtype == tensor.dtype and torch.equal(merged[key], tensor), key


def test_a_one_process_checkpoint_resumes_on_two_ranks_exactly(two_ranks):
    expected = load_file(str(two_ranks / "reference_model_next.safetensors"))
    for rank in (0, 1):
        resumed = load_file(str(two_ranks / f"resumed_model_rank{rank}.safetensors"))
        for name, tensor in expected.items():
            assert torch.equal(resumed[name], tensor), (rank, name)


def test_checkpoint_files_resume_1_2_1_processes_bitwise(two_ranks):
    """The trainer's save: one file per rank's share, listed in the manifest; any world size reads it."""
    saved = layout.complete_checkpoints(layout.stage_dir(two_ranks, "base", "sharded"))
    assert [c.step for c in saved] == [STEPS + 1, STEPS]
    two, one = saved
    assert [n for n in one.files if "optimizer" in n] == ["optimizer-00000-of-00001.safetensors"]
    shares = sorted(n for n in two.files if "optimizer" in n)
    assert shares == ["optimizer-00000-of-00002.safetensors", "optimizer-00001-of-00002.safetensors"]
    for rank, name in enumerate(shares):  # each rank's file holds the state of its own names only
        owned = json.loads((two_ranks / f"rank{rank}.json").read_text())["owned"]
        keys = load_file(str(two.path / name)).keys()
        assert {key.split(".", 1)[1].rsplit(".", 1)[0] for key in keys} == set(owned)
    expected = load_file(str(two_ranks / "reference_model_final.safetensors"))
    resumed = load_file(str(two_ranks / "resumed_121_model.safetensors"))
    for name, tensor in expected.items():
        assert torch.equal(resumed[name], tensor), name


def test_a_checkpoint_with_one_gathered_optimizer_file_still_resumes(two_ranks, tmp_path):
    """Checkpoints written before the shares were saved in parallel hold `optimizer.safetensors`."""
    one = layout.complete_checkpoints(layout.stage_dir(two_ranks, "base", "sharded"))[-1]
    tmp = layout.new_tmp_dir(tmp_path / "old", one.step)
    for name in one.files:
        shutil.copy(one.path / name, tmp / ("optimizer.safetensors" if "optimizer" in name else name))
    old = layout.publish(tmp, one.step, stage="base")
    assert "optimizer.safetensors" in old.files
    model, optimizer = build(Dist(0, 0, 1, CPU))
    restore_trajectory(old, old.meta(), model, optimizer, Dist(0, 0, 1, CPU), seed=0)
    reference = load_file(str(two_ranks / "reference_optimizer.safetensors"))
    assert optimizer.state_share().keys() == reference.keys()
    assert all(torch.equal(optimizer.state_share()[key], tensor) for key, tensor in reference.items())


def test_loading_refuses_a_state_of_another_model(two_ranks):
    saved = load_file(str(two_ranks / "reference_optimizer.safetensors"))
    _, optimizer = build(Dist(0, 0, 1, CPU))
    keys = [k for k in saved if "c_fc" not in k] + ["adamw.bogus.exp_avg"]
    with pytest.raises(ValueError, match=r"missing keys \['muon.transformer.h.0.mlp.c_fc.*unexpected "
                                         r"\['adamw.bogus.exp_avg'\]"):
        optimizer.load_state(keys, lambda names: {k: saved[k] for k in names})


def test_sharded_optimizer_refuses_mixed_dtypes():
    model = build_model(TINY, "cpu")
    model.lm_head.to(torch.bfloat16)
    with pytest.raises(ValueError, match="one parameter dtype"):
        ShardedOptimizer(model, Dist(0, 0, 1, CPU))
