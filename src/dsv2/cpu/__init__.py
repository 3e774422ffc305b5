"""CPU fast paths, switched on in one place: `dsv2.cpu.optimize(model)`.

The model (dsv2.model) is plain PyTorch. optimize() gives its modules the CPU classes of modules.py (subclasses
with the same parameters, so state dicts, checkpoints and optimizers see no difference), which run the C++
kernels registered as torch.library custom ops (ops.py, kernels/, built at first use by build.py) where they
apply and the plain method everywhere else: under autograd, on other devices, for shapes the kernels do not take.
from_pretrained, the engine and the trainer call it on the models they own; for a model built by hand it is explicit
(generate never changes a caller's modules). Decode steps run fused, without any class change: decode_step.py.
"""

from __future__ import annotations

from torch import nn

from ..model.moe import LocalDispatcher, MoE
from . import ops
from .modules import SWAPS, CpuLocalDispatcher


def optimize(model: nn.Module) -> nn.Module:
    """Swap in the CPU classes, in place (idempotent); returns the model. Outputs stay those of the plain model
    (up to float summation order; tests/test_cpu.py). For a model on the CPU this also builds (the first time on a
    machine, about a minute) or loads the C++ kernels."""
    if any(p.device.type == "cpu" for p in model.parameters()):
        ops.load_kernels()
    for module in model.modules():
        cls = SWAPS.get(type(module))
        if cls is not None:
            module.__class__ = cls
        if isinstance(module, MoE) and type(module.dispatcher) is LocalDispatcher:
            module.dispatcher.__class__ = CpuLocalDispatcher
    return model


def is_optimized(model: nn.Module) -> bool:
    """Whether optimize() has given the model its CPU classes."""
    cpu_classes = tuple(SWAPS.values())
    return any(isinstance(m, cpu_classes) for m in model.modules())


__all__ = ["is_optimized", "optimize"]
