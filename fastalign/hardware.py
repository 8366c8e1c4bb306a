"""The GPUs fastalign knows: memory, dense bf16 peak and link speed, read by the trainer's MFU and
by the planner (docs/design.md)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    memory_gib: float
    tflops: float  # dense bf16 tensor-core peak, without sparsity (vendor data sheets)
    link_gb_s: float  # assumed NCCL bus bandwidth between GPUs of one node (GB/s)
    reported_as: str  # a part of the name CUDA reports for the card (torch.cuda.get_device_name)


# Link figures are assumptions: what NCCL typically reaches over NVLink (A100: NVLink3, H100/H200:
# NVLink4) or over PCIe (cards without NVLink), not measured here. Order matters for
# `gpu_for_device_name`: a card whose reported name contains another's part comes first
# ("H100 PCIe" before "H100", "L40S" before "L4").
GPUS = {
    "H100-PCIe": Gpu(80, 756.0, 20.0, "H100 PCIe"), "H100-NVL": Gpu(94, 835.0, 20.0, "H100 NVL"),
    "H200": Gpu(141, 989.0, 350.0, "H200"), "H100": Gpu(80, 989.0, 350.0, "H100"),
    "A100-40GB": Gpu(40, 312.0, 200.0, "A100"), "A100-80GB": Gpu(80, 312.0, 200.0, "A100"),
    "L40S": Gpu(48, 362.0, 20.0, "L40S"), "L4": Gpu(24, 121.0, 20.0, "L4"), "A10G": Gpu(24, 70.0, 20.0, "A10G"),
    "RTX4090": Gpu(24, 165.2, 20.0, "RTX 4090"),
}


def gpu_for_device_name(device_name: str) -> Gpu | None:
    """The first card of GPUS whose reported name is part of `device_name` (case-insensitive);
    None when unknown. Both A100 sizes share their peak, so either match gives the same MFU."""
    name = device_name.lower()
    return next((gpu for gpu in GPUS.values() if gpu.reported_as.lower() in name), None)
