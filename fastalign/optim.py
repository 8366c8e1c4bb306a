"""AdamW and the learning-rate schedules of the trainer (docs/design.md)."""

from __future__ import annotations

import math

import torch
from torch import nn

from fastalign.config import TrainConfig


def lr_lambda_for(kind: str, warmup_steps: int, total_steps: int):
    """The multiplier of the peak LR at optimizer step `step` (0-based), as HF's schedules."""

    def factor(step: int) -> float:
        if kind == "constant":
            return 1.0
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        if kind == "constant_with_warmup":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))  # cosine

    return factor


def warmup_steps_for(config: TrainConfig, total_steps: int) -> int:
    return config.warmup_steps if config.warmup_steps > 0 else math.ceil(config.warmup_ratio * total_steps)



def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (all, or LoRA's adapters); like HF, no weight decay on
    biases and norm weights (the 1-D parameters)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel (one pass over each parameter's p, grad, m, v) on CUDA and on CPU (torch
    # >= 2.4; plain tensors and FSDP2's DTensor shards alike, gloo included): on CPU several times
    # faster than the multi-tensor path, with the same parameters to rounding (benchmarks/RESULTS.md,
    # "Where the time goes").
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                             eps=config.adam_epsilon, fused=True)
