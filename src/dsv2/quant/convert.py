"""Give a model quantized modules (recipe.py decides which), from outside the model.

quantize_model(model, recipe) swaps a float model's linears and routed experts for quantized ones, quantizing their
weights (a model trained or loaded here, quantized in memory). On the meta device it builds the skeleton that
checkpoint loading fills tensor by tensor (checkpoint/io.py): quantizing each float tensor as it is read, or
copying stored compressed-tensors ones, so that the float model never exists in memory.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import nn

from ..cpu import ops
from ..errors import ConfigError
from ..model.experts import ACTIVATIONS, RoutedExperts
from .formats import quantize_blocks
from .modules import QuantLinear, QuantRoutedExperts
from .recipe import Recipe


def recipe_of(config) -> Recipe | None:
    """The recipe a config's quantization_config records, or None (a float model)."""
    qc = config.extra.get("quantization_config")
    return None if qc is None else Recipe.from_config(qc)


def with_recipe(config, recipe: Recipe):
    """A copy of the config that records the recipe (written to config.json by save_pretrained)."""
    return dataclasses.replace(config, extra={**config.extra, "quantization_config": recipe.to_config()})


@torch.no_grad()
def quantize_model(model: nn.Module, recipe: Recipe, dtype: torch.dtype | None = None) -> nn.Module:
    """Swap in quantized modules where the recipe says, in place; returns the model. A model on the meta device gets
    empty quantized buffers (to be loaded); otherwise the float weights are quantized and released one by one.
    dtype: the dtype dequantized weights are given in (default: the model's)."""
    if recipe_of(model.config) is not None:
        raise ConfigError("the model is already quantized")
    if model.config.attention_type != "mla":
        raise ConfigError("quantization covers MLA models (the MHA/GQA/MQA baselines are not quantized)")
    dtype = dtype or model.model.embed_tokens.weight.dtype
    ops.load_kernels()  # the quantizer's and the quantized modules' kernels
    if model.config.tie_word_embeddings and "lm_head" in recipe.schemes:
        raise ConfigError("lm_head is tied to the embeddings, which stay in float: it cannot be quantized")
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            new = _quantized(child, name, recipe, dtype)
            if new is not None:
                setattr(parent, child_name, new)
    model.config = with_recipe(model.config, recipe)
    return model


def _quantized(module: nn.Module, name: str, recipe: Recipe, dtype: torch.dtype) -> nn.Module | None:
    meta = any(t.is_meta for t in module.parameters())
    if isinstance(module, nn.Linear):
        scheme = recipe.scheme_for(name)
        if scheme is None:
            return None
        if module.bias is not None:
            raise ConfigError(f"{name} has a bias; quantized linears have none")
        with _on_meta(meta):
            q = QuantLinear(module.in_features, module.out_features, scheme, dtype, name)
        if meta:
            return q
        q.weight_q = quantize_blocks(module.weight, scheme, name)
        return q
    if isinstance(module, RoutedExperts) and not isinstance(module, QuantRoutedExperts):
        scheme = recipe.scheme_for(f"{name}.0.gate_proj")
        if scheme is None:
            return None
        act = next(k for k, f in ACTIVATIONS.items() if f is module.act)
        with _on_meta(meta):
            q = QuantRoutedExperts(module.n_experts, module.hidden, module.inter, scheme, dtype, act, name)
        if meta:
            return q
        for attr in ("gate_up_proj", "down_proj"):
            w = getattr(module, attr)
            rows = [quantize_blocks(w[e], scheme, f"{name}.{e}.{attr}") for e in range(w.shape[0])]
            setattr(q, f"{attr}_q", torch.stack(rows).to(w.device))
        return q
    return None


def _on_meta(meta: bool):
    return torch.device("meta") if meta else contextlib.nullcontext()
