"""Dense -> MoE initialisation ("upcycling"): start a DeepSeekMoE model from a trained dense DeepSeek-V2-shaped model.

Why (the article dsv2 started from): MoE training is slow, so a dense checkpoint is a cheap head
start. Fine-grained experts are too narrow to hold a whole dense FFN each, and finding a semantic split of the
FFN's units is hard; the SHARED expert is what makes upcycling work well: it takes the dense FFN whole, keeping
the dense model's ability, while the routed experts take partitions of it and specialise from there.

Rules (layer by layer; the dense FFN is SwiGLU  y = W_d (act(W_g x) * W_u x)  with I hidden units):
- attention, embeddings, all norms, the final norm and the LM head are copied unchanged;
- a layer that stays dense in the MoE config copies its dense FFN (same intermediate_size required);
- a layer that is already MoE in the source and MoE in the target is copied unchanged (same expert shapes);
- a layer that becomes MoE (S = n_shared_experts * moe_intermediate_size, F = moe_intermediate_size, E experts):
  * shared expert: units 0..min(S, I)-1 are the dense units 0..min(S, I)-1 (the whole FFN when S >= I).
    S > I: the extra S - I units get fresh N(0, initializer_range) gate/up rows and ZERO down_proj columns, so
    they add nothing at init; random rather than copied rows, because a copy of a unit with a zero down column
    would receive exactly the copied unit's gate/up gradient direction forever after.
    S < I: only the leading S units fit; the others reach the model only through the routed experts (a warning
    says so when routed_scale is 0, since they are then lost at init).
  * routed expert j takes the F contiguous dense units  (start + j*F + t) mod I,  t = 0..F-1, with start = S when
    S < I (so the units the shared expert lacks are covered first) and 0 otherwise. When E*F > I the blocks
    wrap around and a unit lands in several experts (each then sees different tokens, so the copies diverge);
    when E*F < I the routed experts cover only the first E*F units (the shared expert holds them all anyway).
    F > I is refused: an expert cannot be cut from an FFN narrower than itself without duplicating units
    inside one expert, and such duplicates receive identical gradients forever.
    gate_proj/up_proj rows are copied; down_proj columns are copied times `routed_scale`.
  * gate (router): rows are random ORTHONORMAL directions (independent blocks of D when E > D) times
    `gate_scale`. Zero rows would make every affinity equal and top-K would send every token to the same K
    experts (ties resolve to the lowest indices: load max/mean = E/K). Random directions make each expert's
    logit an independent draw for isotropic inputs, so the choice is exchangeable between experts and the load
    is balanced in expectation; orthogonality keeps two experts from being near-duplicates that always win or
    lose together; a small scale (default 0.1, the logit std for unit-RMS inputs) keeps the affinities close
    to uniform, so the combine weights start nearly equal too. A trained dense model's hidden states have a
    common mean direction that tilts this balance; the balance losses correct it during training.

INVARIANT (tested exactly in tests/test_upcycle.py). Every MoE layer computes

    MoE(x) = Dense(x) + routed_scale * R(x)        whenever S >= I

where Dense is the source layer's FFN and R(x) = sum_{k in top-K} g_k(x) Expert_k(x) evaluated with the copied
(unscaled) down projections; the routing (affinities, choices, weights) does not depend on routed_scale. Hence
with routed_scale = 0 the upcycled model computes exactly the dense model's function (given equal non-FFN
config fields such as rope and rms_norm_eps), and each MoE layer's output is linear in routed_scale.

routed_scale defaults to 0.0: the upcycled checkpoint starts at exactly the dense model's loss (no loss spike,
and a start anyone can verify), like a zero-initialised residual branch (ReZero, LoRA's B). The routed experts
still learn from step 1: their down_proj gradient is nonzero (it is the experts' hidden activation times the
output gradient), and Adam's per-parameter normalisation lets the zero branch move at the full learning rate.
Pass routed_scale=1 to give every routed expert the dense FFN's own units verbatim (at the cost of a changed
function at init).
"""

from __future__ import annotations

import math
import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import from_pretrained, save_pretrained
from ..checkpoint.io import copy_tokenizer_of
from ..config import ModelConfig
from ..cpu import is_optimized, optimize
from ..model import DeepseekV2
from ..model.moe import MLP, MoE
from ..presets import get_config
from .data import TOKENIZER_FILE

DEFAULT_GATE_SCALE = 0.1

# Fields that decide the shape or the function of everything outside the FFNs: they must match the dense model.
ARCH_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "attention_type", "num_attention_heads",
               "num_key_value_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
               "v_head_dim", "tie_word_embeddings", "hidden_act")
_MLP_PARAM = re.compile(r"^model\.layers\.(\d+)\.mlp\.")


class UpcycleError(ValueError):
    """A dense model and MoE config that cannot be upcycled one into the other; the message says why."""


# ---------------------------------------------------------------------------------------------------------------
def check_compatible(dense: DeepseekV2, moe_config: ModelConfig) -> None:
    """Raise UpcycleError naming every field or layer that prevents upcycling `dense` into `moe_config`."""
    dc, mc = dense.config, moe_config
    problems = [f"{f}: dense {getattr(dc, f)!r} vs moe {getattr(mc, f)!r}" for f in ARCH_FIELDS
                if getattr(dc, f) != getattr(mc, f)]
    if problems:
        raise UpcycleError("the MoE config must keep the dense model's architecture outside the FFNs; "
                           "mismatched: " + "; ".join(problems))
    moe_layers = [i for i in range(mc.num_hidden_layers) if mc.is_moe_layer(i)]
    if not moe_layers:
        raise UpcycleError(f"the MoE config has no MoE layer (n_routed_experts={mc.n_routed_experts!r}, "
                           f"first_k_dense_replace={mc.first_k_dense_replace}, moe_layer_freq={mc.moe_layer_freq}, "
                           f"num_hidden_layers={mc.num_hidden_layers}): nothing to upcycle into")
    if not mc.n_shared_experts:
        raise UpcycleError("the MoE config has no shared experts (n_shared_experts="
                           f"{mc.n_shared_experts!r}); upcycling puts the dense FFN into the shared expert")
    for i in range(mc.num_hidden_layers):
        src = dense.model.layers[i].mlp
        if isinstance(src, MoE):
            if not mc.is_moe_layer(i):
                raise UpcycleError(f"layer {i} is MoE in the source model but dense in the MoE config; an MoE "
                                   "layer cannot be turned back into a dense FFN")
            with torch.device("meta"):
                expected = _moe_shapes(MoE(mc))
            if _moe_shapes(src) != expected:
                raise UpcycleError(f"layer {i} is already MoE in the source with expert shapes {_moe_shapes(src)}, "
                                   "which differ from the MoE config's; it cannot be copied")
            continue
        I = src.gate_proj.weight.shape[0]
        if mc.is_moe_layer(i) and mc.moe_intermediate_size > I:
            raise UpcycleError(f"layer {i}: moe_intermediate_size ({mc.moe_intermediate_size}) exceeds the dense "
                               f"FFN width ({I}); a routed expert is cut from the dense units and must be narrower")
        if not mc.is_moe_layer(i) and mc.intermediate_size != I:
            raise UpcycleError(f"layer {i} stays dense but the MoE config's intermediate_size "
                               f"({mc.intermediate_size}) differs from the dense FFN width ({I})")


def _moe_shapes(m: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def routed_unit_indices(n_experts: int, expert_width: int, dense_width: int, shared_width: int) -> torch.Tensor:
    """[E, F] dense unit index of each routed expert unit: contiguous blocks from `start`, wrapping mod I."""
    start = shared_width if shared_width < dense_width else 0
    flat = start + torch.arange(n_experts * expert_width)
    return (flat % dense_width).view(n_experts, expert_width)


def orthonormal_rows(n: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """[n, dim] rows of unit norm, orthogonal within each block of `dim` rows (blocks independent), fp32 CPU."""
    blocks = []
    for lo in range(0, n, dim):
        k = min(dim, n - lo)
        q, r = torch.linalg.qr(torch.randn(dim, k, generator=generator))
        blocks.append((q * torch.sign(torch.diagonal(r))).T)  # sign fix: Haar-distributed, not QR-biased
    return torch.cat(blocks)


# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def upcycle(dense: DeepseekV2, moe_config: ModelConfig, seed: int = 0, *, routed_scale: float = 0.0,
            gate_scale: float = DEFAULT_GATE_SCALE) -> DeepseekV2:
    """A new DeepseekV2 with `moe_config`, initialised from `dense` by the rules in this module's docstring.

    seed: the generator for the gate rows and for fresh shared units (S > I); same seed, same model.
    routed_scale: multiplies the routed experts' copied down projections (0: exactly the dense function).
    gate_scale: norm of each gate row (the logit std for unit-RMS isotropic inputs).
    The dense model is not modified; the result has its dtype, device and train/eval mode, and the CPU fast
    paths if the dense model has them (dsv2.cpu.optimize).
    """
    check_compatible(dense, moe_config)
    if not gate_scale > 0:
        raise UpcycleError(f"gate_scale must be > 0 (zero gate rows route every token to the same experts), "
                           f"got {gate_scale!r}")
    ref = dense.model.embed_tokens.weight
    with torch.device("meta"):
        model = DeepseekV2(moe_config)
    model = model.to(ref.dtype).to_empty(device=ref.device)
    if moe_config.tie_word_embeddings:  # to_empty gives each module a new Parameter, which unties the two
        model.lm_head.weight = model.model.embed_tokens.weight
    gen = torch.Generator().manual_seed(seed)
    src_params = dict(dense.named_parameters())
    filled: set[str] = set()

    for name, p in model.named_parameters():  # everything outside the FFNs: copied unchanged
        if _MLP_PARAM.match(name) is None:
            p.copy_(src_params[name])
            filled.add(name)

    mc = moe_config
    for i, layer in enumerate(model.model.layers):
        src, dst, prefix = dense.model.layers[i].mlp, layer.mlp, f"model.layers.{i}.mlp."
        if isinstance(src, MoE) or isinstance(dst, MLP):  # same module type on both sides: a plain copy
            dst.load_state_dict(src.state_dict())
        else:
            _init_moe_from_dense(dst, src, mc, gen, routed_scale, gate_scale, layer_idx=i)
        filled.update(prefix + n for n, _ in dst.named_parameters())

    missing = [n for n, _ in model.named_parameters() if n not in filled]
    if missing:  # a parameter this module does not know about would otherwise hold uninitialised memory
        raise RuntimeError(f"upcycle left parameters uninitialised (model changed?): {missing}")
    model.train(dense.training)
    return optimize(model) if is_optimized(dense) else model


def _init_moe_from_dense(moe: MoE, dense_ffn: MLP, c: ModelConfig, gen: torch.Generator, routed_scale: float,
                         gate_scale: float, layer_idx: int) -> None:
    W_g, W_u, W_d = dense_ffn.gate_proj.weight, dense_ffn.up_proj.weight, dense_ffn.down_proj.weight
    I, D = W_g.shape
    E, F = c.num_routed, c.moe_intermediate_size
    S = (c.n_shared_experts or 0) * F

    # shared expert: the dense FFN whole (or its leading units); extra units are fresh rows that output zero
    sh = moe.shared_experts
    n = min(S, I)
    sh.gate_proj.weight[:n] = W_g[:n]
    sh.up_proj.weight[:n] = W_u[:n]
    sh.down_proj.weight[:, :n] = W_d[:, :n]
    if S > I:
        std = c.initializer_range
        sh.gate_proj.weight[I:] = (torch.randn(S - I, D, generator=gen) * std).to(W_g.device)
        sh.up_proj.weight[I:] = (torch.randn(S - I, D, generator=gen) * std).to(W_g.device)
        sh.down_proj.weight[:, I:] = 0.0
    elif S < I and routed_scale == 0:
        warnings.warn(f"layer {layer_idx}: the shared expert ({S} units) is narrower than the dense FFN ({I}) and "
                      "routed_scale=0, so dense units beyond the shared width contribute nothing at init",
                      stacklevel=4)  # the caller of upcycle (past the no_grad wrapper)

    # routed experts: partitions of the dense units, down projections scaled by routed_scale
    idx_EF = routed_unit_indices(E, F, I, S).to(W_g.device)
    ex = moe.experts
    ex.gate_up_proj[:, :F] = W_g[idx_EF]  # [E, F, D]
    ex.gate_up_proj[:, F:] = W_u[idx_EF]
    ex.down_proj.copy_(W_d[:, idx_EF].permute(1, 0, 2) * routed_scale)  # [D, E, F] -> [E, D, F]

    # gate: random orthonormal rows, small: balanced routing in expectation, near-uniform affinities
    moe.gate.weight.copy_(orthonormal_rows(E, D, gen) * gate_scale)  # copy_ casts and moves


# ---------------------------------------------------------------------------------------------------------------
def upcycle_checkpoint(dense_dir: str | os.PathLike, moe_config: ModelConfig | str | os.PathLike,
                       out_dir: str | os.PathLike, *, seed: int = 0, routed_scale: float = 0.0,
                       gate_scale: float = DEFAULT_GATE_SCALE) -> DeepseekV2:
    """Load the dense checkpoint, upcycle it, save the MoE checkpoint (same dtype) and copy tokenizer.json.

    moe_config: a ModelConfig, a preset name or a config.json / checkpoint directory (see get_config).
    Returns the upcycled model.
    """
    dense_dir, out_dir = Path(dense_dir), Path(out_dir)
    if out_dir.exists() and dense_dir.exists() and out_dir.resolve() == dense_dir.resolve():
        raise UpcycleError(f"out_dir {out_dir} is the dense checkpoint directory; write the MoE model elsewhere")
    if out_dir.exists() and not out_dir.is_dir():
        raise UpcycleError(f"out_dir {out_dir} is a file, not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):  # e.g. a training checkpoint, whose optimizer state would stay
        raise UpcycleError(f"out_dir {out_dir} is not empty; write the MoE checkpoint into a new folder")
    if not math.isfinite(routed_scale):
        raise UpcycleError(f"routed_scale must be a finite number, got {routed_scale}")
    if not isinstance(moe_config, ModelConfig):
        moe_config = get_config(moe_config)
    dense = from_pretrained(dense_dir)
    model = upcycle(dense, moe_config, seed, routed_scale=routed_scale, gate_scale=gate_scale)
    del dense
    save_pretrained(model, out_dir)
    if (dense_dir / TOKENIZER_FILE).is_file():
        copy_tokenizer_of(dense_dir, out_dir, model.config)
    return model
