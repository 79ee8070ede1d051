"""GPT model as nanochat builds it: rotary, QK-norm, ReLU² MLP, sliding-window attention, value embeddings,
per-layer residual scalars, smear and backout, untied head, logit soft-cap, no biases.

Build big models on the meta device, then `to_empty(device=...)` and `init_weights()`:
nothing is allocated or initialised twice, and the weights depend only on torch's seed.
Generation passes a `KVCache` to `forward`; without one (training) no cache code runs.
The numbers below are nanochat's (nanochat/gpt.py and flash_attention.py, July 2026).
"""

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.hardware import fa3_applies, fa3_attention

# Bumped whenever the parameters or the computation change: a checkpoint's model config records it, and
# an older one is refused in one line instead of failing on missing weights.
ARCHITECTURE = "nanochat-2026-07"
# Models of 1 or 2 layers back out another layer than nanochat's (see backout_layer): a tiny checkpoint
# from before that change records plain ARCHITECTURE and is refused rather than resumed on another forward.
SHALLOW_ARCHITECTURE = ARCHITECTURE + "+backout-before-last"
ROTARY_BASE = 100_000  # longer wavelengths than the classic 10,000: better use of long contexts
LOGIT_SOFTCAP = 15.0
QK_SCALE = 1.2  # q and k each times 1.2 after QK-norm: attention logits 1.44x sharper than unit vectors give
WINDOW_TILE = 128  # short windows are rounded up to FlashAttention-3's tile size
# The gates read only the first few channels of their input (all of them on a toy model narrower than that):
VE_GATE_CHANNELS = 12  # a value embedding's gate: of the layer's input
SMEAR_GATE_CHANNELS = 24  # the smear gate: of the token's embedding


@dataclass
class GPTConfig:
    sequence_len: int
    vocab_size: int
    n_layer: int
    n_head: int  # query heads
    n_kv_head: int  # key/value heads; < n_head gives grouped-query attention
    n_embd: int
    # Tiled over the layers, the last layer always L: L attends over the whole sequence_len, S over a
    # quarter of it. Three cheap short layers per long one cost little quality and save attention FLOPs.
    window_pattern: str = "SSSL"
    architecture: str = ""  # "": the one this code builds for n_layer (architecture_for)

    def __post_init__(self) -> None:
        self.architecture = self.architecture or architecture_for(self.n_layer)


def backout_layer(n_layer: int) -> int:
    """The block whose output backout subtracts before the head: nanochat's middle one (n_layer // 2),
    but never the last. With 2 layers the middle is the last, whose output is the head's input x itself:
    the head would see norm(x - λx) = ±norm(x), so λ could only flip the sign of every logit; its gradient
    is ~0, AdamW's normalised steps walk it anyway, and each time it crossed 1 the loss jumped to 15-17. Such
    shallow models take the block before the last (the embeddings, -1, at depth 1); from depth 3 on this is
    nanochat's layer, so those models are unchanged."""
    return min(n_layer // 2, n_layer - 2)


def architecture_for(n_layer: int) -> str:
    return ARCHITECTURE if backout_layer(n_layer) == n_layer // 2 else SHALLOW_ARCHITECTURE


def config_for_depth(
    depth: int, vocab_size: int, sequence_len: int, aspect_ratio: int = 64, head_dim: int = 128,
    window_pattern: str = "SSSL",
) -> GPTConfig:
    """nanochat's one-knob sizing: width = depth * aspect_ratio rounded up to a multiple of head_dim, in
    heads of exactly head_dim channels (d13: 832 -> 896, 7 heads of 128)."""
    model_dim = math.ceil(depth * aspect_ratio / head_dim) * head_dim
    n_head = model_dim // head_dim
    return GPTConfig(
        sequence_len=sequence_len,
        vocab_size=vocab_size,
        n_layer=depth,
        n_head=n_head,
        n_kv_head=n_head,
        n_embd=model_dim,
        window_pattern=window_pattern,
    )


def config_from_dict(saved: dict[str, Any]) -> GPTConfig:
    """The config a checkpoint recorded (meta.json's model_config); refuses another architecture."""
    expected = architecture_for(saved.get("n_layer", 0))
    if saved.get("architecture") != expected:
        older = saved.get("architecture", "phoenix's first: full attention, no value embeddings")
        raise ValueError(f"the checkpoint's model is architecture {older!r}, this code builds "
                         f"{expected!r}: train a new model under another MODEL_TAG, or use the phoenix "
                         f"version that trained it")
    names = set(GPTConfig.__dataclass_fields__)
    return GPTConfig(**{k: v for k, v in saved.items() if k in names})


def window_sizes(config: GPTConfig) -> list[int]:
    """Per layer, how many earlier tokens a query may see besides itself (FlashAttention's left window)."""
    pattern = config.window_pattern.upper()
    if not pattern or set(pattern) - {"S", "L"}:
        raise ValueError(f"window_pattern={config.window_pattern!r}: use only the letters S and L")
    long_window = config.sequence_len
    # A quarter, rounded up to the tile (2048 -> 512, 1000 -> 256), never past the long window (128 -> 128).
    short_window = min(-(-long_window // 4 // WINDOW_TILE) * WINDOW_TILE, long_window)
    windows = [long_window if pattern[i % len(pattern)] == "L" else short_window
               for i in range(config.n_layer)]
    if windows:
        windows[-1] = long_window  # the last layer sees everything, whatever the pattern
    return windows


def attention_mask(query_positions: torch.Tensor, key_positions: torch.Tensor, window: int) -> torch.Tensor:
    """True where a query may attend a key: the key is not later, and at most `window` tokens earlier.
    (..., Tq) and (Tk,) positions give a (..., Tq, Tk) mask."""
    behind = query_positions[..., :, None] - key_positions
    return (behind >= 0) & (behind <= window)


def has_value_embedding(layer: int, n_layer: int) -> bool:
    """Every other layer, counted back from the last (which always has one)."""
    return layer % 2 == (n_layer - 1) % 2


def norm(x: torch.Tensor) -> torch.Tensor:
    # RMSNorm without learnable weights: nothing to tune or decay, one less parameter kind.
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + head_dim/2) of x (B, T, H, D) by position-dependent angles."""
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x1 * (-sin) + x2 * cos
    # cos/sin are float32; cast back so bf16 activations under autocast stay bf16.
    return torch.cat([y1, y2], 3).to(x.dtype)


def in_compute_dtype(embedding: torch.Tensor) -> torch.Tensor:
    """An embedding lookup in the dtype the matmuls run in: bf16 under autocast (CUDA), as nanochat's bf16
    embedding tables give, so the residual stream stays bf16; unchanged in float32 (CPU). The tables
    themselves stay float32: the optimizer updates float32 master weights, exactly as before."""
    if torch.is_autocast_enabled(embedding.device.type):
        return embedding.to(torch.get_autocast_dtype(embedding.device.type))
    return embedding


class KVCache:
    """Keys and values of every layer for the tokens seen so far, with one length per row, for generation.

    A forward pass with the cache writes its T new tokens of row b at positions lengths[b] .. lengths[b]+T-1
    and attends to every cached position up to its own (within the layer's window). Positions past a row's
    length are never attended to, so a right-padded batch of prompts of different lengths is exact: the
    caller sets `lengths` to the true prompt lengths after the prefill, and decoding overwrites the padding.
    Smear mixes in the previous token's embedding, so the cache keeps each position's embedding too.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device: torch.device | str,
                 dtype: torch.dtype = torch.float32) -> None:
        head_dim = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        # Float32 whatever `dtype`: the embeddings are float32 in training too (autocast leaves them be).
        self.embeddings = torch.zeros(batch_size, max_len, config.n_embd, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len = max_len
        self.positions = torch.zeros(batch_size, 0, dtype=torch.long, device=device)  # of the pass under way
        self._index: torch.Tensor | None = None  # its scatter index into k and v
        self.span = 0  # cached positions that pass attends over

    def begin(self, positions: torch.Tensor) -> None:
        """Prepare a forward pass over tokens at `positions` (B, T); one host sync for the span."""
        self.span = int(positions.max().item()) + 1
        if self.span > self.max_len:
            raise ValueError(f"generation reached {self.span} tokens, past the cache of {self.max_len}")
        b, t = positions.shape
        self.positions = positions
        self._index = positions[:, None, :, None].expand(b, self.k.size(2), t, self.k.size(4))

    def previous_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """Store this pass's embeddings x (B, T, C); return each token's predecessor's (zero at 0)."""
        index = self.positions[:, :, None].expand(-1, -1, x.size(2))
        self.embeddings.scatter_(1, index, x.float())
        previous = self.embeddings.gather(1, (index - 1).clamp(min=0)).to(x.dtype)
        return previous * (self.positions > 0)[:, :, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this pass's k, v (B, H_kv, T, D) of `layer`; return the layer's k, v up to the span."""
        self.k[layer].scatter_(2, self._index, k.to(self.k.dtype))
        self.v[layer].scatter_(2, self._index, v.to(self.v.dtype))
        return self.k[layer, :, :, :self.span].to(k.dtype), self.v[layer, :, :, :self.span].to(v.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx  # which slice of a KVCache is this layer's
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        # Value residual (ResFormer, arXiv:2410.17897): a per-token embedding added to the values, scaled by
        # a gate per key/value head that the layer's input decides.
        self.ve_gate_channels = min(VE_GATE_CHANNELS, config.n_embd)
        self.ve_gate = (nn.Linear(self.ve_gate_channels, self.n_kv_head, bias=False)
                        if has_value_embedding(layer_idx, config.n_layer) else None)

    def forward(self, x: torch.Tensor, value_embedding: torch.Tensor | None, cos: torch.Tensor,
                sin: torch.Tensor, window: int, mask: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        """mask: where a query may attend (see attention_mask); None means plain causal (the window
        covers the whole sequence)."""
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if value_embedding is not None:
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))  # (B, T, H_kv), in (0, 3)
            v = v + gate[..., None] * value_embedding.view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q) * QK_SCALE, norm(k) * QK_SCALE  # QK-norm bounds the logits without a learned scale
        gqa = self.n_kv_head != self.n_head
        if cache is None and fa3_applies(x):
            # FlashAttention-3 takes (B, T, H, D) in bf16 and does the window in-kernel.
            q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
            y = fa3_attention(q, k, v, causal=True, window_size=(window, 0))
            y = y[0] if isinstance(y, tuple) else y  # some FA3 releases also return the log-sum-exp
            return self.c_proj(y.contiguous().view(B, T, C))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int = 0):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, value_embedding: torch.Tensor | None, cos: torch.Tensor,
                sin: torch.Tensor, window: int, mask: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(norm(x), value_embedding, cos, sin, window, mask, cache)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.architecture != architecture_for(config.n_layer):
            raise ValueError(f"architecture {config.architecture!r}: this code builds "
                             f"{architecture_for(config.n_layer)!r} at {config.n_layer} layers")
        if config.n_embd % config.n_head or (config.n_embd // config.n_head) % 2:
            raise ValueError(f"n_embd={config.n_embd} must split into {config.n_head} heads of even size")
        if config.n_head % config.n_kv_head:
            raise ValueError(f"n_head={config.n_head} must be a multiple of n_kv_head={config.n_kv_head}")
        self.config = config
        self.window_sizes = window_sizes(config)
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.vocab_size, config.n_embd),
                "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            }
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Per layer (modded-nanogpt): the residual stream is rescaled by resid_lambdas[i] and the first
        # embedding x0 mixed back in by x0_lambdas[i] before block i.
        self.resid_lambdas = nn.Parameter(torch.empty(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.empty(config.n_layer))
        # Smear: each token's embedding takes in its predecessor's through a learned gate (cheap bigrams).
        self.smear_gate_channels = min(SMEAR_GATE_CHANNELS, config.n_embd)
        self.smear_gate = nn.Linear(self.smear_gate_channels, 1, bias=False)
        self.smear_lambda = nn.Parameter(torch.empty(1))
        # Backout: the residual at the middle layer (never the last one), scaled, is subtracted before the
        # head (drops the low-level features the head does not need).
        self.backout_layer = backout_layer(config.n_layer)
        self.backout_lambda = nn.Parameter(torch.empty(1))
        kv_dim = config.n_kv_head * (config.n_embd // config.n_head)
        self.value_embeds = nn.ModuleDict({
            str(i): nn.Embedding(config.vocab_size, kv_dim)
            for i in range(config.n_layer) if has_value_embedding(i, config.n_layer)
        })
        # Cheap to over-compute, so cover 10x the training length (longer inference prompts).
        self.rotary_seq_len = config.sequence_len * 10
        cos, sin = self._precompute_rotary(self.lm_head.weight.device)
        # Non-persistent: derived from the config, so never part of a checkpoint.
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _precompute_rotary(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        head_dim = self.config.n_embd // self.config.n_head
        channels = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (ROTARY_BASE ** (channels / head_dim))
        t = torch.arange(self.rotary_seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        # (1, T, 1, D/2): broadcasts over batch and heads of (B, T, H, D/2).
        return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]

    @torch.no_grad()
    def init_weights(self) -> None:
        """nanochat's init; draws from torch's default generator on the weights' device."""
        n_layer, n_embd = self.config.n_layer, self.config.n_embd
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=0.8)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)  # near-uniform first predictions
        # Uniform (no outliers) with the std of 1/sqrt(n_embd): the bound is sqrt(3) x std.
        bound = math.sqrt(3) / math.sqrt(n_embd)
        for block in self.transformer.h:
            nn.init.uniform_(block.attn.c_q.weight, -bound, bound)
            nn.init.uniform_(block.attn.c_k.weight, -bound, bound)
            nn.init.uniform_(block.attn.c_v.weight, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)  # zeroed output projections: blocks start as identity
            nn.init.uniform_(block.mlp.c_fc.weight, -0.4 * bound, 0.4 * bound)
            nn.init.zeros_(block.mlp.c_proj.weight)
        # Early layers keep more of the residual (1.15 -> 1.05) and mix in more of x0 (0.20 -> 0.05).
        depth_frac = torch.arange(n_layer, dtype=torch.float32) / max(n_layer - 1, 1)
        self.resid_lambdas.copy_(1.15 - 0.10 * depth_frac)
        self.x0_lambdas.copy_(0.20 - 0.15 * depth_frac)
        nn.init.zeros_(self.smear_lambda)  # smear starts off; the gate is ready to open
        nn.init.constant_(self.backout_lambda, 0.2)
        nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
        for embedding in self.value_embeds.values():
            nn.init.uniform_(embedding.weight, -bound, bound)  # as c_v, whose output it adds to
        for block in self.transformer.h:
            if block.attn.ve_gate is not None:  # slightly positive: gates start just above 3 * 0.5
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)
        # to_empty() left the buffers uninitialised too.
        self.cos, self.sin = self._precompute_rotary(self.lm_head.weight.device)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def estimate_flops_per_token(self) -> int:
        """Training FLOPs per token, fwd+bwd: 6 per matmul weight + attention scores (arXiv:2204.02311).

        Embeddings (token and value) are lookups and the scalars are elementwise, so only nn.Linear
        weights count; each layer's attention covers at most its window.
        """
        c = self.config
        matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        head_dim = c.n_embd // c.n_head
        attention = sum(12 * c.n_head * head_dim * min(window, c.sequence_len)
                        for window in self.window_sizes)
        return 6 * matmul + attention

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, loss_reduction: str = "mean",
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, vocab); or the loss, given targets (B, T; -1 = ignore).

        With a cache, row b's tokens continue after its cached lengths[b] tokens, and the lengths advance.
        """
        T = idx.size(1)
        x = norm(in_compute_dtype(self.transformer.wte(idx)))
        masks: dict[int, torch.Tensor | None]  # per window size: where queries may attend
        if cache is None:
            if self.cos.size(1) < T:
                raise ValueError(f"sequence of {T} tokens exceeds the rotary cache of {self.cos.size(1)}")
            cos, sin = self.cos[:, :T], self.sin[:, :T]
            positions = torch.arange(T, device=idx.device)
            masks = {w: None if w >= T - 1 or fa3_applies(x) else attention_mask(positions, positions, w)
                     for w in set(self.window_sizes)}
            previous = F.pad(x[:, :-1], (0, 0, 1, 0))  # each token's predecessor; zero before the first
        else:
            positions = cache.lengths[:, None] + torch.arange(T, device=idx.device)  # (B, T)
            cache.begin(positions)
            if cache.span > self.cos.size(1):
                raise ValueError(f"sequence of {cache.span} tokens exceeds the rotary cache of "
                                 f"{self.cos.size(1)}")
            cos, sin = self.cos[0, positions], self.sin[0, positions]  # (B, T, 1, D/2): a position per row
            keys = torch.arange(cache.span, device=idx.device)
            masks = {w: attention_mask(positions, keys, w)[:, None] for w in set(self.window_sizes)}
            previous = cache.previous_embeddings(x)
        gate = torch.sigmoid(self.smear_gate(x[..., :self.smear_gate_channels]))
        smear = self.smear_lambda.to(x.dtype) * gate
        x = x + smear * previous
        x0 = x
        backout = x
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            value_embedding = (in_compute_dtype(self.value_embeds[str(i)](idx)) if str(i) in self.value_embeds
                               else None)
            window = self.window_sizes[i]
            x = block(x, value_embedding, cos, sin, window, masks[window], cache)
            if i == self.backout_layer:
                backout = x
        if cache is not None:
            cache.lengths += T
        logits = self.lm_head(norm(x - self.backout_lambda.to(x.dtype) * backout))
        # Soft-cap in float32: tanh keeps logits in (-15, 15) so the loss cannot blow up on outliers.
        logits = LOGIT_SOFTCAP * torch.tanh(logits.float() / LOGIT_SOFTCAP)
        if targets is None:
            return logits
        return F.cross_entropy(
            logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction=loss_reduction
        )


def build_model(config: GPTConfig, device: torch.device | str) -> GPT:
    """Allocate the weights straight on `device` (no throw-away CPU init) and initialise them from torch's
    current seed: the one way phoenix creates a model, so every caller gets the same weights for a seed."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    return model


def model_from_weights(config: GPTConfig, weights: dict[str, torch.Tensor],
                       device: torch.device | str) -> GPT:
    """A model holding saved weights (cast to float32), for inference: no random init, no RNG drawn."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.load_state_dict({name: tensor.float() for name, tensor in weights.items()})
    model.cos, model.sin = model._precompute_rotary(torch.device(device))
    return model
