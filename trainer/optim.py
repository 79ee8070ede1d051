"""Hybrid optimizer (Muon for block matrices, AdamW for the rest) and schedules, at nanochat's recipe.

One object drives both: `step()`, `zero_grad()`, `set_schedule(step, num_iterations)`. Its state is a
flat dict of tensors keyed by parameter name (`adamw.<fqn>.exp_avg`, `muon.<fqn>.momentum_buffer`,
`muon.<fqn>.second_momentum_buffer`, ...), so a checkpoint neither depends on world size nor on parameter
order and saves as-is with safetensors. Every update reads and writes one parameter and its own state
(`update(name)`), so ranks can split the work by name: constructed with `owned`, the optimizer keeps state
for those names only and `step()` updates them alone (trainer.distributed.ShardedOptimizer reduces their
gradients first and shares the updated weights after).
"""

import math
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from trainer.model import GPT
from trainer.muon import muon_update, normuon_buffer_shape

# Bumped whenever the update rule or its state changes; a checkpoint records it and a resume under another
# rule refuses (resume.restore_trajectory): the trajectory would silently change.
OPTIMIZER_RECIPE = "muon-polar-express-normuon-cautious-wd/adamw"

ADAMW_EPS = 1e-10
ADAMW_WIDTH_REF = 768  # AdamW lrs were tuned at width 768: scaled by (width / 768) ** -0.5 elsewhere


@dataclass(frozen=True)
class AdamWGroup:
    """nanochat's AdamW settings for the parameters whose name starts with `prefix`."""

    prefix: str
    lr_name: str  # which constructor learning rate: "unembedding_lr", "embedding_lr", "scalar_lr", or
    # "fixed": lr_factor is the lr itself, not scaled for the batch (trainer.recipe scales the others)
    lr_factor: float
    betas: tuple[float, float]
    weight_decay: float  # constant (nanochat schedules only Muon's); applied as p *= 1 - lr * wd
    width_scaled: bool  # the 1/sqrt(width / 768) transfer of nanochat's embedding and head lrs


# nanochat's table (gpt.py setup_optimizer). Inside the blocks everything goes to Muon, the value
# embeddings' gates (ve_gate, 2-D) included, as nanochat does.
ADAMW_GROUPS: tuple[AdamWGroup, ...] = (
    AdamWGroup("lm_head.", "unembedding_lr", 1.0, (0.8, 0.96), 0.01, True),
    AdamWGroup("transformer.wte.", "embedding_lr", 1.0, (0.8, 0.995), 0.001, True),
    AdamWGroup("value_embeds.", "embedding_lr", 0.5, (0.8, 0.995), 0.01, True),
    AdamWGroup("resid_lambdas", "scalar_lr", 0.01, (0.8, 0.95), 0.05, False),
    AdamWGroup("x0_lambdas", "scalar_lr", 1.0, (0.96, 0.95), 0.0, False),
    AdamWGroup("smear_", "fixed", 0.2, (0.8, 0.95), 0.0, False),  # smear_gate.weight, smear_lambda
    AdamWGroup("backout_lambda", "fixed", 0.2, (0.8, 0.95), 0.0, False),
)

# Schedules, all pure functions of the step (exact resume needs nothing else). nanochat's base_train.py.
WARMUP_STEPS = 40
WARMDOWN_RATIO = 0.65
FINAL_LR_FRAC = 0.05
MOMENTUM_START, MOMENTUM_PEAK, MOMENTUM_END, MOMENTUM_RAMP_STEPS = 0.85, 0.97, 0.90, 400


def lr_multiplier(step: int, num_iterations: int, warmup_steps: int = WARMUP_STEPS,
                  warmdown_ratio: float = WARMDOWN_RATIO, final_lr_frac: float = FINAL_LR_FRAC) -> float:
    """Linear warmup over warmup_steps, flat, then linear warmdown to final_lr_frac over the last
    warmdown_ratio of training."""
    warmdown_iters = round(warmdown_ratio * num_iterations)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step <= num_iterations - warmdown_iters:
        return 1.0
    progress = (num_iterations - step) / warmdown_iters
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step: int, num_iterations: int, warmdown_ratio: float = WARMDOWN_RATIO) -> float:
    """0.85 -> 0.97 linearly over the first 400 steps, flat, then 0.97 -> 0.90 across the lr warmdown
    (the ramp wins where the two overlap, as in nanochat)."""
    warmdown_iters = round(warmdown_ratio * num_iterations)
    warmdown_start = num_iterations - warmdown_iters
    if step < MOMENTUM_RAMP_STEPS:
        frac = step / MOMENTUM_RAMP_STEPS
        return (1 - frac) * MOMENTUM_START + frac * MOMENTUM_PEAK
    if step >= warmdown_start:
        progress = (step - warmdown_start) / warmdown_iters
        return (1 - progress) * MOMENTUM_PEAK + progress * MOMENTUM_END
    return MOMENTUM_PEAK


def weight_decay_multiplier(step: int, num_iterations: int) -> float:
    """Muon's weight decay follows a cosine from 1 at step 0 to 0 at the last step."""
    return 0.5 * (1 + math.cos(math.pi * step / num_iterations))


def adamw_update(p: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 decay: float | torch.Tensor, beta1: float | torch.Tensor, beta2: float | torch.Tensor,
                 bias2_sqrt: float | torch.Tensor, step_size: float | torch.Tensor) -> None:
    """One AdamW step for one parameter, in place. decay = 1 - lr * wd (decoupled, before the step),
    bias2_sqrt = sqrt(1 - beta2^t), step_size = lr / (1 - beta1^t). Floats or 0-d tensors alike."""
    p.mul_(decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.lerp_(grad.square(), 1 - beta2)
    denom = (exp_avg_sq.sqrt() / bias2_sqrt).add_(ADAMW_EPS)
    p.sub_(exp_avg / denom * step_size)


@dataclass
class ParamGroup:
    kind: str  # "adamw" or "muon"
    initial_lr: float
    betas: tuple[float, float] = (0.0, 0.0)  # AdamW only
    base_weight_decay: float = 0.0  # Muon: the peak of its cosine; AdamW: constant
    params: dict[str, nn.Parameter] = field(default_factory=dict)  # by model.named_parameters() name
    lr: float = 0.0  # lr, weight_decay, momentum: current values, set by HybridOptimizer.set_schedule
    weight_decay: float = 0.0
    momentum: float = 0.0  # read by Muon only


class HybridOptimizer:
    """Muon on every parameter inside transformer blocks (all 2-D), AdamW by ADAMW_GROUPS on the rest."""

    def __init__(
        self,
        model: GPT,
        unembedding_lr: float = 0.008,
        embedding_lr: float = 0.3,
        matrix_lr: float = 0.02,
        scalar_lr: float = 0.5,
        weight_decay: float = 0.28,
        warmup_steps: int = WARMUP_STEPS,
        warmdown_ratio: float = WARMDOWN_RATIO,
        final_lr_frac: float = FINAL_LR_FRAC,
        owned: Collection[str] | None = None,
        compile_update: bool = False,
    ):
        """model: the bare GPT (not compile-wrapped), so names match its state_dict().
        Learning rates and weight_decay come already scaled for the batch and horizon (trainer.recipe).
        owned: the parameter names this optimizer keeps state for and updates (default: all of them).
        compile_update: run each update as one torch.compile'd graph (the hyperparameters go in as 0-d
        tensors, so a new learning rate is not a recompile)."""
        self.warmup_steps = warmup_steps
        self.warmdown_ratio = warmdown_ratio
        self.final_lr_frac = final_lr_frac
        lrs = {"unembedding_lr": unembedding_lr, "embedding_lr": embedding_lr, "scalar_lr": scalar_lr,
               "fixed": 1.0}
        width_scale = (model.config.n_embd / ADAMW_WIDTH_REF) ** -0.5
        adamw = {}
        for rule in ADAMW_GROUPS:
            lr = lrs[rule.lr_name] * rule.lr_factor * (width_scale if rule.width_scaled else 1.0)
            adamw[rule.prefix] = ParamGroup("adamw", lr, rule.betas, rule.weight_decay)
        muon = ParamGroup("muon", matrix_lr, base_weight_decay=weight_decay)
        for name, p in model.named_parameters():
            if name.startswith("transformer.h."):
                if p.ndim != 2:
                    raise ValueError(f"Muon takes matrices; {name} has shape {tuple(p.shape)}")
                muon.params[name] = p
                continue
            rule = next((r for r in ADAMW_GROUPS if name.startswith(r.prefix)), None)
            if rule is None:
                raise ValueError(f"no optimizer group for parameter {name} of shape {tuple(p.shape)}")
            adamw[rule.prefix].params[name] = p
        self.groups = [g for g in (*adamw.values(), muon) if g.params]
        for g in self.groups:  # un-scheduled values, until the first set_schedule()
            g.lr, g.weight_decay, g.momentum = g.initial_lr, g.base_weight_decay, MOMENTUM_START
        self._group_of = {name: g for g in self.groups for name in g.params}
        unknown = set(owned or ()) - self._group_of.keys()
        if unknown:
            raise ValueError(f"owned names that are not parameters: {sorted(unknown)}")
        self.owned_names = [n for n in self._group_of if owned is None or n in owned]
        # Allocated up front (not lazily on first step) so the key set is fixed from construction on:
        # load_state_tensors can then check a checkpoint against it before any step has run.
        self.state: dict[str, torch.Tensor] = {}
        for name in self.owned_names:
            self.state.update(self.new_state(name))
        self._muon: Callable[..., None] = muon_update
        self._adamw: Callable[..., None] = adamw_update
        if compile_update:
            # dynamic=False: one graph per parameter shape (a handful), each specialised for its shape.
            self._muon = torch.compile(muon_update, dynamic=False, fullgraph=True)
            self._adamw = torch.compile(adamw_update, dynamic=False, fullgraph=True)
        self.compile_update = compile_update

    def new_state(self, name: str) -> dict[str, torch.Tensor]:
        """The zero state of one parameter, by key (also the shape and dtype of what a checkpoint holds)."""
        p = self._group_of[name].params[name]
        if self._group_of[name].kind == "adamw":
            return {f"adamw.{name}.step": torch.zeros((), dtype=torch.int64),  # CPU: free .item()
                    f"adamw.{name}.exp_avg": torch.zeros_like(p),
                    f"adamw.{name}.exp_avg_sq": torch.zeros_like(p)}
        # NorMuon's running mean square: one per row (tall/square) or per column (wide).
        return {f"muon.{name}.momentum_buffer": torch.zeros_like(p),
                f"muon.{name}.second_momentum_buffer": p.new_zeros(normuon_buffer_shape(p.shape))}

    def state_keys(self, names: Collection[str]) -> list[str]:
        """The state keys of these parameters, without allocating anything."""
        suffixes = {"adamw": ("step", "exp_avg", "exp_avg_sq"),
                    "muon": ("momentum_buffer", "second_momentum_buffer")}
        return [f"{self._group_of[n].kind}.{n}.{s}" for n in names for s in suffixes[self._group_of[n].kind]]

    def set_schedule(self, step: int, num_iterations: int) -> None:
        """Set lr, weight decay and Muon momentum for `step` (pure functions of it, so never checkpointed)."""
        lr_mult = lr_multiplier(step, num_iterations, self.warmup_steps, self.warmdown_ratio,
                                self.final_lr_frac)
        for g in self.groups:
            g.lr = g.initial_lr * lr_mult
            if g.kind == "muon":
                g.weight_decay = g.base_weight_decay * weight_decay_multiplier(step, num_iterations)
                g.momentum = muon_momentum(step, num_iterations, self.warmdown_ratio)
            else:
                g.weight_decay = g.base_weight_decay

    @property
    def param_names(self) -> list[str]:
        """Every optimized parameter, in a fixed order: the unit a sharded optimizer assigns to ranks."""
        return list(self._group_of)

    @torch.no_grad()
    def step(self) -> None:
        for name in self.owned_names:
            self.update(name)

    @torch.no_grad()
    def update(self, name: str) -> None:
        """Update one parameter from its gradient; touches only that parameter and its own state keys."""
        g = self._group_of[name]
        p = g.params[name]
        if p.grad is None:
            return
        s = self.state
        if g.kind == "adamw":
            step_t = s[f"adamw.{name}.step"]
            step_t += 1
            step = int(step_t.item())
            beta1, beta2 = g.betas
            # Scalars worked out here in float64, so the kernel sees no step counter and never recompiles.
            hyper = (1 - g.lr * g.weight_decay, beta1, beta2, math.sqrt(1 - beta2**step),
                     g.lr / (1 - beta1**step))
            self._adamw(p.detach(), p.grad, s[f"adamw.{name}.exp_avg"], s[f"adamw.{name}.exp_avg_sq"],
                        *self._scalars(hyper))
        else:
            self._muon(p.detach(), p.grad, s[f"muon.{name}.momentum_buffer"],
                       s[f"muon.{name}.second_momentum_buffer"],
                       *self._scalars((g.lr, g.weight_decay, g.momentum)))

    def _scalars(self, values: tuple[float, ...]) -> tuple[float, ...] | tuple[torch.Tensor, ...]:
        """Python floats for the eager kernels; 0-d CPU tensors for compiled ones (a float would be baked
        into the graph, and each new learning rate would compile it again)."""
        if not self.compile_update:
            return values
        return tuple(torch.tensor(v, dtype=torch.float32) for v in values)

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
