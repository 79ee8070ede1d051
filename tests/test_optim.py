"""Tests for trainer.optim, trainer.muon, trainer.recipe: each piece of nanochat's recipe against a reference
computed here (schedules at their breakpoints, Polar Express, NorMuon, cautious decay, scaling rules), then
routing, name-keyed state and bitwise resume via safetensors."""

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from trainer.model import GPT, GPTConfig, build_model, config_for_depth
from trainer.muon import (
    POLAR_EXPRESS_COEFFS,
    cautious_mask,
    equilibrate_rows,
    muon_update,
    normuon,
    polar_express,
    renormalize,
)
from trainer.optim import HybridOptimizer, lr_multiplier, muon_momentum, weight_decay_multiplier
from trainer.recipe import auto_total_batch_size, plan, scaling_params
from trainer.resume import check_optimizer_recipe
from trainer.runtime import ConfigError

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


# --- schedules: nanochat's base_train.py at their breakpoints -------------------------------------------


def test_lr_multiplier_warmup_flat_and_warmdown_to_five_percent():
    n = 1000  # warmdown = round(0.65 * 1000) = 650 steps: flat through step 350
    assert lr_multiplier(0, n) == pytest.approx(1 / 40)
    assert lr_multiplier(19, n) == pytest.approx(0.5)
    assert lr_multiplier(39, n) == 1.0 and lr_multiplier(40, n) == 1.0
    assert lr_multiplier(350, n) == 1.0
    assert lr_multiplier(351, n) == pytest.approx(649 / 650 + (1 / 650) * 0.05)
    assert lr_multiplier(675, n) == pytest.approx(0.5 + 0.5 * 0.05)
    assert lr_multiplier(1000, n) == pytest.approx(0.05)
    assert lr_multiplier(90, 100, warmup_steps=0, warmdown_ratio=1.0, final_lr_frac=0.0) == pytest.approx(0.1)


def test_muon_momentum_ramps_holds_then_falls_in_the_warmdown():
    n = 10_000  # warmdown starts at step 3500
    assert muon_momentum(0, n) == pytest.approx(0.85)
    assert muon_momentum(200, n) == pytest.approx(0.91)
    assert muon_momentum(400, n) == pytest.approx(0.97)
    assert muon_momentum(3500, n) == pytest.approx(0.97)
    assert muon_momentum(3500 + 3250, n) == pytest.approx(0.935)
    assert muon_momentum(n, n) == pytest.approx(0.90)
    assert muon_momentum(300, 500) == pytest.approx(0.94)  # warmdown from 175, but the ramp wins first


def test_weight_decay_follows_a_cosine_to_zero():
    assert weight_decay_multiplier(0, 100) == 1.0
    assert weight_decay_multiplier(25, 100) == pytest.approx((1 + math.sqrt(0.5)) / 2)
    assert weight_decay_multiplier(50, 100) == pytest.approx(0.5)
    assert weight_decay_multiplier(100, 100) == pytest.approx(0.0, abs=1e-12)


def test_set_schedule_sets_every_group():
    opt = HybridOptimizer(build(), weight_decay=0.1)
    opt.set_schedule(500, 1000)  # inside the warmdown (from 350)
    for g in opt.groups:
        assert g.lr == pytest.approx(g.initial_lr * lr_multiplier(500, 1000))
    muon = next(g for g in opt.groups if g.kind == "muon")
    assert muon.weight_decay == pytest.approx(0.1 * 0.5)
    assert muon.momentum == pytest.approx(muon_momentum(500, 1000))
    adamw = {name: g.weight_decay for g in opt.groups if g.kind == "adamw" for name in g.params}
    assert adamw == {"lm_head.weight": 0.01, "transformer.wte.weight": 0.001, "value_embeds.1.weight": 0.01,
                     "resid_lambdas": 0.05, "x0_lambdas": 0.0, "smear_gate.weight": 0.0, "smear_lambda": 0.0,
                     "backout_lambda": 0.0}  # constant, not scheduled


# --- Muon's pieces ---------------------------------------------------------------------------------------


def known_svd(rows: int, cols: int, singular_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(rows * 100 + cols)
    U, _ = torch.linalg.qr(torch.randn(rows, rows, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(cols, cols, generator=g, dtype=torch.float64))
    k = min(rows, cols)
    U, V = U[:, :k], V[:, :k]
    return U @ torch.diag(singular_values) @ V.T, U, V


@pytest.mark.parametrize("rows,cols", [(12, 20), (20, 12)])  # wide and tall
def test_polar_express_maps_each_singular_value_through_its_polynomials(rows, cols):
    s = torch.logspace(0, -1.5, min(rows, cols), dtype=torch.float64)
    G, U, V = known_svd(rows, cols, s)
    # By hand: normalise by 1.01 x Frobenius norm, then x -> a x + b x^3 + c x^5 per iteration.
    x = s / (s.norm() * 1.01 + 1e-6)
    for steps, (a, b, c) in enumerate(POLAR_EXPRESS_COEFFS, start=1):
        x = a * x + b * x**3 + c * x**5
        out = polar_express(G.float(), steps=steps).double()
        # Same singular vectors as G: U^T X V is diagonal, and its diagonal is the polynomial image.
        assert torch.allclose(U.T @ out @ V, torch.diag(x), atol=2e-4), steps
    assert x.min() > 0.8 and x.max() < 1.2  # five iterations bring a 30x spread to ~1
    polar = U @ V.T  # the exact polar factor, from the SVD
    out = polar_express(G.float()).double()
    assert (out - polar).norm() / polar.norm() < 0.15
    assert torch.linalg.svdvals(G).max() / torch.linalg.svdvals(G).min() > 30  # far from orthogonal


def test_polar_express_orthogonalises_a_random_matrix():
    g = torch.randn(32, 96, generator=torch.Generator().manual_seed(0))
    for m in (g, g.T):
        s = torch.linalg.svdvals(polar_express(m))
        assert s.min() > 0.8 and s.max() < 1.2  # Newton-Schulz's fixed quintic leaves ~0.7..1.2


def test_row_equilibration_and_renormalisation():
    X = torch.tensor([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0]])  # row norms 5, 1, 10
    eq = equilibrate_rows(X)
    mean_row = X.norm() / math.sqrt(3)
    assert torch.allclose(eq.norm(dim=1), torch.full((3,), float(mean_row)))
    assert torch.allclose(eq[0] / eq[0].norm(), X[0] / 5)  # directions kept
    assert renormalize(X).norm() == pytest.approx(math.sqrt(2))  # sqrt(min(3, 2))


def test_normuon_equalises_rows_keeps_the_norm_and_tracks_the_mean_square():
    U = torch.tensor([[1.0, 1.0], [2.0, 2.0]])  # square: one statistic per row
    buf = torch.zeros(2, 1)
    out = normuon(U, buf)
    # Row mean squares 1 and 4 -> buffer 0.1 x that from zero; rows divided by sqrt(buffer) become equal,
    # then the whole is rescaled to ||U|| = sqrt(10): every entry sqrt(10) / 2.
    assert torch.allclose(buf, torch.tensor([[0.1], [0.4]]))
    assert torch.allclose(out, torch.full((2, 2), math.sqrt(10) / 2))
    out = normuon(U, buf)
    assert torch.allclose(buf, torch.tensor([[0.19], [0.76]]))
    assert torch.allclose(out, torch.full((2, 2), math.sqrt(10) / 2))
    wide, wide_buf = torch.tensor([[1.0, 2.0, 1.0], [1.0, 2.0, 1.0]]), torch.zeros(1, 3)  # per column
    assert torch.allclose(normuon(wide, wide_buf), torch.full((2, 3), math.sqrt(2)))  # ||wide|| = sqrt(12)
    assert torch.allclose(wide_buf, torch.tensor([[0.1, 0.4, 0.1]]))


def test_cautious_mask_decays_only_where_the_step_already_shrinks_the_weight():
    update = torch.tensor([1.0, -1.0, 1.0, -1.0, 0.0])
    p = torch.tensor([2.0, 2.0, -2.0, -2.0, 1.0])
    assert cautious_mask(update, p).tolist() == [True, False, False, True, True]
    # In a full Muon step: the weight-decay term is lr * wd * p where update and p share a sign, else 0.
    gen = torch.Generator().manual_seed(1)
    p0, grad = torch.randn(8, 8, generator=gen), torch.randn(8, 8, generator=gen)
    results = []
    for wd in (0.0, 0.5):
        p = p0.clone()
        muon_update(p, grad, torch.zeros(8, 8), torch.zeros(8, 1), lr=0.1, weight_decay=wd, momentum=0.9)
        results.append(p)
    update = (p0 - results[0]) / 0.1
    expected = -0.1 * 0.5 * p0 * (update * p0 >= 0)
    assert torch.allclose(results[1] - results[0], expected, atol=1e-6)
    assert 0 < int((update * p0 >= 0).sum()) < 64  # both cases occur


def test_a_stack_of_same_shape_matrices_updates_as_each_one_alone():
    """What a sharded optimizer batches (nanochat stacks same-shape matrices): no statistic leaks across."""
    gen = torch.Generator().manual_seed(0)
    P, G = torch.randn(3, 8, 16, generator=gen), torch.randn(3, 8, 16, generator=gen)
    stacked = P.clone()
    hyper = dict(lr=0.1, weight_decay=0.2, momentum=0.9)
    muon_update(stacked, G, torch.zeros_like(P), torch.zeros(3, 1, 16), **hyper)
    for i in range(3):
        alone = P[i].clone()
        muon_update(alone, G[i], torch.zeros(8, 16), torch.zeros(1, 16), **hyper)
        assert torch.allclose(alone, stacked[i], rtol=0, atol=1e-6), i


# --- scaling rules (nanochat's base_train.py) ------------------------------------------------------------


def test_lr_and_weight_decay_scale_with_batch_and_horizon():
    p = plan(scaling=4_000, reference_scaling=1_000, ratio=10, total_batch_size=2**21, num_iterations=-1,
             weight_decay=0.28)
    assert p.target_tokens == 40_000 and p.num_iterations == 0  # tokens // batch
    assert p.lr_scale == pytest.approx(2.0)  # sqrt(2^21 / 2^19)
    assert p.weight_decay == pytest.approx(0.28 * 2.0 * 10_000 / 40_000)
    same = plan(1_000, 1_000, 10, 2**19, 7, 0.28)
    assert (same.lr_scale, same.weight_decay, same.num_iterations) == (1.0, pytest.approx(0.28), 7)


def test_auto_batch_grows_as_tokens_to_the_0383_and_rounds_to_a_power_of_two():
    assert auto_total_batch_size(1e9, 1e9) == 2**19
    assert auto_total_batch_size(8e9, 1e9) == 2**20  # 8^0.383 = 2.22 -> nearest power of two is 2
    assert auto_total_batch_size(1e9 * 2**(1.4 / 0.383), 1e9) == 2**20  # 2^1.4: rounds down
    assert auto_total_batch_size(1e9 * 2**(1.6 / 0.383), 1e9) == 2**21  # 2^1.6: rounds up


@pytest.mark.parametrize("depth,iterations", [(20, 4980), (24, 8352), (26, 10510)])
def test_gpu_presets_get_nanochats_horizon(depth, iterations):
    """The numbers nanochat's base_train.py prints at vocab 32768."""
    with torch.device("meta"):
        model, reference = GPT(config_for_depth(depth, 32768, 2048)), GPT(config_for_depth(12, 32768, 2048))
    count = lambda m: scaling_params((n, p.numel()) for n, p in m.named_parameters())  # noqa: E731
    width = depth * 64
    # Blocks' matrices (the value-embedding gates, 12 x heads on every other layer, too) + lm_head; not
    # the embeddings (token and value), not the scalars.
    ve_gates = (depth + 1) // 2 * 12 * (width // 128)
    assert count(model) == depth * 12 * width**2 + ve_gates + 32768 * width
    p = plan(count(model), count(reference), 12.0, -1, -1, 0.28)
    assert (p.total_batch_size, p.num_iterations) == (2**20, iterations)
    assert p.lr_scale == pytest.approx(math.sqrt(2))


# --- the optimizer ---------------------------------------------------------------------------------------


def test_parameter_routing_and_lr_scaling():
    model = build()
    opt = HybridOptimizer(model)
    kinds = {name: g.kind for g in opt.groups for name in g.params}
    assert kinds.keys() == dict(model.named_parameters()).keys()  # every parameter, exactly once
    assert kinds["transformer.wte.weight"] == "adamw" and kinds["lm_head.weight"] == "adamw"
    block_params = [n for n, _ in model.named_parameters() if n.startswith("transformer.h.")]
    # 6 matrices per block, and the value-embedding gate of every other layer (the last one's here).
    assert len(block_params) == 6 * TINY.n_layer + 1 and all(kinds[n] == "muon" for n in block_params)
    scale = (TINY.n_embd / 768) ** -0.5
    groups = {name: g for g in opt.groups for name in g.params}
    assert groups["lm_head.weight"].lr == pytest.approx(0.008 * scale)
    assert groups["lm_head.weight"].betas == (0.8, 0.96)
    assert groups["transformer.wte.weight"].lr == pytest.approx(0.3 * scale)
    assert groups["transformer.wte.weight"].betas == (0.8, 0.995)
    assert groups["transformer.h.0.attn.c_q.weight"].lr == 0.02
    state = opt.state_tensors()
    assert state["muon.transformer.h.0.mlp.c_fc.weight.second_momentum_buffer"].shape == (128, 1)  # tall
    assert state["muon.transformer.h.0.mlp.c_proj.weight.second_momentum_buffer"].shape == (1, 128)  # wide


def test_nanochats_scalar_value_embedding_and_smear_groups():
    opt = HybridOptimizer(build(), scalar_lr=0.5, embedding_lr=0.3)
    groups = {name: g for g in opt.groups for name in g.params}
    assert groups["resid_lambdas"].lr == pytest.approx(0.005)
    assert groups["resid_lambdas"].base_weight_decay == 0.05
    assert groups["x0_lambdas"].lr == 0.5 and groups["x0_lambdas"].betas == (0.96, 0.95)
    assert groups["value_embeds.1.weight"].lr == pytest.approx(0.15 * (TINY.n_embd / 768) ** -0.5)
    assert opt.state_tensors()["adamw.resid_lambdas.exp_avg"].shape == (TINY.n_layer,)
    # Smear and backout: lr 0.2 whatever the (batch-scaled) lrs passed in, no weight decay.
    scaled = HybridOptimizer(build(), unembedding_lr=1.0, embedding_lr=1.0, scalar_lr=1.0)
    for opt_ in (opt, scaled):
        groups = {name: g for g in opt_.groups for name in g.params}
        for name in ("smear_gate.weight", "smear_lambda", "backout_lambda"):
            assert groups[name].lr == 0.2 and groups[name].betas == (0.8, 0.95), name
            assert groups[name].base_weight_decay == 0.0, name


def test_first_step_sizes():
    """AdamW's first step is lr * sign(grad) after its decay; Muon's keeps the norm Muon+ snapped it to:
    ||dW||_F = lr x sqrt(min(m, n)), x sqrt(m / n) if tall (NorMuon rescales rows but keeps the norm)."""
    model = build()
    opt = HybridOptimizer(model, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    groups = {name: grp for grp in opt.groups for name in grp.params}
    params = dict(model.named_parameters())
    for name in ("lm_head.weight", "transformer.wte.weight"):
        lr, wd = groups[name].lr, groups[name].weight_decay
        expected = before[name] * (1 - lr * wd) - lr * params[name].grad.sign()
        assert torch.allclose(params[name], expected, rtol=0, atol=1e-6), name
    for name, expected in (
        ("transformer.h.0.attn.c_q.weight", math.sqrt(32)),
        ("transformer.h.0.mlp.c_proj.weight", math.sqrt(32)),  # 32x128: wide
        ("transformer.h.0.mlp.c_fc.weight", math.sqrt(32) * 2.0),  # 128x32: tall by 4, x sqrt(4)
    ):
        step_norm = (params[name] - before[name]).norm().item() / groups[name].lr
        assert step_norm == pytest.approx(expected, rel=1e-4), name


def test_muon_keeps_a_nesterov_momentum_buffer():
    model = build()
    opt = HybridOptimizer(model)
    p = model.transformer.h[1].attn.c_v.weight
    m = opt.groups[-1].momentum
    g1, g2 = torch.randn(2, *p.shape, generator=torch.Generator().manual_seed(0))
    p.grad = g1.clone()
    opt.update("transformer.h.1.attn.c_v.weight")
    p.grad = g2.clone()
    opt.update("transformer.h.1.attn.c_v.weight")
    buf = opt.state_tensors()["muon.transformer.h.1.attn.c_v.weight.momentum_buffer"]
    assert torch.allclose(buf, (1 - m) * m * g1 + (1 - m) * g2, atol=1e-7)  # EMA of gradients from zero


def test_updates_are_per_parameter_so_ranks_can_split_them_by_name():
    """The sharding hook: any partition of param_names, each part updated on its own, equals step()."""
    whole, split = build(), build()
    opt_whole, opt_split = HybridOptimizer(whole), HybridOptimizer(split)
    for model in (whole, split):
        g = torch.Generator().manual_seed(3)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
    opt_whole.step()
    names = opt_split.param_names
    for rank in (1, 0):  # two "ranks", reverse order: no update depends on another's
        for name in names[rank::2]:
            opt_split.update(name)
    for (name, a), b in zip(whole.named_parameters(), split.parameters(), strict=True):
        assert torch.equal(a, b), name
    for key, t in opt_whole.state_tensors().items():
        assert torch.equal(t, opt_split.state_tensors()[key]), key


def test_state_tensors_are_named_and_safetensors_ready(tmp_path: Path):
    model = build()
    opt = HybridOptimizer(model)
    train(model, opt, range(3))  # zero-init projections: c_q first gets a gradient on the 3rd step
    state = opt.state_tensors()
    assert state["adamw.transformer.wte.weight.step"].item() == 3
    assert state["adamw.lm_head.weight.exp_avg"].abs().sum() > 0
    assert state["muon.transformer.h.0.attn.c_q.weight.momentum_buffer"].abs().sum() > 0
    assert state["muon.transformer.h.0.attn.c_q.weight.second_momentum_buffer"].abs().sum() > 0
    n_adamw, n_muon = 8, 6 * TINY.n_layer + 1  # wte, lm_head, a value embedding, 5 scalars; + a gate
    assert len(state) == 3 * n_adamw + 2 * n_muon
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


def test_a_checkpoint_of_the_old_optimizer_is_refused_in_one_line(tmp_path: Path):
    """Written before NorMuon: no second-moment state and no recorded recipe. Resuming would start NorMuon
    from zero mid-run and change the trajectory, so the trainer refuses (exit 2, one `error:` line)."""
    opt = HybridOptimizer(build())
    old_state = {k: v for k, v in opt.state_tensors().items() if "second_momentum" not in k}
    with pytest.raises(ValueError, match="missing keys .*second_momentum_buffer"):
        opt.load_state_tensors(old_state)

    class Old:
        path = tmp_path / "step_000250"

    with pytest.raises(ConfigError, match="written by optimizer newton-schulz-muon") as refused:
        check_optimizer_recipe(Old(), {"step": 250})
    assert "\n" not in str(refused.value) and "MODEL_TAG" in str(refused.value)


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
