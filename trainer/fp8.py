"""FP8 matmuls for training (`--fp8 1` / `FP8=1`), on GPUs that have them: nanochat's torch-only recipe.

Each big nn.Linear of the model does its three matmuls (forward, grad of input, grad of weight) through
torch._scaled_mm in float8 with one dynamic scale per tensor ("tensorwise"): inputs and weights in e4m3
(more mantissa), gradients in e5m2 (more range), as nanochat/fp8.py does in place of torchao's
Float8Linear. Weights stay float32 master weights and the optimizer is unchanged: only the matmuls' inputs
are quantised on the fly, so checkpoints are the same with FP8 on or off. Evaluation and sampling (no
gradients) keep the plain bf16 matmul, as nanochat evaluates with FP8 disabled. FP8 matmuls need CUDA
compute capability >= 8.9 (Ada, Hopper, Blackwell): elsewhere the trainer refuses the flag in one line.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

MIN_CAPABILITY = (8, 9)
# cuBLAS FP8 kernels want dims divisible by 16; below 128 the casts cost more than the matmul saves.
DIM_MULTIPLE, MIN_DIM = 16, 128


def fp8_unavailable(device: torch.device) -> str | None:
    """Why FP8 training cannot run on `device` (a clause for an error line), or None if it can."""
    if device.type != "cuda":
        return fp8_refusal(device.type, None)
    return fp8_refusal("cuda", torch.cuda.get_device_capability(device), torch.cuda.get_device_name(device))


def fp8_refusal(device_type: str, capability: tuple[int, int] | None, gpu_name: str = "") -> str | None:
    """The decision itself, from what the device reports."""
    need = "FP8 matmuls need a CUDA GPU of compute capability >= 8.9 (H100, L40S, B200)"
    if device_type != "cuda" or capability is None:
        return f"{need}; this run is on the {device_type.upper()}"
    if capability < MIN_CAPABILITY:
        return f"{need}; {gpu_name or 'this GPU'} has {capability[0]}.{capability[1]}"
    if not hasattr(torch, "_scaled_mm") or not hasattr(torch, "float8_e4m3fn"):
        return f"torch {torch.__version__} has no FP8 matmul (torch._scaled_mm)"
    return None


@torch.no_grad()
def to_fp8(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(x scaled into dtype's range and cast, the inverse scale _scaled_mm multiplies back)."""
    fp8_max = torch.finfo(dtype).max
    # float64 for the division, as torchao and nanochat do: compiled and eager scales then agree.
    scale = (fp8_max / x.float().abs().max().double().clamp(min=1e-12)).float()
    # Saturate before the cast: an out-of-range value would wrap around, not clip.
    return (x.float() * scale).clamp(-fp8_max, fp8_max).to(dtype), scale.reciprocal()


def column_major(x: torch.Tensor) -> torch.Tensor:
    """The same matrix laid out column-major: _scaled_mm's second operand must be."""
    return x.t().contiguous().t()


@torch._dynamo.allow_in_graph  # one opaque node for torch.compile, as in nanochat
class Float8Matmul(torch.autograd.Function):
    """input_2d @ weight.T with all three matmuls in FP8."""

    @staticmethod
    def forward(ctx: Any, input_2d: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        input_fp8, input_inv = to_fp8(input_2d, torch.float8_e4m3fn)
        weight_fp8, weight_inv = to_fp8(weight, torch.float8_e4m3fn)
        ctx.save_for_backward(input_fp8, input_inv, weight_fp8, weight_inv)
        # weight_fp8.t() of a contiguous (N, K) is already column-major. Fast (lower precision)
        # accumulation in the forward only, as nanochat.
        return torch._scaled_mm(input_fp8, weight_fp8.t(), scale_a=input_inv, scale_b=weight_inv,
                                out_dtype=input_2d.dtype, use_fast_accum=True)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        input_fp8, input_inv, weight_fp8, weight_inv = ctx.saved_tensors
        grad_fp8, grad_inv = to_fp8(grad_output, torch.float8_e5m2)
        grad_input = torch._scaled_mm(grad_fp8, column_major(weight_fp8), scale_a=grad_inv,
                                      scale_b=weight_inv, out_dtype=grad_output.dtype, use_fast_accum=False)
        grad_weight = torch._scaled_mm(grad_fp8.t().contiguous(), column_major(input_fp8), scale_a=grad_inv,
                                       scale_b=input_inv, out_dtype=grad_output.dtype, use_fast_accum=False)
        return grad_input, grad_weight  # autograd casts grad_weight to the float32 master weight's dtype


class Float8Linear(nn.Linear):
    """nn.Linear (same weight, same state_dict name) whose matmuls run in FP8 when gradients are on."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return super().forward(x)
        x = x.to(torch.bfloat16)  # _scaled_mm's output dtype follows its input: bf16, as autocast's
        out = Float8Matmul.apply(x.reshape(-1, x.size(-1)), self.weight)
        return out.reshape(*x.shape[:-1], out.size(-1))

    def extra_repr(self) -> str:
        return super().extra_repr() + ", fp8=tensorwise"


def fp8_eligible(module: nn.Module) -> bool:
    return (type(module) is nn.Linear and module.bias is None
            and module.in_features % DIM_MULTIPLE == 0 and module.out_features % DIM_MULTIPLE == 0
            and min(module.in_features, module.out_features) >= MIN_DIM)


def convert_to_fp8(model: nn.Module) -> tuple[int, int]:
    """Swap every eligible nn.Linear for a Float8Linear sharing its weight; (converted, linears)."""
    converted = linears = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                linears += 1
                if fp8_eligible(child):
                    fp8 = Float8Linear(child.in_features, child.out_features, bias=False, device="meta")
                    fp8.weight = child.weight
                    setattr(parent, name, fp8)
                    converted += 1
    return converted, linears

