"""Weight-only integer formats: symmetric int8 and int4 with a scale per group of input columns, in two layouts.

A weight W [R, K] (R output rows, K input columns) is cut along K into groups of `group` columns (group == K: one
scale per output channel). Each group has one scale s (a bf16 value) and integers q with W ~= q * s: int8 q in
[-128, 127] from s = max|w| / 127; int4 q in [-8, 7] with s chosen per group, among a few clipping ratios, to
minimise the group's squared error (int4's 16 levels make the choice matter; int8's error is below bf16's own).

- **On disk: compressed-tensors' `pack-quantized` layout** (what vLLM, SGLang and transformers read):
  `<name>.weight_packed` int32 [R, K * bits / 32] (32 / bits values per word, lowest bits first, stored as q + 2^(bits
  - 1)), `<name>.weight_scale` [R, K / group] in the model's dtype, `<name>.weight_shape` int64 [2] = (R, K).
- **In memory: blocked rows** (what the kernels stream): each row is K / group blocks of [bf16 scale | group * bits / 8
  bytes], int8 values as signed bytes, int4 as compressed-tensors packs them (element 2j in the low nibble of byte j,
  offset by 8). A row is one sequential stream, scale beside its values (as llama.cpp's Q8_0 / Q4_0 blocks), so the
  same few-row kernels read a quantized weight in place: rows_dot's and rows_combine's weight may be such a uint8
  tensor [..., R, row_bytes]; its format follows from K and row_bytes alone (block_format), so the ops' schemas
  stay those of fp32/bf16 weights.

Both layouts hold the same integers and the same scales: converting between them is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError

METHODS = ("int8", "int4")
DEFAULT_GROUP = {"int8": 0, "int4": 32}
"""Default group size per method (0: one scale per output channel). Chosen from benchmarks/quant_accuracy.py."""
MIN_GROUP = 32
"""Group sizes are multiples of this: the kernels' vectors cover 16 int4 or 8 int8 values, blocks stay whole."""
INT4_CLIPS = (7.5 / 7, 1.0, 0.95, 0.9, 0.85, 0.8)
"""int4 scale candidates, as fractions of max|w| / 7.5 (7.5 / 7: nothing clipped): a little clipping of the largest
value often lowers the group's error (the levels sit closer); the least-error candidate wins per group."""


@dataclass(frozen=True)
class Scheme:
    """How one weight is quantized: bits (8 or 4) and group (columns per scale; 0 = the whole row)."""

    bits: int
    group: int = 0

    @staticmethod
    def parse(method: str, group_size: int | None = None) -> Scheme:
        if method not in METHODS:
            raise ConfigError(f"unknown quantization method {method!r}; choose one of {', '.join(METHODS)}")
        group = DEFAULT_GROUP[method] if group_size is None else group_size
        if group < 0 or (group and group % MIN_GROUP):
            raise ConfigError(f"group size {group} must be 0 (one scale per output channel) or a multiple of "
                              f"{MIN_GROUP}")
        return Scheme(8 if method == "int8" else 4, group)

    @property
    def method(self) -> str:
        return f"int{self.bits}"

    def group_of(self, K: int, name: str = "weight") -> int:
        """The group size for a weight of K input columns; a one-line error where it does not divide K."""
        g = self.group or K
        if K % g or g % MIN_GROUP:
            what = f"group size {self.group}" if self.group else "per-channel quantization"
            raise ConfigError(f"{what} does not fit {name} with {K} input columns (needs groups of a multiple "
                              f"of {MIN_GROUP} that divide {K})")
        return g

    def row_bytes(self, K: int) -> int:
        g = self.group_of(K)
        return K // g * (2 + g * self.bits // 8)


def block_format(K: int, row_bytes: int) -> tuple[int, int]:
    """(bits, group) of a blocked row of K values taking row_bytes bytes: a block is 2 + group * bits / 8 bytes,
    so row_bytes = 2 * K / group + K * bits / 8, which only one (bits, group >= 32) satisfies."""
    for bits in (8, 4):
        extra = row_bytes - K * bits // 8
        if extra > 0 and extra % 2 == 0 and K % (extra // 2) == 0 and (K // (extra // 2)) % MIN_GROUP == 0:
            return bits, K // (extra // 2)
    raise ValueError(f"{row_bytes} bytes is not a blocked int8/int4 row of {K} values")


# ---------------------------------------------------------------------------------------------------------------
# quantize / dequantize (integers and scales)
@torch.no_grad()
def quantize(w_RK: torch.Tensor, scheme: Scheme, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [..., R, K], scale bf16 [..., R, K / group]) with w ~= q * scale, computed in fp32 (by the C++ kernel
    on the CPU where it is built: the same arithmetic, many times faster)."""
    return from_blocks(quantize_blocks(w_RK, scheme, name), w_RK.shape[-1])


@torch.no_grad()
def quantize_blocks(w_RK: torch.Tensor, scheme: Scheme, name: str = "weight") -> torch.Tensor:
    """w quantized straight to blocked rows (what loading stores): through the op dsv2.cpu defines (its C++ kernel
    on the CPU where loaded, else this file's reference), or the reference where dsv2.cpu is not imported."""
    g = scheme.group_of(w_RK.shape[-1], name)
    try:
        op = torch.ops.dsv2.quantize_rows
    except (AttributeError, RuntimeError):
        return to_blocks(*quantize_reference(w_RK, scheme, name), scheme.bits)
    return op(w_RK, scheme.bits, 0 if g == w_RK.shape[-1] else g, list(INT4_CLIPS))


@torch.no_grad()
def quantize_reference(w_RK: torch.Tensor, scheme: Scheme, name: str = "weight",
                       clips: tuple[float, ...] = INT4_CLIPS) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize() in PyTorch ops: the reference the kernel is held to (and the path off the CPU)."""
    K = w_RK.shape[-1]
    g = scheme.group_of(K, name)
    w = w_RK.float().reshape(*w_RK.shape[:-1], K // g, g)
    amax = w.abs().amax(-1, keepdim=True)
    if scheme.bits == 8:
        scale = _bf16_scale(amax / 127)
        q = torch.round(w / scale).clamp_(-128, 127)
    else:
        best_err = best_q = scale = None
        for clip in clips:
            s = _bf16_scale(amax * (clip / 7.5))
            q = torch.round(w / s).clamp_(-8, 7)
            err = (q * s - w).square_().sum(-1, keepdim=True)
            if best_err is None:
                best_err, best_q, scale = err, q, s
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_q = torch.where(better, q, best_q)
                scale = torch.where(better, s, scale)
        q = best_q
    return q.to(torch.int8).reshape(w_RK.shape), scale.squeeze(-1).to(torch.bfloat16)


def _bf16_scale(s: torch.Tensor) -> torch.Tensor:
    """Scales rounded to bf16 (how they are stored), never zero (an all-zero group gets scale 1)."""
    s = s.to(torch.bfloat16).float()
    return torch.where(s > 0, s, torch.ones_like(s))


def scale_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The dtype scales are stored in: the model's where every bf16 value is exact in it (fp32, bf16), else bf16
    (fp16 would turn the smallest scales subnormal)."""
    return model_dtype if model_dtype in (torch.float32, torch.bfloat16) else torch.bfloat16


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q [..., R, K] int8 and scale [..., R, K / group] -> the weight [..., R, K] in dtype."""
    K, G = q.shape[-1], scale.shape[-1]
    w = q.float().reshape(*q.shape[:-1], G, K // G) * scale.float()[..., None]
    return w.reshape(q.shape).to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# the in-memory layout: blocked rows
def to_blocks(q: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """q int8 [..., R, K] and bf16 scale [..., R, G] -> blocked rows uint8 [..., R, G * (2 + K / G * bits / 8)]."""
    *lead, R, K = q.shape
    G = scale.shape[-1]
    values = q.reshape(*lead, R, G, K // G)
    if bits == 8:
        payload = values.view(torch.uint8)
    else:  # element 2j in the low nibble of byte j, offset by 8 (compressed-tensors' order)
        u = (values.to(torch.int16) + 8).to(torch.uint8)
        payload = u[..., 0::2] | (u[..., 1::2] << 4)
    # a fresh standard-strided copy: contiguous() keeps odd strides of size-1 dims, which a dtype view refuses
    scale_bytes = scale.to(torch.bfloat16).clone(memory_format=torch.contiguous_format).view(torch.uint8)
    scale_bytes = scale_bytes.reshape(*lead, R, G, 2)
    return torch.cat([scale_bytes, payload], -1).reshape(*lead, R, -1)


def from_blocks(blocks: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of to_blocks: (q int8 [..., R, K], scale bf16 [..., R, G])."""
    bits, g = block_format(K, blocks.shape[-1])
    *lead, R, _ = blocks.shape
    b = blocks.reshape(*lead, R, K // g, -1)
    scale = b[..., :2].contiguous().view(torch.bfloat16).squeeze(-1)
    payload = b[..., 2:]
    if bits == 8:
        q = payload.contiguous().view(torch.int8)
    else:
        lo, hi = (payload & 15).to(torch.int8) - 8, (payload >> 4).to(torch.int8) - 8
        q = torch.stack([lo, hi], -1)
    return q.reshape(*lead, R, K), scale


def dequantize_blocks(blocks: torch.Tensor, K: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Blocked rows -> the dense weight [..., R, K] (the reference the kernels are held to; non-CPU paths)."""
    return dequantize(*from_blocks(blocks, K), dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# the on-disk layout: compressed-tensors pack-quantized
def pack_int32(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q int8 [R, K] -> int32 [R, K * bits / 32]: value i at bits i*bits.. of the little-endian stream, + 2^(bits-1)."""
    R, K = q.shape
    if K * bits % 32:
        raise ValueError(f"{K} columns of {bits} bits do not fill whole int32 words")
    u = (q.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)
    if bits == 4:
        u = u[:, 0::2] | (u[:, 1::2] << 4)
    return u.contiguous().view(torch.int32)  # little-endian bytes (x86, ARM): byte 0 holds the lowest bits


def compressed_parts(q: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One weight's compressed-tensors tensors, by suffix of `<name>.weight_`: packed, scale (in scale_dtype(dtype)),
    shape."""
    return {"packed": pack_int32(q, bits), "scale": scale.to(scale_dtype(dtype)),
            "shape": torch.tensor(q.shape, dtype=torch.int64)}


def unpack_int32(packed: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """The inverse of pack_int32: int8 [R, K]."""
    u = packed.contiguous().view(torch.uint8)
    if bits == 4:
        u = torch.stack([u & 15, u >> 4], -1).reshape(u.shape[0], -1)
    return (u[:, :K].to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
