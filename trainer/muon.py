"""Muon's per-matrix update as nanochat does it now: Nesterov, Polar Express, NorMuon, cautious decay.

Each function acts on one parameter and its own state tensors, so the caller decides which rank updates
which matrix (trainer.distributed hands each rank a set of names; one rank alone updates each matrix).
Sources: Polar Express (Amsel et al., arXiv:2505.16932), NorMuon (arXiv:2510.05491), MuonEq row
equilibration (arXiv:2603.28254), Muon+ renormalisation (arXiv:2602.21545), cautious weight decay as in
nanochat's `nanochat/optim.py`.
"""

import torch

# Polar Express: one quintic p(x) = a x + b x^3 + c x^5 per iteration, each tuned for the singular values
# left by the one before (num_iters=5, safety_factor=2e-2, cushion=2), so five iterations reach ~1
# everywhere instead of Newton-Schulz's fixed (3.4445, -4.7750, 2.0315) that stops at 0.7..1.2.
POLAR_EXPRESS_COEFFS: tuple[tuple[float, float, float], ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
NORMUON_BETA2 = 0.9  # EMA of the per-row (or per-column) mean square of the orthogonalised update
NORMUON_EPS = 1e-10


def equilibrate_rows(X: torch.Tensor) -> torch.Tensor:
    """MuonEq: give every row the mean row norm: the spectrum entering the iteration is better conditioned."""
    target = X.float().norm(dim=(-2, -1), keepdim=True) / X.size(-2) ** 0.5
    row_norm = X.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)
    return X * (target / row_norm).to(X.dtype)


def polar_express(G: torch.Tensor, steps: int = len(POLAR_EXPRESS_COEFFS)) -> torch.Tensor:
    """Approximate the polar factor UV^T of G = USV^T (every singular value mapped to ~1).

    bf16 on CUDA (fast, stable enough); float32 elsewhere, where bf16 matmuls are slow and emulated.
    The 1.01 keeps the spectral norm strictly below 1, inside the interval the coefficients were fit on.
    """
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
    tall = X.size(-2) > X.size(-1)
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
        # Gram matrix on the short side: the cheaper of X^T X and X X^T.
        A = X.mT @ X if tall else X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + (X @ B if tall else B @ X)
    return X


def renormalize(U: torch.Tensor) -> torch.Tensor:
    """Muon+: snap the Frobenius norm to sqrt(min(m, n)), an exact semi-orthogonal matrix's norm, which
    corrects for an iteration that stopped short of converging."""
    target = min(U.size(-2), U.size(-1)) ** 0.5
    return U * (target / U.float().norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6)).to(U.dtype)


def normuon_dim(shape: torch.Size) -> int:
    """The dimension NorMuon averages over: columns for tall or square matrices (a statistic per row),
    rows for wide ones (one per column): the statistic lives along the longer side."""
    return -1 if shape[-2] >= shape[-1] else -2


def normuon_buffer_shape(shape: torch.Size) -> tuple[int, int]:
    return (shape[-2], 1) if normuon_dim(shape) == -1 else (1, shape[-1])


def normuon(U: torch.Tensor, second_moment: torch.Tensor, beta2: float = NORMUON_BETA2) -> torch.Tensor:
    """NorMuon variance reduction: divide each row (or column) of U by the root of its running mean square,
    then rescale so the Frobenius norm is U's again: it evens out the per-neuron step sizes that the
    orthogonalisation leaves unequal, without changing the overall step. Updates second_moment in place."""
    dim = normuon_dim(U.shape)
    v_mean = U.float().square().mean(dim=dim, keepdim=True)
    second_moment.lerp_(v_mean.to(second_moment.dtype), 1 - beta2)
    scale = second_moment.float().clamp_min(NORMUON_EPS).rsqrt()
    # ||U * scale||_F without forming it; per matrix, so a stack of same-shape matrices works too.
    scaled_norm = (v_mean * U.size(dim) * scale.square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    norm = U.float().norm(dim=(-2, -1), keepdim=True)
    return U * (scale * (norm / scaled_norm.clamp_min(NORMUON_EPS))).to(U.dtype)


def cautious_mask(update: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Where weight decay applies: update and weight share a sign (or either is 0), i.e. where the step
    p -= lr * update already moves the weight toward zero; elsewhere decay would fight the gradient."""
    return (update * p) >= 0


@torch.no_grad()
def muon_update(p: torch.Tensor, grad: torch.Tensor, momentum_buffer: torch.Tensor,
                second_moment: torch.Tensor, lr: float | torch.Tensor, weight_decay: float | torch.Tensor,
                momentum: float | torch.Tensor) -> None:
    """One Muon step for one matrix, in place on p and its two state tensors, in nanochat's order.
    The hyperparameters are floats, or 0-d tensors when compiled (trainer.optim.HybridOptimizer)."""
    momentum_buffer.lerp_(grad, 1 - momentum)
    g = grad.lerp(momentum_buffer, momentum)  # Nesterov: look ahead along the buffer
    U = polar_express(equilibrate_rows(g)).to(p.dtype)
    U = normuon(renormalize(U), second_moment)
    # Orthogonalised updates have unit-ish singular values; tall matrices get a larger step so their
    # per-element RMS matches wide ones.
    lr = lr * max(1.0, p.size(-2) / p.size(-1)) ** 0.5
    p.sub_(lr * U + lr * weight_decay * p * cautious_mask(U, p))
