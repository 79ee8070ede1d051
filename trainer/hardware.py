"""What the machine offers the model: FlashAttention-3 if installed, bf16 peak FLOPS by GPU name (for MFU)."""

import torch

try:  # FlashAttention-3 (the Hopper build's module name); SDPA with a window mask serves everywhere else.
    from flash_attn_interface import flash_attn_func as fa3_attention
except (ImportError, OSError):
    fa3_attention = None


def fa3_applies(x: torch.Tensor) -> bool:
    """FlashAttention-3 runs training's attention when installed, on CUDA, under bf16 autocast."""
    return fa3_attention is not None and x.is_cuda and torch.is_autocast_enabled("cuda")


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
