"""nanochat's speed habits: the GC frozen after the first step, bf16 embeddings under autocast, FP8 matmuls
(numerics on the CPU's _scaled_mm, the refusal through the real trainer CLI), and SFT's schedule.

SFT's schedule is checked against nanochat's chat_sft.py formulas written out here; FP8's matmuls against
float32 matmuls of the same operands; the GC habit both in-process and in a real tiny training run.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch
import torch.nn as nn

from tests.helpers import publish_corpus, run_trainer
from trainer import fp8
from trainer.gc_freeze import FrozenGC
from trainer.model import build_model, config_for_depth
from trainer.optim import HybridOptimizer
from trainer.runtime import ConfigError
from trainer.sft_schedule import set_sft_schedule
from trainer.train import parse_config


@pytest.fixture
def gc_restored():
    yield
    gc.unfreeze()
    gc.enable()


def test_gc_is_collected_frozen_and_disabled_after_the_first_step_then_collected_every_n(gc_restored):
    collections = []
    callback = lambda phase, info: collections.append(info["generation"]) if phase == "stop" else None  # noqa: E731
    gc.callbacks.append(callback)
    try:
        habit = FrozenGC(collect_every=4)
        assert gc.isenabled() and gc.get_freeze_count() == 0
        habit.after_step(7)  # the first step of this process, e.g. right after a resume
        assert not gc.isenabled() and gc.get_freeze_count() > 0
        assert collections == [2]  # one full collection before freezing
        garbage = [[]]
        garbage[0].append(garbage)  # a reference cycle: only the cyclic collector frees it
        for step in range(8, 12):
            habit.after_step(step)
        assert collections == [2, 2]  # step 8 only; automatic collection stayed off
        assert not gc.isenabled()
    finally:
        gc.callbacks.remove(callback)


def test_a_real_training_run_freezes_the_gc_after_its_first_step(hub, tmp_path):
    publish_corpus(hub.server, tmp_path / "shards", num_shards=2, docs_per_shard=200)
    code, out = run_trainer(tmp_path / "volume", {**os.environ, **hub.env}, "--num-iterations", "3",
                            "--eval-every", "0", "--sample-every", "0", "--device", "cpu")
    assert code == 0, out
    lines = out.splitlines()
    where = {key: next(i for i, line in enumerate(lines) if key in line)
             for key in ("step 00001/", "gc_frozen step=1 ", "step 00002/")}
    assert where["step 00001/"] < where["gc_frozen step=1 "] < where["step 00002/"]
    assert sum("gc_frozen" in line for line in lines) == 1


def test_fp8_on_cpu_is_refused_in_one_line_by_the_real_trainer(tmp_path):
    code, out = run_trainer(tmp_path / "volume", {**os.environ, "FP8": "1"}, "--device", "cpu")
    assert code == 2, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out, out
    assert "FP8=1 asks for FP8 training but FP8 matmuls need a CUDA GPU of compute capability >= 8.9" \
        in errors[0] and errors[0].endswith(": unset FP8 (or --fp8 0) to train in bf16"), errors
    assert not (tmp_path / "volume" / "tokenizer").exists()  # refused before any work


def test_the_fp8_flag_and_variable_reach_the_config(monkeypatch):
    monkeypatch.delenv("FP8", raising=False)
    assert parse_config(["--preset", "tiny"]).fp8 == 0
    assert parse_config(["--preset", "tiny", "--fp8", "1"]).fp8 == 1
    monkeypatch.setenv("FP8", "1")
    assert parse_config(["--preset", "tiny"]).fp8 == 1
    with pytest.raises(ConfigError, match="FP8 / --fp8 is 2: use 1"):
        parse_config(["--preset", "tiny", "--fp8", "2"])


def test_fp8_decision_needs_cuda_and_capability_8_9():
    assert fp8.fp8_refusal("cpu", None).endswith("this run is on the CPU")
    assert "A100 has 8.0" in fp8.fp8_refusal("cuda", (8, 0), "A100")
    assert fp8.fp8_refusal("cuda", (8, 9), "L40S") is None
    assert fp8.fp8_refusal("cuda", (9, 0), "H100") is None
    assert fp8.fp8_refusal("cuda", (10, 0), "B200") is None
    assert fp8.fp8_unavailable(torch.device("cpu")) is not None


def test_fp8_linear_matches_float32_matmuls_within_fp8_precision_and_shares_the_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128, bias=False), nn.Linear(128, 40, bias=False))
    weight = model[0].weight
    assert fp8.convert_to_fp8(model) == (1, 2)  # 40 outputs: too small for FP8, left alone
    assert isinstance(model[0], fp8.Float8Linear) and type(model[1]) is nn.Linear
    assert model[0].weight is weight and list(model.state_dict()) == ["0.weight", "1.weight"]
    x = torch.randn(4, 8, 256, requires_grad=True)
    out = model[0](x)
    grad_out = torch.randn_like(out, dtype=torch.float32)
    out.backward(grad_out.to(out.dtype))
    x_ref = x.detach().clone().requires_grad_()
    w_ref = weight.detach().clone().requires_grad_()
    ref = x_ref @ w_ref.t()
    ref.backward(grad_out)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.float() - b).norm() / b.norm()).item()

    # e4m3 keeps 3 mantissa bits (~6% per element), e5m2 2 bits: errors average out in the dot products.
    assert rel(out, ref) < 0.08 and rel(x.grad, x_ref.grad) < 0.15 and rel(weight.grad, w_ref.grad) < 0.15
    assert weight.grad.dtype == torch.float32  # the master weight's gradient stays float32
    assert rel(out, ref) > 1e-4  # it really went through float8, not a float32 matmul
    with torch.no_grad():  # evaluation and sampling: the plain matmul
        torch.testing.assert_close(model[0](x), x @ weight.t())


def test_embeddings_enter_the_blocks_in_bf16_under_autocast_and_stay_float32_without():
    torch.manual_seed(0)
    model = build_model(config_for_depth(2, 512, 64, 32, 32, "SSSL"), "cpu")
    idx = torch.randint(0, 512, (2, 64))
    seen: list[torch.dtype] = []
    for module in (*model.transformer.h, model.lm_head):
        module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
    loss32 = model(idx, idx)
    assert seen == [torch.float32] * 3
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16 = model(idx, idx)
    assert seen == [torch.bfloat16] * 3  # the residual stream is bf16 from the embedding on
    assert loss16.dtype == torch.float32 and abs(loss16.item() - loss32.item()) < 0.05 * loss32.item()
    loss16.backward()
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.grad.dtype for p in model.parameters() if p.grad is not None} == {torch.float32}


def nanochat_sft_lrm(progress: float, warmup_ratio: float = 0.0, warmdown_ratio: float = 0.5,
                     final_lr_frac: float = 0.0) -> float:
    """scripts/chat_sft.py get_lr_multiplier, as written there."""
    if progress < warmup_ratio:
        return (progress + 1e-8) / warmup_ratio
    elif progress <= 1.0 - warmdown_ratio:
        return 1.0
    else:
        decay = (progress - (1.0 - warmdown_ratio)) / warmdown_ratio
        return (1 - decay) * 1.0 + decay * final_lr_frac


@pytest.mark.parametrize("step", [0, 1, 299, 300, 500, 501, 750, 999])
def test_sft_schedule_at_its_breakpoints_is_nanochats(step):
    model = build_model(config_for_depth(2, 512, 64, 32, 32, "L"), "cpu")
    optimizer = HybridOptimizer(model, unembedding_lr=0.004, embedding_lr=0.3, matrix_lr=0.02,
                                weight_decay=0.0)
    for group in optimizer.groups:
        group.initial_lr *= 0.8  # init_lr_frac, as trainer.sft applies it
    lrm = set_sft_schedule(optimizer.groups, step, 1000)
    expected = nanochat_sft_lrm(step / 1000)
    assert lrm == pytest.approx(expected, abs=1e-12)
    assert lrm == {750: 0.5, 999: pytest.approx(0.002)}.get(step, 1.0 if step <= 500 else lrm)
    muon = next(g for g in optimizer.groups if g.kind == "muon")
    assert muon.lr == pytest.approx(0.02 * 0.8 * expected)
    assert muon.momentum == pytest.approx((1 - min(step / 300, 1)) * 0.85 + min(step / 300, 1) * 0.95)
    # Weight decay per parameter as nanochat's setup_optimizer(weight_decay=0.0) leaves it for SFT: Muon's
    # 0, each AdamW group its own constant.
    nanochat = {"lm_head.weight": 0.01, "transformer.wte.weight": 0.001, "value_embeds.1.weight": 0.01,
                "resid_lambdas": 0.05, "x0_lambdas": 0.0, "smear_gate.weight": 0.0, "smear_lambda": 0.0,
                "backout_lambda": 0.0, "transformer.h.0.attn.c_q.weight": 0.0}
    decay = {name: g.weight_decay for g in optimizer.groups for name in g.params}
    assert {name: decay[name] for name in nanochat} == nanochat
    assert {decay[name] for name in decay if name.startswith("transformer.h.")} == {0.0}
