"""The optimizer and its schedule (DeepSeek-V2 Sec. 3.2.1): AdamW (0.9, 0.95) with weight decay 0.1 on matrices
only, a linear warm-up, then the LR multiplied by 0.316 at 60% and 90% of the run (cosine as an option); and the
autocast dtype a run computes in.
"""

from __future__ import annotations

import math

import torch

from ..cpu.ops import native_bf16
from ..distributed.fsdp import by_mesh
from .config import TrainConfig


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warm-up, then V2's step decay (or cosine). A pure function of the step: nothing to checkpoint."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    if tc.schedule == "cosine":
        progress = (step - tc.warmup_steps) / max(1, tc.max_steps - tc.warmup_steps)
        floor = tc.lr * tc.min_lr_ratio
        return floor + (tc.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return tc.lr * tc.decay_factor ** sum(step >= frac * tc.max_steps for frac in tc.decay_at)


def build_optimizer(model: torch.nn.Module, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (and stacked expert matrices) only, never on norms.

    With parameters on several DeviceMeshes (FSDP2 with expert parallelism: the experts on another mesh than the
    rest), one parameter at a time: DTensor's foreach kernels, AdamW's default on CUDA, refuse lists that mix
    meshes, and a group per mesh would make the optimizer's checkpoint depend on the layout that wrote it."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    foreach = False if len(by_mesh(decay + no_decay)) > 1 else None
    return torch.optim.AdamW(groups, lr=tc.lr, betas=tc.betas, eps=1e-8, foreach=foreach)


def autocast_dtype(tc: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast, or None for fp32: dtype=auto takes bf16 on CUDA and on CPUs with native bf16 matmul only (on
    AVX2-only CPUs bf16 is emulated and several times slower than fp32)."""
    if tc.dtype == "fp32":
        return None
    if tc.dtype == "bf16" or device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if native_bf16() else None
