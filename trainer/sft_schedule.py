"""SFT's schedules at nanochat's current chat_sft.py: lr flat then linear warmdown, Muon momentum ramp.

nanochat starts SFT at init_lr_frac = 0.8 of the base run's learning rates (the unscaled ones it was
given), keeps them for the first half (no warmup), then decays linearly to final_lr_frac = 0 over the
second half; Muon's momentum ramps 0.85 -> 0.95 over the first 300 steps and stays there; Muon has no
weight decay (base training's cosine ended it at 0) while the AdamW groups keep their constant one
(lm_head 0.01, wte 0.001, value embeddings 0.01, resid_lambdas 0.05), as nanochat's setup_optimizer(
weight_decay=0.0) leaves them. nanochat writes the lr as a function of progress through
the data; phoenix knows its horizon up front, so progress = step / num_iterations. Pure functions of the
step: a resume needs nothing but the step.
"""

from __future__ import annotations

from trainer.optim import ParamGroup

# Recorded in each SFT checkpoint: a resume under other schedules would change the run silently.
SFT_SCHEDULE = "nanochat-sft-2026: flat then warmdown, momentum 0.85->0.95/300, adamw weight decay kept"

INIT_LR_FRAC = 0.8
WARMUP_RATIO = 0.0
WARMDOWN_RATIO = 0.5
FINAL_LR_FRAC = 0.0
MOMENTUM_START, MOMENTUM_END, MOMENTUM_RAMP_STEPS = 0.85, 0.95, 300


def sft_lr_multiplier(progress: float, warmup_ratio: float = WARMUP_RATIO,
                      warmdown_ratio: float = WARMDOWN_RATIO, final_lr_frac: float = FINAL_LR_FRAC) -> float:
    """nanochat's get_lr_multiplier(progress): linear warmup, flat, linear warmdown to final_lr_frac."""
    if progress < warmup_ratio:
        return (progress + 1e-8) / warmup_ratio
    if progress <= 1.0 - warmdown_ratio:
        return 1.0
    decay = (progress - (1.0 - warmdown_ratio)) / warmdown_ratio
    return (1 - decay) + decay * final_lr_frac


def sft_muon_momentum(step: int) -> float:
    frac = min(step / MOMENTUM_RAMP_STEPS, 1.0)
    return (1 - frac) * MOMENTUM_START + frac * MOMENTUM_END


def set_sft_schedule(groups: list[ParamGroup], step: int, num_iterations: int) -> float:
    """Set the optimizer groups' lr, weight decay (Muon 0, AdamW its own constant) and Muon momentum for
    `step`; returns the lr multiplier."""
    lrm = sft_lr_multiplier(step / num_iterations)
    for group in groups:
        group.lr = group.initial_lr * lrm
        group.weight_decay = 0.0 if group.kind == "muon" else group.base_weight_decay
        if group.kind == "muon":
            group.momentum = sft_muon_momentum(step)
    return lrm
