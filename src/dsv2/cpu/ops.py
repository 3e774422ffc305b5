"""dsv2's CPU kernels as torch.library custom ops (`torch.ops.dsv2.*`).

Each op is defined here with its schema, a reference implementation in plain PyTorch (any device; what runs
where the kernels are not built) and a fake implementation (shapes and dtypes only), so the ops work under
torch.compile, FlopCounterMode and meta/fake tensors. The C++ kernels (kernels/, compiled at first use by
build.py) register themselves as the ops' CPU implementation when they load.

    rows_dot(x, w, ends=None)   y[n] = w[g] x[n] for the rows n of group g (x W^T: linears, routed experts, W_UV)
    rows_combine(x, w)          y[g, m] = sum_n x[g, n, m] w[g, n] (x W: W_UK absorbed into the query)
    rms_norm(x, w, eps)         RMSNorm of a few rows, as dsv2.model.norm.RMSNorm
    mla_decode(q, kv, mask, C)  softmax(q kv^T) kv[..., :C] for one new token per sequence (flash-decoding)

They are not differentiable: dsv2.cpu's modules call them only where no autograd graph is recorded.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import build

_LIB = torch.library.Library("dsv2", "DEF")
_LIB.define("rows_dot(Tensor x, Tensor w, Tensor? ends=None) -> Tensor")
_LIB.define("rows_combine(Tensor x, Tensor w) -> Tensor")
_LIB.define("rms_norm(Tensor x, Tensor w, float eps) -> Tensor")
_LIB.define("mla_decode(Tensor q, Tensor kv, Tensor mask, int C) -> Tensor")


def _rows_dot(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor | None = None) -> torch.Tensor:
    if ends is None:  # x [..., K], w [R, K]
        return F.linear(x.float(), w.float()).to(x.dtype)
    bounds = [0, *ends.tolist()]  # x [N, K], w [G, R, K], ends [G] cumulative
    parts = [x[bounds[g]:bounds[g + 1]].float() @ w[g].float().T for g in range(w.shape[0])]
    return torch.cat(parts).to(x.dtype) if parts else x.new_empty(0, w.shape[1])


def _rows_combine(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # x [G, N, M], w [G, N, C] -> [G, M, C]
    return torch.bmm(x.float().transpose(1, 2), w.float()).to(x.dtype)


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)


def _mla_decode(q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor, C: int) -> torch.Tensor:
    # q [B, Q, X] fp32 (Q query rows per sequence); kv [B, T, X]; mask [B, >= T] bool (True = attend) or empty
    # -> [B, Q, C] fp32
    kv = kv.float()
    scores = torch.bmm(q, kv.transpose(1, 2))
    if mask.numel():
        scores = scores.masked_fill(~mask[:, None, : kv.shape[1]], float("-inf"))
    return torch.bmm(scores.softmax(-1).nan_to_num(0.0), kv[..., :C])


for _name, _ref in (("rows_dot", _rows_dot), ("rows_combine", _rows_combine), ("rms_norm", _rms_norm),
                    ("mla_decode", _mla_decode)):
    _LIB.impl(_name, _ref, "CompositeExplicitAutograd")


@torch.library.register_fake("dsv2::rows_dot")
def _(x, w, ends=None):
    return x.new_empty((*x.shape[:-1], w.shape[-2]))


@torch.library.register_fake("dsv2::rows_combine")
def _(x, w):
    return x.new_empty((x.shape[0], x.shape[2], w.shape[2]))


@torch.library.register_fake("dsv2::rms_norm")
def _(x, w, eps):
    return torch.empty_like(x)


@torch.library.register_fake("dsv2::mla_decode")
def _(q, kv, mask, C):
    return q.new_empty((q.shape[0], q.shape[1], C))


rows_dot = torch.ops.dsv2.rows_dot.default
rows_combine = torch.ops.dsv2.rows_combine.default
rms_norm = torch.ops.dsv2.rms_norm.default
mla_decode = torch.ops.dsv2.mla_decode.default


@functools.cache
def kernels_loaded() -> bool:
    """Whether the C++ kernels serve the ops on the CPU (built or loaded now, once per process)."""
    return build.load() is not None


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX). Elsewhere bf16 GEMMs are emulated and run
    several times slower than fp32 (dsv2.cpu computes many-row ones in fp32; training's dtype=auto picks fp32)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # unknown: leave dtypes alone
        return True
