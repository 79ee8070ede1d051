"""Tests for trainer.hardware: the peak-FLOPS table matches GPU names as torch reports them."""

import pytest

from trainer.hardware import peak_flops


@pytest.mark.parametrize(
    "name, flops",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA B200", 2.25e15),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA GeForce RTX 4090", 165e12),
        ("cpu", None),
        ("Some Future Accelerator", None),
    ],
)
def test_peak_flops(name: str, flops: float | None):
    assert peak_flops(name) == flops
