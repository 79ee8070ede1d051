"""Hybrid optimizer (Muon for block matrices, AdamW for embedding and lm_head) with nanochat's schedules.

One object drives both: `step()`, `zero_grad()`, `set_schedule(step, num_iterations)`. Its state is a
flat dict of tensors keyed by parameter name (`adamw.<fqn>.exp_avg`, `muon.<fqn>.momentum_buffer`, ...),
so a checkpoint neither depends on world size nor on parameter order and saves as-is with safetensors.
Gradients must already be averaged across ranks (DDP does that); the update itself is per-replica.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from trainer.model import GPT

ADAMW_BETAS = (0.8, 0.95)
ADAMW_EPS = 1e-10
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def lr_multiplier(
    step: int,
    num_iterations: int,
    warmup_ratio: float = 0.0,
    warmdown_ratio: float = 0.2,
    final_lr_frac: float = 0.0,
) -> float:
    """Linear warmup, flat, then linear warmdown to final_lr_frac over the last warmdown_ratio of training."""
    warmup_iters = round(warmup_ratio * num_iterations)
    warmdown_iters = round(warmdown_ratio * num_iterations)
    if step < warmup_iters:
        return (step + 1) / warmup_iters
    if step <= num_iterations - warmdown_iters:
        return 1.0
    progress = (num_iterations - step) / warmdown_iters
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step: int) -> float:
    """Muon momentum ramps 0.85 -> 0.95 linearly over the first 300 steps, then stays."""
    frac = min(step / 300, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


def weight_decay_multiplier(step: int, num_iterations: int) -> float:
    """Weight decay fades linearly to zero over training."""
    return 1 - step / num_iterations


def zeropower_via_newtonschulz5(G: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """Approximately orthogonalize G (US'V^T with S' ~ 0.5..1.5 instead of USV^T) by a quintic Newton-Schulz.

    bf16 on CUDA (fast, stable enough); float32 elsewhere, where bf16 matmuls are slow and emulated.
    """
    a, b, c = NS_COEFFS
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    tall = G.size(-2) > G.size(-1)
    if tall:  # iterate on the wide orientation: X @ X^T is then the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.mT if tall else X


@dataclass
class ParamGroup:
    kind: str  # "adamw" or "muon"
    initial_lr: float
    params: dict[str, nn.Parameter] = field(default_factory=dict)  # by model.named_parameters() name
    lr: float = 0.0  # lr, weight_decay, momentum: current values, set by HybridOptimizer.set_schedule
    weight_decay: float = 0.0
    momentum: float = 0.0  # read by Muon only


class HybridOptimizer:
    """Muon on every 2-D matrix inside transformer blocks, AdamW on transformer.wte and lm_head."""

    def __init__(
        self,
        model: GPT,
        unembedding_lr: float = 0.004,
        embedding_lr: float = 0.2,
        matrix_lr: float = 0.02,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.0,
        warmdown_ratio: float = 0.2,
        final_lr_frac: float = 0.0,
    ):
        """model: the bare GPT (not DDP- or compile-wrapped), so names match its state_dict()."""
        self.base_weight_decay = weight_decay
        self.warmup_ratio = warmup_ratio
        self.warmdown_ratio = warmdown_ratio
        self.final_lr_frac = final_lr_frac
        # AdamW lrs were tuned at width 768; scale them by 1/sqrt(width) relative to that.
        adamw_scale = (model.config.n_embd / 768) ** -0.5
        self.groups = [
            ParamGroup("adamw", unembedding_lr * adamw_scale),
            ParamGroup("adamw", embedding_lr * adamw_scale),
            ParamGroup("muon", matrix_lr),
        ]
        unembedding, embedding, matrix = (g.params for g in self.groups)
        for name, p in model.named_parameters():
            if name == "lm_head.weight":
                unembedding[name] = p
            elif name == "transformer.wte.weight":
                embedding[name] = p
            elif name.startswith("transformer.h.") and p.ndim == 2:
                matrix[name] = p
            else:
                raise ValueError(f"no optimizer group for parameter {name} of shape {tuple(p.shape)}")
        for g in self.groups:  # un-scheduled values, until the first set_schedule()
            g.lr, g.weight_decay, g.momentum = g.initial_lr, weight_decay, muon_momentum(0)
        # Allocated up front (not lazily on first step) so the key set is fixed from construction on:
        # load_state_tensors can then check a checkpoint against it before any step has run.
        self.state: dict[str, torch.Tensor] = {}
        for name, p in {**unembedding, **embedding}.items():
            self.state[f"adamw.{name}.step"] = torch.zeros((), dtype=torch.int64)  # CPU: .item() is free
            self.state[f"adamw.{name}.exp_avg"] = torch.zeros_like(p)
            self.state[f"adamw.{name}.exp_avg_sq"] = torch.zeros_like(p)
        for name, p in matrix.items():
            self.state[f"muon.{name}.momentum_buffer"] = torch.zeros_like(p)

    def set_schedule(self, step: int, num_iterations: int) -> None:
        """Set lr, weight decay and Muon momentum for `step` (pure functions of it, so never checkpointed)."""
        lr_mult = lr_multiplier(
            step, num_iterations, self.warmup_ratio, self.warmdown_ratio, self.final_lr_frac
        )
        wd = self.base_weight_decay * weight_decay_multiplier(step, num_iterations)
        for g in self.groups:
            g.lr = g.initial_lr * lr_mult
            g.weight_decay = wd
            g.momentum = muon_momentum(step)

    @torch.no_grad()
    def step(self) -> None:
        for g in self.groups:
            for name, p in g.params.items():
                if p.grad is None:
                    continue
                if g.kind == "adamw":
                    self._adamw_update(name, p, g.lr, g.weight_decay)
                else:
                    self._muon_update(name, p, g.lr, g.weight_decay, g.momentum)

    def _adamw_update(self, name: str, p: nn.Parameter, lr: float, wd: float) -> None:
        s = self.state
        step_t, exp_avg, exp_avg_sq = (s[f"adamw.{name}.{k}"] for k in ("step", "exp_avg", "exp_avg_sq"))
        step_t += 1
        step = int(step_t.item())
        beta1, beta2 = ADAMW_BETAS
        g = p.grad
        p.mul_(1 - lr * wd)  # decoupled weight decay
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(ADAMW_EPS)
        p.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))

    def _muon_update(self, name: str, p: nn.Parameter, lr: float, wd: float, momentum: float) -> None:
        buf = self.state[f"muon.{name}.momentum_buffer"]
        buf.lerp_(p.grad, 1 - momentum)
        update = zeropower_via_newtonschulz5(p.grad.lerp(buf, momentum))  # Nesterov
        p.mul_(1 - lr * wd)
        # Orthogonalized updates have unit-ish singular values; tall matrices get a larger step so their
        # per-element RMS matches wide ones.
        p.add_(update, alpha=-lr * max(1.0, p.size(-2) / p.size(-1)) ** 0.5)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for g in self.groups:
            for p in g.params.values():
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything needed to continue bitwise-exactly, flat and safetensors-ready.

        The tensors are the live state (as with state_dict()): copy them before the next step()
        if they are written out while training continues.
        """
        return dict(self.state)

    def load_state_tensors(self, d: dict[str, torch.Tensor]) -> None:
        """Copy a state_tensors() dict in (onto this optimizer's devices); checks keys, shapes and dtypes."""
        missing, unexpected = sorted(self.state.keys() - d.keys()), sorted(d.keys() - self.state.keys())
        if missing or unexpected:
            raise ValueError(f"optimizer state mismatch: missing keys {missing}, unexpected {unexpected}")
        for key, t in self.state.items():
            if d[key].shape != t.shape or d[key].dtype != t.dtype:
                raise ValueError(
                    f"optimizer state {key}: got {d[key].dtype}{list(d[key].shape)}, "
                    f"expected {t.dtype}{list(t.shape)}"
                )
        for key, t in self.state.items():
            t.copy_(d[key])
