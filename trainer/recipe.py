"""nanochat's scaling rules: training horizon, total batch, and the lr and weight-decay transfer from d12.

nanochat tunes its hyperparameters on one reference model (d12 at 2^19-token batches) and carries them
to any depth by three rules (scripts/base_train.py): tokens = ratio x scaling parameters; the batch grows
as tokens^0.383 (Power Lines, arXiv:2505.13738); learning rates scale by sqrt(batch / 2^19); Muon's
weight decay by sqrt(batch / 2^19) x (reference tokens / tokens), which keeps T_epoch = B / (lr * wd * D)
constant (arXiv:2405.13698). Pure arithmetic, so it is tested without a model.
"""

import math
from collections.abc import Iterable
from dataclasses import dataclass

REFERENCE_DEPTH = 12  # the model nanochat's learning rates and weight decay were tuned on
REFERENCE_BATCH = 2**19  # tokens per step at that depth (524,288)
BATCH_EXPONENT = 0.383  # optimal batch ~ tokens^0.383
ASSUMED_MFU = 0.40  # for a time estimate before this run has measured its own tok/s


def scaling_params(named_shapes: Iterable[tuple[str, int]]) -> int:
    """Parameters the horizon counts, as nanochat does: the transformer blocks' matrices plus lm_head
    (not the embedding lookups, not the scalars): its cleanest scaling laws (nanochat dev/LOG.md,
    2026-01-27). Takes (name, numel) pairs, e.g. from model.named_parameters()."""
    return sum(n for name, n in named_shapes if name.startswith(("transformer.h.", "lm_head.")))


def auto_total_batch_size(target_tokens: float, reference_tokens: float,
                          reference_batch: int = REFERENCE_BATCH) -> int:
    """reference_batch x (tokens / reference tokens)^0.383, rounded to the nearest power of two."""
    predicted = reference_batch * (target_tokens / reference_tokens) ** BATCH_EXPONENT
    return 2 ** round(math.log2(predicted))


@dataclass(frozen=True)
class Plan:
    """What a run will do, fixed before its first step."""

    scaling_params: int
    target_tokens: int  # ratio x scaling_params; drives the batch and the weight decay even when the
    # number of steps is given explicitly (as in nanochat)
    total_batch_size: int
    num_iterations: int
    lr_scale: float  # multiplies every learning rate
    weight_decay: float  # Muon's peak weight decay, after scaling

    @property
    def tokens(self) -> int:
        return self.num_iterations * self.total_batch_size


def plan(scaling: int, reference_scaling: int, ratio: float, total_batch_size: int, num_iterations: int,
         weight_decay: float, reference_batch: int = REFERENCE_BATCH) -> Plan:
    """nanochat's horizon for a model with `scaling` scaling parameters, against a reference model (same
    widths rule and vocab at REFERENCE_DEPTH) with `reference_scaling`. total_batch_size / num_iterations
    <= 0 mean "derive them"."""
    target_tokens = int(ratio * scaling)
    reference_tokens = ratio * reference_scaling
    if total_batch_size <= 0:
        total_batch_size = auto_total_batch_size(target_tokens, reference_tokens, reference_batch)
    if num_iterations <= 0:
        num_iterations = target_tokens // total_batch_size
    batch_ratio = total_batch_size / reference_batch
    return Plan(scaling_params=scaling, target_tokens=target_tokens, total_batch_size=total_batch_size,
                num_iterations=num_iterations, lr_scale=batch_ratio**0.5,
                weight_decay=weight_decay * batch_ratio**0.5 * reference_tokens / target_tokens)
