"""GPT model as nanochat builds it: rotary, QK-norm, ReLU² MLP, untied head, logit soft-cap, no biases.

Build big models on the meta device, then `to_empty(device=...)` and `init_weights()`:
nothing is allocated or initialised twice, and the weights depend only on torch's seed.
Generation passes a `KVCache` to `forward`; without one (training) the computation is unchanged.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

ROTARY_BASE = 10000
LOGIT_SOFTCAP = 15.0


@dataclass
class GPTConfig:
    sequence_len: int
    vocab_size: int
    n_layer: int
    n_head: int  # query heads
    n_kv_head: int  # key/value heads; < n_head gives grouped-query attention
    n_embd: int


def config_for_depth(
    depth: int, vocab_size: int, sequence_len: int, aspect_ratio: int = 64, head_dim: int = 128
) -> GPTConfig:
    """nanochat's one-knob sizing: width = depth * aspect_ratio, heads of ~head_dim channels."""
    model_dim = depth * aspect_ratio
    n_head = max(1, math.ceil(model_dim / head_dim))
    return GPTConfig(
        sequence_len=sequence_len,
        vocab_size=vocab_size,
        n_layer=depth,
        n_head=n_head,
        n_kv_head=n_head,
        n_embd=model_dim,
    )


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


class KVCache:
    """Keys and values of every layer for the tokens seen so far, with one length per row, for generation.

    A forward pass with the cache writes its T new tokens of row b at positions lengths[b] .. lengths[b]+T-1
    and attends to every cached position up to its own. Positions past a row's length are masked out, so
    a right-padded batch of prompts of different lengths is exact: the caller sets `lengths` to the true
    prompt lengths after the prefill, and decoding overwrites the padding.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device: torch.device | str,
                 dtype: torch.dtype = torch.float32) -> None:
        head_dim = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len = max_len
        self._index: torch.Tensor | None = None  # scatter index of the forward pass under way
        self.mask: torch.Tensor | None = None  # its (B, 1, T, span) attention mask
        self.span = 0  # cached positions that pass attends over

    def begin(self, positions: torch.Tensor) -> None:
        """Prepare a forward pass over tokens at `positions` (B, T); one host sync for the span."""
        self.span = int(positions.max().item()) + 1
        if self.span > self.max_len:
            raise ValueError(f"generation reached {self.span} tokens, past the cache of {self.max_len}")
        b, t = positions.shape
        self._index = positions[:, None, :, None].expand(b, self.k.size(2), t, self.k.size(4))
        keys = torch.arange(self.span, device=positions.device)
        self.mask = keys[None, None, None, :] <= positions[:, None, :, None]

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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)  # QK-norm keeps attention logits bounded without a learned scale
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        gqa = self.n_kv_head != self.n_head
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            k, v = cache.update(self.layer_idx, k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.mask, enable_gqa=gqa)
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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(norm(x), cos, sin, cache)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.n_embd % config.n_head or (config.n_embd // config.n_head) % 2:
            raise ValueError(f"n_embd={config.n_embd} must split into {config.n_head} heads of even size")
        if config.n_head % config.n_kv_head:
            raise ValueError(f"n_head={config.n_head} must be a multiple of n_kv_head={config.n_kv_head}")
        self.config = config
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.vocab_size, config.n_embd),
                "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            }
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
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
        for module in self.modules():
            if isinstance(module, nn.Linear):
                # Spectral-ish scaling (arXiv:2310.17813): std 1/sqrt(fan_in), shrunk for narrow outputs.
                fan_out, fan_in = module.weight.shape
                std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=1.0)
        # Zeroed output projections: every block starts as the identity and the model predicts uniform.
        nn.init.zeros_(self.lm_head.weight)
        for block in self.transformer.h:
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        # to_empty() left the buffers uninitialised too.
        self.cos, self.sin = self._precompute_rotary(self.lm_head.weight.device)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def estimate_flops_per_token(self) -> int:
        """Training FLOPs per token, fwd+bwd: 6 per matmul weight + attention scores (arXiv:2204.02311).

        The embedding is a lookup, not a matmul, so it is left out; lm_head is a matmul and stays in.
        """
        c = self.config
        n_matmul = self.num_params() - self.transformer.wte.weight.numel()
        return 6 * n_matmul + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * c.sequence_len

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, loss_reduction: str = "mean",
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, vocab); or the loss, given targets (B, T; -1 = ignore).

        With a cache, row b's tokens continue after its cached lengths[b] tokens, and the lengths advance.
        """
        T = idx.size(1)
        if cache is None:
            if self.cos.size(1) < T:
                raise ValueError(f"sequence of {T} tokens exceeds the rotary cache of {self.cos.size(1)}")
            cos, sin = self.cos[:, :T], self.sin[:, :T]
        else:
            positions = cache.lengths[:, None] + torch.arange(T, device=idx.device)  # (B, T)
            cache.begin(positions)
            if cache.span > self.cos.size(1):
                raise ValueError(f"sequence of {cache.span} tokens exceeds the rotary cache of "
                                 f"{self.cos.size(1)}")
            cos, sin = self.cos[0, positions], self.sin[0, positions]  # (B, T, 1, D/2): a position per row
        x = norm(self.transformer.wte(idx))
        for block in self.transformer.h:
            x = block(x, cos, sin, cache)
        if cache is not None:
            cache.lengths += T
        logits = self.lm_head(norm(x))
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

# Dense (no sparsity) bf16 tensor-core peak FLOPS per GPU, matched as a case-insensitive substring of
# torch.cuda.get_device_name(). Order matters: more specific names come before their prefixes.
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("B100", 1.75e15),
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM / HBM3
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),  # fp32 accumulate, as training uses
    ("RTX 3090", 71e12),
    ("MI325X", 1307e12),
    ("MI300X", 1307e12),
]


def peak_flops(device_name: str) -> float | None:
    """bf16 dense peak FLOPS for a GPU name (for MFU); None for CPU or an unknown device."""
    name = device_name.lower()
    for key, flops in PEAK_BF16_FLOPS:
        if key.lower() in name:
            return flops
    return None
