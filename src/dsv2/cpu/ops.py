"""dsv2's CPU kernels as torch.library custom ops (`torch.ops.dsv2.*`).

Each op is defined here with its schema, a reference implementation in plain PyTorch (any device; what the tests
hold the kernels to, and what runs on the CPU where they are not built), a fake implementation (shapes and dtypes
only) and a FLOP formula, so the ops work under torch.compile, with meta/fake tensors and in FlopCounterMode. The
C++ kernels (kernels/, compiled by build.py) register themselves as the ops' CPU implementation when they load:
load_kernels() does that once per process (dsv2.cpu.optimize calls it) and sets `available`. dsv2.cpu's modules
call the ops only where the kernels are available; elsewhere they run the plain model's paths.

    rows_dot(x, w, ends=None)   y[n] = w[g] x[n] for the rows n of group g (x W^T: linears, routed experts, W_UV)
    rows_combine(x, w, cols=0)  y[g, m] = sum_n x[g, n, m] w[g, n] (x W: W_UK absorbed into the query)
    rms_norm(x, w, eps)         RMSNorm of a few rows, as dsv2.model.norm.RMSNorm
    mla_decode(q, kv, mask, C)  softmax(q kv^T) kv[..., :C] for one new token per sequence (flash-decoding)
    mla_decode_paged(q, blocks, table, lens, C)   the same over a paged cache, read through its block table

    dequantize(w, cols, dtype)  a quantized weight (below) as a dense one: the many-row (prefill) GEMMs' input
    quantize_rows(w, bits, group, clips)   a float weight as quantized rows (dsv2.quant.formats.quantize)

rows_dot's and rows_combine's w may be quantized (dsv2.quant): uint8 blocked int8/int4 rows, each K values (rows_dot:
x's width; rows_combine: `cols`) in blocks of [bf16 scale | values], streamed in place (kernels/quantized.h).

Two more ops are a decode step's whole blocks (kernels/decode_step.cpp, run by decode_step.py):

    attention_decode(x, ...)    x + MLA(RMSNorm(x)) for one new token per sequence, its cache row written first
    ffn_decode(x, ...)          x + MoE(RMSNorm(x)) (or the dense MLP) for a few tokens

Their reference is the plain model itself (decode_step.py runs model.forward wherever they do not apply; tests hold
the two equal), so they have a fake implementation and the C++ one only.

They are not differentiable: dsv2.cpu's modules call them only where no autograd graph is recorded.
"""

from __future__ import annotations

import functools
import math
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

from . import build


def _dense(w: torch.Tensor, K: int) -> torch.Tensor:
    """w as a float matrix: a quantized weight (uint8 blocked int8/int4 rows of K values) dequantized to fp32."""
    if w.dtype != torch.uint8:
        return w
    from ..quant.formats import dequantize_blocks

    return dequantize_blocks(w, K)


def _dequantize(w: torch.Tensor, cols: int, dtype: torch.dtype) -> torch.Tensor:
    from ..quant.formats import dequantize_blocks

    return dequantize_blocks(w, cols, dtype)


def _quantize_rows(w: torch.Tensor, bits: int, group: int, clips: list[float]) -> torch.Tensor:
    from ..quant.formats import Scheme, quantize_reference, to_blocks

    return to_blocks(*quantize_reference(w, Scheme(bits, group), clips=tuple(clips)), bits)


def _rows_dot(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor | None = None) -> torch.Tensor:
    w = _dense(w, x.shape[-1])
    if ends is None:  # x [..., K], w [R, K]
        return F.linear(x.float(), w.float()).to(x.dtype)
    bounds = [0, *ends.tolist()]  # x [N, K], w [G, R, K], ends [G] cumulative
    parts = [x[bounds[g]:bounds[g + 1]].float() @ w[g].float().T for g in range(w.shape[0])]
    return torch.cat(parts).to(x.dtype) if parts else x.new_empty(0, w.shape[1])


def _rows_combine(x: torch.Tensor, w: torch.Tensor, cols: int = 0) -> torch.Tensor:
    # x [G, N, M], w [G, N, C] (or quantized: C = cols values per row) -> [G, M, C]
    return torch.bmm(x.float().transpose(1, 2), _dense(w, cols).float()).to(x.dtype)


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype != w.dtype:
        raise RuntimeError("rms_norm: x and w must both be fp32 or both bf16")
    return (w * F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)).contiguous()


def _mla_decode(q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor, C: int) -> torch.Tensor:
    # q [B, Q, X] fp32 (Q query rows per sequence); kv [B, T, X]; mask [B, >= T] bool (True = attend) or empty
    # -> [B, Q, C] fp32
    kv = kv.float()
    scores = torch.bmm(q, kv.transpose(1, 2))
    if mask.numel():
        scores = scores.masked_fill(~mask[:, None, : kv.shape[1]], float("-inf"))
    return torch.bmm(scores.softmax(-1).nan_to_num(0.0), kv[..., :C])


def _mla_decode_paged(q: torch.Tensor, blocks: torch.Tensor, table: torch.Tensor, lens: torch.Tensor,
                      C: int) -> torch.Tensor:
    # sequence b's rows: the first lens[b] rows of blocks[table[b, 0]], blocks[table[b, 1]], ... (a gathered copy)
    B, M = table.shape
    kv = blocks[table].reshape(B, M * blocks.shape[1], blocks.shape[2])
    mask = torch.arange(kv.shape[1], device=kv.device) < lens[:, None]
    return _mla_decode(q, kv, mask, C)


def _define() -> torch.library.Library:
    lib = torch.library.Library("dsv2", "DEF")
    lib.define("rows_dot(Tensor x, Tensor w, Tensor? ends=None) -> Tensor")
    lib.define("rows_combine(Tensor x, Tensor w, int cols=0) -> Tensor")
    lib.define("rms_norm(Tensor x, Tensor w, float eps) -> Tensor")
    lib.define("dequantize(Tensor w, int cols, ScalarType dtype) -> Tensor")
    lib.define("quantize_rows(Tensor w, int bits, int group, float[] clips) -> Tensor")
    lib.define("mla_decode(Tensor q, Tensor kv, Tensor mask, int C) -> Tensor")
    lib.define("mla_decode_paged(Tensor q, Tensor blocks, Tensor table, Tensor lens, int C) -> Tensor")
    lib.define("attention_decode(Tensor x, Tensor norm, Tensor? q_a, Tensor? q_a_norm, Tensor q, Tensor kv_a, "
               "Tensor kv_a_norm, Tensor kv_b, Tensor o, Tensor cos, Tensor sin, Tensor(a!) rows, Tensor slots, "
               "Tensor kv, Tensor mask, Tensor? table, Tensor? lens, int H, int N, int R, int V, float eps, "
               "float q_eps, float kv_eps, float scale) -> Tensor")
    lib.define("ffn_decode(Tensor x, Tensor norm, float eps, Tensor? gate, Tensor? gate_up, Tensor? down, int top_k, "
               "int n_group, int topk_group, bool norm_topk_prob, float scaling, Tensor? shared_gate, "
               "Tensor? shared_up, Tensor? shared_down) -> Tensor")
    for name, reference in (("rows_dot", _rows_dot), ("rows_combine", _rows_combine), ("rms_norm", _rms_norm),
                            ("dequantize", _dequantize), ("quantize_rows", _quantize_rows),
                            ("mla_decode", _mla_decode), ("mla_decode_paged", _mla_decode_paged)):
        lib.impl(name, reference, "CompositeExplicitAutograd")
    fakes = {"rows_dot": lambda x, w, ends=None: x.new_empty((*x.shape[:-1], w.shape[-2])),
             "rows_combine": lambda x, w, cols=0: x.new_empty((x.shape[0], x.shape[2], cols or w.shape[2])),
             "rms_norm": lambda x, w, eps: x.new_empty(x.shape),  # the kernel returns a contiguous tensor
             "dequantize": lambda w, cols, dtype: w.new_empty((*w.shape[:-1], cols), dtype=dtype),
             "quantize_rows": lambda w, bits, group, clips: w.new_empty(
                 (*w.shape[:-1], w.shape[-1] // (group or w.shape[-1]) * (2 + (group or w.shape[-1]) * bits // 8)),
                 dtype=torch.uint8),
             "mla_decode": lambda q, kv, mask, C: q.new_empty((q.shape[0], q.shape[1], C)),
             "mla_decode_paged": lambda q, blocks, table, lens, C: q.new_empty((q.shape[0], q.shape[1], C)),
             "attention_decode": lambda x, *args: x.new_empty(x.shape),
             "ffn_decode": lambda x, *args: x.new_empty(x.shape)}
    for name, fake in fakes.items():
        torch.library.register_fake(f"dsv2::{name}", fake, lib=lib)
    _register_flops()
    return lib


def _register_flops() -> None:
    """FlopCounterMode formulas: 2 x multiply-adds, as its own for mm and bmm (rms_norm counts none, as aten's)."""
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.dsv2.rows_dot)
    def _(x_shape, w_shape, ends_shape=None, *args, out_shape=None, **kwargs) -> int:
        return 2 * math.prod(x_shape) * w_shape[-2]

    @register_flop_formula(torch.ops.dsv2.rows_combine)
    def _(x_shape, w_shape, cols=0, *args, out_shape=None, **kwargs) -> int:
        return 2 * math.prod(x_shape) * (cols or w_shape[2])

    @register_flop_formula(torch.ops.dsv2.mla_decode)
    def _(q_shape, kv_shape, mask_shape, C, *args, out_shape=None, **kwargs) -> int:
        B, Q, X = q_shape
        return 2 * B * Q * kv_shape[1] * (X + C)

    @register_flop_formula(torch.ops.dsv2.mla_decode_paged)
    def _(q_shape, blocks_shape, table_shape, lens_shape, C, *args, out_shape=None, **kwargs) -> int:
        B, Q, X = q_shape  # an upper bound: every row of every listed block
        return 2 * B * Q * table_shape[1] * blocks_shape[1] * (X + C)

    @register_flop_formula(torch.ops.mkldnn._linear_pointwise)
    def _(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:  # modules.py's few-row fp32 linears
        return 2 * math.prod(x_shape) * w_shape[0]


# Once per process: a reload of this module keeps the first definitions (torch allows one per namespace).
_LIB = globals().get("_LIB") or _define()

rows_dot = torch.ops.dsv2.rows_dot.default
rows_combine = torch.ops.dsv2.rows_combine.default
rms_norm = torch.ops.dsv2.rms_norm.default
dequantize = torch.ops.dsv2.dequantize.default
quantize_rows = torch.ops.dsv2.quantize_rows.default
mla_decode = torch.ops.dsv2.mla_decode.default
mla_decode_paged = torch.ops.dsv2.mla_decode_paged.default
attention_decode = torch.ops.dsv2.attention_decode.default
ffn_decode = torch.ops.dsv2.ffn_decode.default

available: bool = globals().get("available", False)
"""Whether the C++ kernels serve the ops on the CPU in this process (load_kernels)."""
_tried: bool = globals().get("_tried", False)


def load_kernels() -> bool:
    """Build (the first time on a machine) or load the C++ kernels, once per process; returns `available`."""
    global available, _tried
    if not _tried:
        _tried = True
        available = build.load() is not None
    return available


def cpu_name() -> str:
    """The CPU's model name, for labelling measured figures."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX). Elsewhere bf16 GEMMs are emulated and run
    several times slower than fp32 (dsv2.cpu computes many-row ones in fp32; training's dtype=auto picks fp32)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # unknown: leave dtypes alone
        return True
