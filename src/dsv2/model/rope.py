"""Decoupled rotary position embedding (DeepSeek-V2 Sec. 2.1.3) with YaRN context extension (Sec. 3.1.2).

MLA applies RoPE only to a small decoupled slice: d_h^R dims of each query head and ONE shared key of d_h^R
dims. Rotating the compressed keys themselves would put a position-dependent matrix between W_UK and W_Q and
block weight absorption at decode time.

Layout: the official checkpoints rotate *interleaved* pairs (x[2i], x[2i+1]) (the reference code permutes the
slice before a rotate-half; transformers uses complex multiplication). dsv2 rotates interleaved pairs directly.

YaRN (Peng et al. 2023), exactly as the official code: dimensions whose wavelength is short compared with the
original context keep their frequency (extrapolation), long ones are divided by the scale s (interpolation), a
linear ramp between the beta_fast and beta_slow correction dims blends the two. cos/sin are multiplied by
mscale(s, mscale) / mscale(s, mscale_all_dim); the softmax scale gets mscale(s, mscale_all_dim)^2
(`ModelConfig.softmax_scale`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig, yarn_get_mscale


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    """The rotary dimension index whose wavelength fits `num_rotations` times into `max_pos` positions."""
    return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def yarn_inv_freq(dim: int, base: float, factor: float, original_max_pos: int, beta_fast: float = 32,
                  beta_slow: float = 1) -> torch.Tensor:
    """YaRN's blended inverse frequencies for `dim` rotary dims ([dim/2], fp32)."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim
    freq_extra = 1.0 / base**exponents  # original frequencies: kept for high-frequency dims
    freq_inter = 1.0 / (factor * base**exponents)  # interpolated: used for low-frequency dims
    low = max(math.floor(_yarn_correction_dim(beta_fast, dim, base, original_max_pos)), 0)
    high = min(math.ceil(_yarn_correction_dim(beta_slow, dim, base, original_max_pos)), dim - 1)
    if low == high:
        high += 0.001  # avoid a division by zero in the ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolate = 1.0 - ramp  # 1 for dims below `low` (keep frequency), 0 above `high`
    return freq_inter * (1 - extrapolate) + freq_extra * extrapolate


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions; no parameters and no buffers (nothing to save or to materialise)."""

    def __init__(self, config: ModelConfig, dim: int | None = None):
        super().__init__()
        self.dim = dim or config.qk_rope_head_dim
        rs = config.rope_scaling
        if rs is None:
            exps = torch.arange(0, self.dim, 2, dtype=torch.float32, device="cpu") / self.dim
            self._inv_freq = 1.0 / config.rope_theta**exps
            self.mscale = 1.0
        else:
            factor = rs["factor"]
            self._inv_freq = yarn_inv_freq(self.dim, config.rope_theta, factor,
                                           rs["original_max_position_embeddings"],
                                           rs.get("beta_fast") or 32, rs.get("beta_slow") or 1)
            self.mscale = yarn_get_mscale(factor, rs.get("mscale") or 1) / yarn_get_mscale(
                factor, rs.get("mscale_all_dim") or 0)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, S] -> (cos, sin), each [B, S, dim/2] fp32."""
        self._inv_freq = self._inv_freq.to(positions.device)
        angles = positions[..., None].float() * self._inv_freq
        return angles.cos() * self.mscale, angles.sin() * self.mscale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the last dim of x; cos/sin [..., dim/2] broadcast against x[..., dim/2].

    Each pair (x[2i], x[2i+1]) is the complex number x[2i] + i x[2i+1], rotated by multiplying with
    cos + i sin: (x_e cos - x_o sin) + i (x_e sin + x_o cos), in fp32 (one complex multiply instead of four real
    ones, two selects and a stack: a decode step rotates 2 small tensors per layer)."""
    z = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(z * torch.complex(cos, sin)).flatten(-2).to(x.dtype)
