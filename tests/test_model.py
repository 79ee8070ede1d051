"""Tests for trainer.model: nanochat's sizes, meta-device build, init, forward and the peak-FLOPS table."""

import math

import pytest
import torch

from trainer.model import GPT, GPTConfig, build_model, config_for_depth, peak_flops

TINY = GPTConfig(sequence_len=16, vocab_size=128, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)


def build(config: GPTConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return build_model(config, "cpu")


def tokens(batch: int, seq: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "depth, width, heads, params",
    [(20, 1280, 10, 560_988_160), (26, 1664, 13, 1_081_999_360)],  # nanochat's published d20 / d26
)
def test_config_for_depth_matches_nanochat_param_counts(depth: int, width: int, heads: int, params: int):
    config = config_for_depth(depth, vocab_size=65536, sequence_len=2048)
    assert (config.n_layer, config.n_embd, config.n_head, config.n_kv_head) == (depth, width, heads, heads)
    with torch.device("meta"):
        model = GPT(config)
    assert model.num_params() == params


def test_flops_per_token_d20():
    with torch.device("meta"):
        model = GPT(config_for_depth(20, vocab_size=65536, sequence_len=2048))
    # 6 * (560,988,160 - 65536*1280 embedding) + 12 * 20 layers * 10 heads * 128 head_dim * 2048 tokens
    assert model.estimate_flops_per_token() == 6 * 477_102_080 + 629_145_600 == 3_491_758_080


def test_head_split_must_be_exact():
    with pytest.raises(ValueError, match="heads"):
        GPT(config_for_depth(5, vocab_size=64, sequence_len=8))  # width 320 -> 3 heads of 106.7


def test_forward_shapes_and_initial_loss():
    model = build(TINY)
    idx = tokens(3, TINY.sequence_len, TINY.vocab_size)
    targets = tokens(3, TINY.sequence_len, TINY.vocab_size, seed=1)
    assert model(idx).shape == (3, TINY.sequence_len, TINY.vocab_size)
    loss = model(idx, targets)
    assert loss.shape == () and loss.dtype == torch.float32
    # lm_head starts at zero, so the first prediction is exactly uniform.
    assert torch.isfinite(loss) and abs(loss.item() - math.log(TINY.vocab_size)) < 1e-4
    per_token = model(idx, targets, loss_reduction="none")
    assert per_token.shape == (3 * TINY.sequence_len,)


def test_ignore_index_drops_targets():
    model = build(TINY)
    with torch.no_grad():
        model.lm_head.weight.normal_(std=0.5, generator=torch.Generator().manual_seed(2))
    idx = tokens(2, 8, TINY.vocab_size)
    targets = tokens(2, 8, TINY.vocab_size, seed=1)
    per_token = model(idx, targets, loss_reduction="none")
    masked = targets.clone()
    masked[:, ::2] = -1
    assert torch.allclose(model(idx, masked), per_token.view(2, 8)[:, 1::2].mean())


def test_logits_are_soft_capped():
    model = build(TINY)
    with torch.no_grad():
        model.lm_head.weight.normal_(std=100.0, generator=torch.Generator().manual_seed(3))
    logits = model(tokens(2, TINY.sequence_len, TINY.vocab_size))
    assert logits.abs().max().item() <= 15.0
    assert logits.abs().max().item() > 14.0  # the cap is what bounds them, not small weights


def test_init_is_deterministic_given_seed():
    a, b, c = build(TINY, seed=7), build(TINY, seed=7), build(TINY, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["transformer.wte.weight"], sc["transformer.wte.weight"])


def test_meta_build_equals_eager_build():
    torch.manual_seed(0)
    eager = GPT(TINY)  # nn.Linear's own init runs here, then init_weights overwrites all of it
    torch.manual_seed(5)
    eager.init_weights()
    meta = build(TINY, seed=5)
    for (name, p), q in zip(eager.state_dict().items(), meta.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert torch.equal(eager.cos, meta.cos) and torch.equal(eager.sin, meta.sin)
    idx = tokens(1, TINY.sequence_len, TINY.vocab_size)
    assert torch.equal(eager(idx), meta(idx))


def test_init_scheme():
    model = build(config_for_depth(2, vocab_size=256, sequence_len=8))  # width 128
    assert model.lm_head.weight.abs().sum() == 0
    for block in model.transformer.h:
        assert block.attn.c_proj.weight.abs().sum() == 0 and block.mlp.c_proj.weight.abs().sum() == 0
    assert abs(model.transformer.wte.weight.std().item() - 1.0) < 0.05
    # c_fc: fan_in 128, fan_out 512 -> std 1/sqrt(128); c_q: square -> also 1/sqrt(128)
    assert abs(model.transformer.h[0].mlp.c_fc.weight.std().item() * math.sqrt(128) - 1.0) < 0.05
    assert abs(model.transformer.h[0].attn.c_q.weight.std().item() * math.sqrt(128) - 1.0) < 0.05


def test_narrow_linear_init_is_shrunk():
    config = GPTConfig(sequence_len=8, vocab_size=64, n_layer=1, n_head=4, n_kv_head=1, n_embd=128)
    c_k = build(config).transformer.h[0].attn.c_k.weight  # 128 -> 32: std 1/sqrt(128) * sqrt(32/128)
    assert abs(c_k.std().item() / (0.5 / math.sqrt(128)) - 1.0) < 0.05


def test_qk_norm_makes_attention_scale_invariant():
    model = build(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.2, generator=torch.Generator().manual_seed(4))
    idx = tokens(2, TINY.sequence_len, TINY.vocab_size)
    before = model(idx)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_q.weight.mul_(10.0)  # without QK-norm: 100x sharper attention
            block.attn.c_k.weight.mul_(10.0)
    assert (model(idx) - before).abs().max().item() < 1e-4


def test_causal_and_no_persistent_rotary():
    model = build(TINY)
    with torch.no_grad():
        for p in model.parameters():  # make every layer matter
            p.normal_(std=0.2, generator=torch.Generator().manual_seed(4))
    idx = tokens(1, TINY.sequence_len, TINY.vocab_size)
    changed = idx.clone()
    changed[0, -1] = (idx[0, -1] + 1) % TINY.vocab_size
    a, b = model(idx), model(changed)
    assert torch.equal(a[:, :-1], b[:, :-1]) and not torch.equal(a[:, -1], b[:, -1])
    assert "cos" not in model.state_dict() and model.cos.size(1) == 10 * TINY.sequence_len


def test_grouped_query_attention_runs():
    config = GPTConfig(sequence_len=8, vocab_size=64, n_layer=1, n_head=4, n_kv_head=2, n_embd=32)
    model = build(config)
    assert model.transformer.h[0].attn.c_k.weight.shape == (16, 32)
    model(tokens(1, 8, 64), tokens(1, 8, 64, seed=1)).backward()


def test_too_long_sequence_is_rejected():
    model = build(TINY)
    with pytest.raises(ValueError, match="rotary"):
        model(tokens(1, 10 * TINY.sequence_len + 1, TINY.vocab_size))


@pytest.mark.parametrize(
    "name, flops",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA B200", 2.25e15),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA GeForce RTX 4090", 165e12),
        ("cpu", None),
        ("Some Future Accelerator", None),
    ],
)
def test_peak_flops(name: str, flops: float | None):
    assert peak_flops(name) == flops
