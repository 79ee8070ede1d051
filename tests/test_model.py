"""Tests for trainer.model: nanochat's sizes, meta-device build, init, each architectural piece against a
reference computed here, and the whole forward against a naive re-implementation."""

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.model import (
    ARCHITECTURE,
    GPT,
    SHALLOW_ARCHITECTURE,
    GPTConfig,
    attention_mask,
    backout_layer,
    build_model,
    config_for_depth,
    config_from_dict,
    window_sizes,
)
from trainer.recipe import scaling_params

TINY = GPTConfig(sequence_len=16, vocab_size=128, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)


def build(config: GPTConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return build_model(config, "cpu")


def tokens(batch: int, seq: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "depth, width, heads, params, scaling",
    # nanochat's own GPT(...).num_scaling_params() at vocab 65536: total, and its scaling count (blocks +
    # lm_head). Value embeddings on half the layers weigh 10 x 65536 x 1280 = 839M of d20's 1.40B.
    [(20, 1280, 10, 1_399_850_226, 477_103_280), (26, 1664, 13, 2_499_676_218, 972_949_484)],
)
def test_config_for_depth_matches_nanochat_param_counts(depth: int, width: int, heads: int, params: int,
                                                        scaling: int):
    config = config_for_depth(depth, vocab_size=65536, sequence_len=2048)
    assert (config.n_layer, config.n_embd, config.n_head, config.n_kv_head) == (depth, width, heads, heads)
    with torch.device("meta"):
        model = GPT(config)
    assert model.num_params() == params
    assert scaling_params((n, p.numel()) for n, p in model.named_parameters()) == scaling


def test_flops_per_token_d20():
    with torch.device("meta"):
        model = GPT(config_for_depth(20, vocab_size=65536, sequence_len=2048))
    # 6 x matmul weights (blocks with their ve gates, lm_head, smear gate) + 12 x 10 heads x 128 x each
    # layer's window: 15 short layers of 512, 5 long of 2048. nanochat's estimate_flops() says the same.
    matmul = 393_217_200 + 65536 * 1280 + 24
    assert model.estimate_flops_per_token() == 6 * matmul + 12 * 10 * 128 * (15 * 512 + 5 * 2048)
    assert model.estimate_flops_per_token() == 3_137_871_024


@pytest.mark.parametrize("depth, aspect, head_dim, width, heads", [
    (13, 64, 128, 896, 7),  # 832 rounded up to 7 heads of 128, as nanochat's base_train sizes it
    (5, 64, 128, 384, 3),  # 320 -> 384
    (20, 64, 128, 1280, 10), (24, 64, 128, 1536, 12), (26, 64, 128, 1664, 13),  # already multiples
    (2, 32, 32, 64, 2),  # the tiny preset
])
def test_any_depth_sizes_as_nanochat(depth: int, aspect: int, head_dim: int, width: int, heads: int):
    config = config_for_depth(depth, 64, 8, aspect, head_dim)
    assert (config.n_embd, config.n_head, config.n_kv_head) == (width, heads, heads)
    with torch.device("meta"):
        GPT(config)


def test_head_split_must_be_exact():
    with pytest.raises(ValueError, match="heads"):
        GPT(GPTConfig(sequence_len=8, vocab_size=64, n_layer=5, n_head=3, n_kv_head=3, n_embd=320))


def test_forward_shapes_and_initial_loss():
    model = build(TINY)
    idx = tokens(3, TINY.sequence_len, TINY.vocab_size)
    targets = tokens(3, TINY.sequence_len, TINY.vocab_size, seed=1)
    assert model(idx).shape == (3, TINY.sequence_len, TINY.vocab_size)
    loss = model(idx, targets)
    assert loss.shape == () and loss.dtype == torch.float32
    # lm_head starts at std 0.001, so the first prediction is all but uniform.
    assert torch.isfinite(loss) and abs(loss.item() - math.log(TINY.vocab_size)) < 1e-3
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
    model = build(GPTConfig(sequence_len=8, vocab_size=256, n_layer=3, n_head=4, n_kv_head=1, n_embd=128))
    assert abs(model.lm_head.weight.std().item() / 0.001 - 1.0) < 0.05
    assert abs(model.transformer.wte.weight.std().item() / 0.8 - 1.0) < 0.05
    bound = math.sqrt(3 / 128)  # uniform with std 1/sqrt(width), whatever the output width
    for block in model.transformer.h:
        assert block.attn.c_proj.weight.abs().sum() == 0 and block.mlp.c_proj.weight.abs().sum() == 0
        for weight, scale in ((block.attn.c_q.weight, 1.0), (block.attn.c_k.weight, 1.0),
                              (block.attn.c_v.weight, 1.0), (block.mlp.c_fc.weight, 0.4)):
            assert weight.abs().max().item() <= scale * bound
            assert abs(weight.std().item() * math.sqrt(128) / scale - 1.0) < 0.1
    assert sorted(model.value_embeds) == ["0", "2"]  # every other layer, ending at the last
    assert model.transformer.h[1].attn.ve_gate is None
    for name in ("0", "2"):
        assert model.value_embeds[name].weight.abs().max().item() <= bound
        gate = model.transformer.h[int(name)].attn.ve_gate.weight
        assert gate.shape == (1, 12) and gate.min().item() >= 0 and gate.max().item() <= 0.02
    torch.testing.assert_close(model.resid_lambdas, torch.tensor([1.15, 1.10, 1.05]))
    torch.testing.assert_close(model.x0_lambdas, torch.tensor([0.20, 0.125, 0.05]))
    assert model.smear_lambda.item() == 0 and model.backout_lambda.item() == pytest.approx(0.2)
    assert model.smear_gate.weight.min().item() >= 0 and model.smear_gate.weight.max().item() <= 0.02


def test_an_older_architecture_is_refused_in_one_line():
    current = dict(sequence_len=8, vocab_size=64, n_layer=3, n_head=1, n_kv_head=1, n_embd=32)
    assert config_from_dict({**current, "window_pattern": "SL", "architecture": ARCHITECTURE}) == GPTConfig(
        **current, window_pattern="SL")
    with pytest.raises(ValueError, match="^the checkpoint's model is architecture .*MODEL_TAG") as info:
        config_from_dict(current)  # what phoenix's first model recorded: no architecture, no windows
    assert "\n" not in str(info.value)
    # A tiny (2-layer) checkpoint from before backout moved off the last layer: another forward, refused.
    tiny = {**current, "n_layer": 2, "window_pattern": "SSSL"}
    with pytest.raises(ValueError, match="^the checkpoint's model is architecture 'nanochat-2026-07', this"):
        config_from_dict({**tiny, "architecture": ARCHITECTURE})
    assert config_from_dict({**tiny, "architecture": SHALLOW_ARCHITECTURE}) == GPTConfig(**tiny)


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


# --- each architectural piece against a reference computed here -------------------------------------------


def randomized(model: GPT, seed: int = 4) -> GPT:
    """Every parameter drawn wide (nothing zero, every path matters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.3, generator=g)
    return model


def rms(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)


def test_window_pattern_tiles_the_layers_and_the_last_is_full():
    def windows(pattern: str, n_layer: int, seq: int = 2048) -> list[int]:
        return window_sizes(GPTConfig(seq, 64, n_layer, 1, 1, 32, window_pattern=pattern))

    assert windows("SSSL", 6) == [512, 512, 512, 2048, 512, 2048]
    assert windows("SL", 3) == [512, 2048, 2048]
    assert windows("L", 2) == [2048, 2048]
    assert windows("sssl", 4, seq=1000) == [256, 256, 256, 1000]  # a quarter, 250, up to the 128 tile
    assert windows("SSSL", 2, seq=128) == [128, 128]  # the tiny preset: short covers everything
    assert windows("SSSL", 2, seq=16) == [16, 16]  # never longer than the long window
    with pytest.raises(ValueError, match="S and L"):
        windows("SXL", 2)


def test_window_mask_matches_a_hand_built_one():
    positions = torch.arange(6)
    expected = torch.tensor([  # row: query, column: key; a window of 2 sees the query and 2 keys back
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(attention_mask(positions, positions, 2), expected)
    assert torch.equal(attention_mask(positions, positions, 5), torch.ones(6, 6, dtype=torch.bool).tril())
    # Decoding: one query per row, each at its own position, against the cached keys.
    assert torch.equal(attention_mask(torch.tensor([[4], [2]]), positions, 2), expected[[4, 2]][:, None])


def test_value_embedding_is_added_to_the_values_through_a_gate_per_head():
    config = GPTConfig(sequence_len=8, vocab_size=16, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    attn = randomized(build(config)).transformer.h[0].attn
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        attn.c_proj.weight.copy_(torch.eye(32))
    x, value_embedding = torch.randn(3, 1, 32, generator=g), torch.randn(3, 1, 32, generator=g)
    # One token attends only to itself, so the layer returns its value unchanged.
    y = attn(x, value_embedding, torch.ones(1, 1, 1, 8), torch.zeros(1, 1, 1, 8), 8, None)
    gate = 3 * torch.sigmoid(x[..., :12] @ attn.ve_gate.weight.T)  # (3, 1, 2 heads)
    expected = (x @ attn.c_v.weight.T).view(3, 1, 2, 16) + gate[..., None] * value_embedding.view(3, 1, 2, 16)
    torch.testing.assert_close(y, expected.view(3, 1, 32))
    assert gate.min() > 0.1 and gate.max() < 2.9 and (gate[..., 0] - gate[..., 1]).abs().max() > 0.1


def traced(model: GPT, idx: torch.Tensor, targets: torch.Tensor | None = None
           ) -> tuple[dict[int | str, torch.Tensor], dict[int, torch.Tensor], torch.Tensor]:
    """A forward pass that records each block's input and output and the head's input ("head")."""
    inputs: dict[int | str, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    hooks = [model.lm_head.register_forward_pre_hook(lambda _m, args: inputs.__setitem__("head", args[0]))]
    for i, block in enumerate(model.transformer.h):
        hooks.append(block.register_forward_pre_hook(lambda _m, args, i=i: inputs.__setitem__(i, args[0])))
        hooks.append(block.register_forward_hook(lambda _m, _args, out, i=i: outputs.__setitem__(i, out)))
    result = model(idx, targets)
    for hook in hooks:
        hook.remove()
    return inputs, outputs, result


def test_smear_residual_scalars_and_backout_wire_as_nanochat():
    config = GPTConfig(sequence_len=8, vocab_size=16, n_layer=3, n_head=2, n_kv_head=2, n_embd=32)
    model = randomized(build(config))
    with torch.no_grad():
        model.smear_lambda.fill_(0.7)
        model.backout_lambda.fill_(0.4)
        model.resid_lambdas.copy_(torch.tensor([1.1, 0.9, 1.3]))
        model.x0_lambdas.copy_(torch.tensor([0.2, -0.5, 0.3]))
    idx = torch.tensor([[3, 7, 7, 1]])
    inputs, outputs, _ = traced(model, idx)
    embedded = rms(model.transformer.wte.weight[idx])
    gate = torch.sigmoid(embedded[..., :24] @ model.smear_gate.weight.T)
    x0 = embedded.clone()
    x0[:, 1:] += 0.7 * gate[:, 1:] * embedded[:, :-1]  # the first token has no predecessor
    check = torch.testing.assert_close
    with torch.no_grad():
        check(inputs[0], 1.1 * x0 + 0.2 * x0)
        check(inputs[1], 0.9 * outputs[0] - 0.5 * x0)
        check(inputs[2], 1.3 * outputs[1] + 0.3 * x0)
        check(inputs["head"], rms(outputs[2] - 0.4 * outputs[1]))  # backout: the middle layer (3 // 2)


def test_backout_never_takes_the_last_layer_so_its_lambda_always_matters():
    # nanochat's middle layer n_layer // 2 is the last one at depth 2 (and 1): the head would see
    # rms(x - λx) = ±rms(x), λ's gradient would be ~0 and AdamW's steps on it a random walk that flips
    # every logit when it crosses 1. There the block before the last (the embeddings at depth 1) is used.
    for n_layer, expected in ((1, -1), (2, 0), (3, 1), (4, 2), (20, 10), (24, 12), (26, 13)):
        assert backout_layer(n_layer) == expected
        architecture = SHALLOW_ARCHITECTURE if n_layer <= 2 else ARCHITECTURE  # d20/d24/d26 unchanged
        assert GPTConfig(8, 16, n_layer, 2, 2, 32).architecture == architecture
    for n_layer in (1, 2):
        model = randomized(build(GPTConfig(sequence_len=8, vocab_size=16, n_layer=n_layer, n_head=2,
                                           n_kv_head=2, n_embd=32)))
        with torch.no_grad():  # block 0's input is then x0 itself, the embeddings depth 1 backs out
            model.resid_lambdas[0], model.x0_lambdas[0] = 1.0, 0.0
        inputs, outputs, loss = traced(model, torch.tensor([[3, 7, 7, 1]]), torch.tensor([[7, 7, 1, 2]]))
        subtracted = outputs[0] if n_layer == 2 else inputs[0]
        with torch.no_grad():
            torch.testing.assert_close(inputs["head"], rms(outputs[n_layer - 1]
                                                           - model.backout_lambda * subtracted))
        loss.backward()
        # λ moves the loss as much as the other scalars do: its gradient is of their order, not ~1e-6.
        assert model.backout_lambda.grad.abs().item() > 0.1 * model.smear_lambda.grad.abs().item() > 0


def naive_forward(model: GPT, idx: torch.Tensor, windows: list[int]) -> torch.Tensor:
    """The model's computation written out plainly: explicit rotary at base 100000, attention as a softmax
    over the keys each query's window allows (listed one by one), no SDPA."""
    c = model.config
    B, T = idx.shape
    head_dim, group = c.n_embd // c.n_head, c.n_head // c.n_kv_head
    angles = torch.arange(T).float()[:, None] / 100_000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    cos, sin = angles.cos()[None, :, None], angles.sin()[None, :, None]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[..., :head_dim // 2], x[..., head_dim // 2:]
        return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], -1)

    embedded = rms(model.transformer.wte.weight[idx])
    previous = torch.cat([torch.zeros_like(embedded[:, :1]), embedded[:, :-1]], 1)
    smear = model.smear_lambda * torch.sigmoid(embedded[..., :24] @ model.smear_gate.weight.T)
    x = embedded + smear * previous
    x0 = x
    for i, block in enumerate(model.transformer.h):
        x = model.resid_lambdas[i] * x + model.x0_lambdas[i] * x0
        a, h = block.attn, rms(x)
        q = (h @ a.c_q.weight.T).view(B, T, c.n_head, head_dim)
        k = (h @ a.c_k.weight.T).view(B, T, c.n_kv_head, head_dim)
        v = (h @ a.c_v.weight.T).view(B, T, c.n_kv_head, head_dim)
        if a.ve_gate is not None:
            gate = 3 * torch.sigmoid(h[..., :12] @ a.ve_gate.weight.T)
            v = v + gate[..., None] * model.value_embeds[str(i)].weight[idx].view(B, T, c.n_kv_head, head_dim)
        q, k = rms(rotate(q)) * 1.2, rms(rotate(k)) * 1.2
        k, v = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)  # a kv head per query head
        allowed = torch.tensor([[0 <= t - s <= windows[i] for s in range(T)] for t in range(T)])
        scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(head_dim)
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        y = torch.einsum("bhts,bshd->bthd", weights, v)
        x = x + y.reshape(B, T, c.n_embd) @ a.c_proj.weight.T
        x = x + F.relu(rms(x) @ block.mlp.c_fc.weight.T).square() @ block.mlp.c_proj.weight.T
        if i == c.n_layer // 2:
            backout = x
    logits = rms(x - model.backout_lambda * backout) @ model.lm_head.weight.T
    return 15 * torch.tanh(logits / 15)


def test_forward_with_sliding_windows_matches_a_naive_implementation():
    # sequence_len 512: short windows of 128, so a 160-token input runs three windowed layers, one full;
    # grouped-query attention (4 query heads over 2 kv heads).
    config = GPTConfig(sequence_len=512, vocab_size=64, n_layer=4, n_head=4, n_kv_head=2, n_embd=32)
    model = randomized(build(config), seed=6)
    idx = tokens(2, 160, config.vocab_size)
    with torch.no_grad():
        logits = model(idx)
        torch.testing.assert_close(logits, naive_forward(model, idx, [128, 128, 128, 512]),
                                   rtol=1e-4, atol=1e-4)
        # The windows are what limits attention: with full attention everywhere, positions up to 128
        # (which see everything either way) agree and later ones do not.
        full = GPT(GPTConfig(**{**config.__dict__, "window_pattern": "L"}))
        full.load_state_dict(model.state_dict())
        full_logits = full(idx)
    torch.testing.assert_close(full_logits[:, :129], logits[:, :129], rtol=1e-5, atol=1e-5)
    assert (full_logits[:, 129:] - logits[:, 129:]).abs().max() > 1e-2
