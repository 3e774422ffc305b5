"""LoRA runs (`dsv2 train --init-from CKPT --lora`): the model is init_from's, frozen, with fresh adapters
(dsv2/lora/); a checkpoint holds the adapters in PEFT's format and their optimizer state, never the base weights.

    RUN_DIR/checkpoints/step_N/   adapter_config.json, adapter_model.safetensors (PEFT's adapter folder: PEFT, vLLM
                                  and `dsv2 serve --lora-modules` load it), tokenizer files, optimizer.safetensors,
                                  trainer_state.json (as a full run's: state.py)

The frozen base is held in the dtype the run computes in (bf16 under bf16 autocast: half the memory; the
adapters, their gradients and optimizer state stay fp32).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..checkpoint import from_pretrained
from ..lora import adapter_of, add_lora, write_adapter
from ..lora.peft import CONFIG_FILE
from .config import TrainConfig


def lora_model(tc: TrainConfig, device: torch.device, amp: torch.dtype | None) -> nn.Module:
    """init_from with fresh adapters (seeded by the run's seed; a resumed run then puts its own in: state.py)."""
    model = from_pretrained(tc.init_from, dtype=amp or torch.float32, device=device)
    add_lora(model, tc.lora_targets, tc.lora_r, tc.lora_alpha, tc.lora_dropout, seed=tc.seed)
    for p in model.parameters():  # the adapters in fp32 whatever the base's dtype
        if p.requires_grad:
            p.data = p.data.float()
    return model.train()


def is_lora_checkpoint(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file()


def save_lora(model: nn.Module, path: Path, tc: TrainConfig, params: dict[str, torch.Tensor]) -> None:
    """The adapter folder of a LoRA run's checkpoint (params: the adapters, gathered from expert-parallel ranks)."""
    alpha = tc.lora_alpha if tc.lora_alpha is not None else 2.0 * tc.lora_r
    write_adapter(path, adapter_of(model, 0, alpha=alpha, dropout=tc.lora_dropout, base=tc.init_from, params=params))
