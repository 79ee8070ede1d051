"""Tests for trainer.optim: schedules, parameter routing, Newton-Schulz, bitwise resume via safetensors."""

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from trainer.model import GPT, GPTConfig, build_model
from trainer.optim import (
    HybridOptimizer,
    lr_multiplier,
    muon_momentum,
    weight_decay_multiplier,
    zeropower_via_newtonschulz5,
)

TINY = GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)
NUM_ITERATIONS = 6


def build(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return build_model(TINY, "cpu")


def train(model: GPT, opt: HybridOptimizer, steps: range) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(step)  # the batch depends on the step only, as after a resume
        idx = torch.randint(0, TINY.vocab_size, (4, TINY.sequence_len + 1), generator=g)
        opt.set_schedule(step, NUM_ITERATIONS)
        model(idx[:, :-1], idx[:, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_lr_multiplier():
    assert lr_multiplier(0, 100) == 1.0
    assert lr_multiplier(80, 100) == 1.0  # last flat step: warmdown is the final 20 steps
    assert lr_multiplier(90, 100) == 0.5
    assert lr_multiplier(100, 100) == 0.0
    assert lr_multiplier(90, 100, final_lr_frac=0.1) == pytest.approx(0.55)
    assert lr_multiplier(100, 100, final_lr_frac=0.1) == pytest.approx(0.1)
    assert lr_multiplier(0, 100, warmup_ratio=0.1) == pytest.approx(0.1)
    assert lr_multiplier(4, 100, warmup_ratio=0.1) == pytest.approx(0.5)
    assert lr_multiplier(10, 100, warmup_ratio=0.1) == 1.0
    assert lr_multiplier(50, 100, warmdown_ratio=0.0) == 1.0


def test_muon_momentum():
    assert muon_momentum(0) == pytest.approx(0.85)
    assert muon_momentum(150) == pytest.approx(0.90)
    assert muon_momentum(300) == pytest.approx(0.95)
    assert muon_momentum(10_000) == pytest.approx(0.95)


def test_weight_decay_multiplier():
    assert weight_decay_multiplier(0, 100) == 1.0
    assert weight_decay_multiplier(25, 100) == 0.75
    assert weight_decay_multiplier(100, 100) == 0.0


def test_parameter_routing_and_lr_scaling():
    model = build()
    opt = HybridOptimizer(model)
    kinds = {name: g.kind for g in opt.groups for name in g.params}
    assert kinds.keys() == dict(model.named_parameters()).keys()  # every parameter, exactly once
    assert kinds["transformer.wte.weight"] == "adamw" and kinds["lm_head.weight"] == "adamw"
    block_matrices = [
        n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.ndim == 2
    ]
    assert len(block_matrices) == 6 * TINY.n_layer
    assert all(kinds[n] == "muon" for n in block_matrices)
    scale = (TINY.n_embd / 768) ** -0.5
    lrs = {name: g.lr for g in opt.groups for name in g.params}
    assert lrs["lm_head.weight"] == pytest.approx(0.004 * scale)
    assert lrs["transformer.wte.weight"] == pytest.approx(0.2 * scale)
    assert lrs["transformer.h.0.attn.c_q.weight"] == 0.02


def test_set_schedule_sets_every_group():
    opt = HybridOptimizer(build(), weight_decay=0.1, final_lr_frac=0.2)
    opt.set_schedule(90, 100)  # halfway through the warmdown
    for g in opt.groups:
        assert g.lr == pytest.approx(g.initial_lr * 0.6)
        assert g.weight_decay == pytest.approx(0.1 * 0.1)
    muon = next(g for g in opt.groups if g.kind == "muon")
    assert muon.momentum == pytest.approx(muon_momentum(90))


def test_newton_schulz_orthogonalizes():
    g = torch.randn(32, 96, generator=torch.Generator().manual_seed(0))
    for m in (g, g.T):  # wide and tall
        s = torch.linalg.svdvals(zeropower_via_newtonschulz5(m))
        assert s.min() > 0.5 and s.max() < 1.5  # ~US'V^T, S' in roughly (0.7, 1.2)
    assert torch.linalg.svdvals(g).max() > 10  # the input was far from orthogonal


def test_first_step_sizes():
    """AdamW's first step is lr * sign(grad); Muon's has singular values ~lr, x sqrt(rows/cols) if tall."""
    model = build()
    opt = HybridOptimizer(model)
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    lrs = {name: grp.lr for grp in opt.groups for name in grp.params}
    params = dict(model.named_parameters())
    for name in ("lm_head.weight", "transformer.wte.weight"):
        expected = before[name] - lrs[name] * params[name].grad.sign()
        assert torch.allclose(params[name], expected, rtol=0, atol=1e-6), name
    for name, scale in (
        ("transformer.h.0.attn.c_q.weight", 1.0),
        ("transformer.h.0.mlp.c_proj.weight", 1.0),
        ("transformer.h.0.mlp.c_fc.weight", 2.0),  # 128x32, tall by 4: scaled by sqrt(4)
    ):
        s = torch.linalg.svdvals(params[name] - before[name]) / (lrs[name] * scale)
        assert s.min() > 0.5 and s.max() < 1.5, name


def test_muon_uses_nesterov_momentum():
    model = build()
    opt = HybridOptimizer(model)
    p = model.transformer.h[1].attn.c_v.weight  # square: no aspect scaling
    lr, m = opt.groups[2].lr, opt.groups[2].momentum
    g1, g2 = torch.randn(2, *p.shape, generator=torch.Generator().manual_seed(0))
    p.grad = g1.clone()
    opt.step()
    before = p.detach().clone()
    p.grad = g2.clone()
    opt.step()
    buf = (1 - m) * m * g1 + (1 - m) * g2  # EMA of gradients after two steps, from zero
    expected = before - lr * zeropower_via_newtonschulz5(g2 + m * (buf - g2))  # look ahead along buf
    assert torch.allclose(p, expected, rtol=0, atol=1e-6)


def test_state_tensors_are_named_and_safetensors_ready(tmp_path: Path):
    model = build()
    opt = HybridOptimizer(model)
    train(model, opt, range(3))  # zero-init projections: c_q first gets a gradient on the 3rd step
    state = opt.state_tensors()
    assert state["adamw.transformer.wte.weight.step"].item() == 3
    assert state["adamw.lm_head.weight.exp_avg"].abs().sum() > 0
    assert state["muon.transformer.h.0.attn.c_q.weight.momentum_buffer"].abs().sum() > 0
    n_adamw, n_muon = 2, 6 * TINY.n_layer
    assert len(state) == 3 * n_adamw + n_muon
    save_file(state, str(tmp_path / "optim.safetensors"))  # raises on shared or non-contiguous tensors


def test_resume_is_bitwise_exact(tmp_path: Path):
    model = build()
    opt = HybridOptimizer(model, weight_decay=0.1)
    train(model, opt, range(3))
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    save_file(opt.state_tensors(), str(tmp_path / "optim.safetensors"))

    resumed = build(seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    resumed_opt = HybridOptimizer(resumed, weight_decay=0.1)
    resumed_opt.load_state_tensors(load_file(str(tmp_path / "optim.safetensors")))

    fresh_state = build(seed=123)  # same weights, optimizer state NOT restored: must diverge
    fresh_state.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    fresh_opt = HybridOptimizer(fresh_state, weight_decay=0.1)

    train(model, opt, range(3, NUM_ITERATIONS))
    train(resumed, resumed_opt, range(3, NUM_ITERATIONS))
    train(fresh_state, fresh_opt, range(3, NUM_ITERATIONS))
    params = dict(model.named_parameters())
    for name, p in resumed.named_parameters():
        assert torch.equal(p, params[name]), name
    assert not all(torch.equal(p, params[n]) for n, p in fresh_state.named_parameters())


def test_load_rejects_missing_unexpected_and_misshapen_keys():
    opt = HybridOptimizer(build())
    state = dict(opt.state_tensors())
    missing = "muon.transformer.h.1.mlp.c_fc.weight.momentum_buffer"
    del state[missing]
    with pytest.raises(ValueError, match=f"missing keys \\['{missing}'\\]"):
        opt.load_state_tensors(state)

    state = dict(opt.state_tensors(), **{"adamw.bogus.exp_avg": torch.zeros(1)})
    with pytest.raises(ValueError, match="adamw.bogus.exp_avg"):
        opt.load_state_tensors(state)

    state = dict(opt.state_tensors())
    state["adamw.lm_head.weight.exp_avg"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="adamw.lm_head.weight.exp_avg"):
        opt.load_state_tensors(state)


def test_step_changes_weights_and_zero_grad():
    model = build()
    opt = HybridOptimizer(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, opt, range(3))
    for name, p in model.named_parameters():
        assert not torch.equal(p, before[name]), name
        assert p.grad is None
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)).backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in model.parameters())
    assert math.isfinite(sum(p.abs().sum().item() for p in model.parameters()))
