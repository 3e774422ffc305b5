"""Decoupled RoPE and YaRN against an independent transcription of the official DeepSeek-V2 formulas.

Tolerances: inv_freq is compared in fp64 against fp32 output (rtol 1e-6); rotations in fp32 (atol 1e-5 on O(1)
values, 1e-4 relative for dot products of 32-dim vectors at positions up to 10^4).
"""

import math

import pytest
import torch
from conftest import tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv2.config import yarn_get_mscale
from dsv2.model.rope import RotaryEmbedding, apply_rope, yarn_inv_freq
from dsv2.presets import get_config


# --- reference: the official modeling_deepseek.py YaRN, written out independently (fp64) --------------------------
def ref_find_correction_dim(num_rotations, dim, base, max_pos):
    return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def ref_find_correction_range(low_rot, high_rot, dim, base, max_pos):
    low = math.floor(ref_find_correction_dim(low_rot, dim, base, max_pos))
    high = math.ceil(ref_find_correction_dim(high_rot, dim, base, max_pos))
    return max(low, 0), min(high, dim - 1)


def ref_linear_ramp_mask(lo, hi, n):
    if lo == hi:
        hi += 0.001
    return [min(max((i - lo) / (hi - lo), 0.0), 1.0) for i in range(n)]


def ref_yarn_inv_freq(dim, base, factor, orig, beta_fast, beta_slow):
    freq_extra = [1.0 / base ** (2 * i / dim) for i in range(dim // 2)]
    freq_inter = [1.0 / (factor * base ** (2 * i / dim)) for i in range(dim // 2)]
    lo, hi = ref_find_correction_range(beta_fast, beta_slow, dim, base, orig)
    mask = [1.0 - r for r in ref_linear_ramp_mask(lo, hi, dim // 2)]  # inv_freq_mask: 1 = extrapolate
    return torch.tensor([fi * (1 - m) + fe * m for fi, fe, m in zip(freq_inter, freq_extra, mask, strict=True)],
                        dtype=torch.float64)


def ref_mscale(scale, mscale=1.0):
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


# ---------------------------------------------------------------------------------------------------------------
def test_v2_yarn_inv_freq_matches_official_formula():
    cfg = get_config("deepseek-v2")
    rs = cfg.rope_scaling
    want = ref_yarn_inv_freq(64, 10000.0, 40, 4096, 32, 1)
    got = RotaryEmbedding(cfg)._inv_freq
    assert got.dtype == torch.float32 and got.shape == (32,)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    # the three regimes: the first dims keep their frequency, the last are divided by the factor
    base = torch.tensor([1.0 / 10000 ** (2 * i / 64) for i in range(32)], dtype=torch.float64)
    lo, hi = ref_find_correction_range(32, 1, 64, 10000.0, 4096)
    assert 0 < lo < hi < 31
    torch.testing.assert_close(got[:lo].double(), base[:lo], rtol=1e-6, atol=0)
    torch.testing.assert_close(got[hi:].double(), base[hi:] / 40, rtol=1e-6, atol=0)
    assert rs["mscale"] == rs["mscale_all_dim"]
    assert RotaryEmbedding(cfg).mscale == pytest.approx(1.0)  # mscale / mscale_all_dim = 1 for the release


@settings(max_examples=60, deadline=None)
@given(dim=st.sampled_from([4, 8, 16, 32, 64, 128]), base=st.sampled_from([500.0, 10000.0, 1e6]),
       factor=st.floats(1.0, 64.0), orig=st.sampled_from([16, 128, 2048, 4096]),
       beta_fast=st.sampled_from([8, 16, 32]), beta_slow=st.sampled_from([1, 2]))
def test_yarn_inv_freq_matches_reference(dim, base, factor, orig, beta_fast, beta_slow):
    got = yarn_inv_freq(dim, base, factor, orig, beta_fast, beta_slow)
    want = ref_yarn_inv_freq(dim, base, factor, orig, beta_fast, beta_slow)
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=0)


@pytest.mark.parametrize("factor,mscale,mscale_all_dim", [(40, 0.707, 0.707), (40, 1.0, 0.707), (4, 1.0, 0.0),
                                                          (1.0, 0.707, 0.707), (16, 0.5, 1.0)])
def test_mscale(factor, mscale, mscale_all_dim):
    assert yarn_get_mscale(factor, mscale) == pytest.approx(ref_mscale(factor, mscale), rel=1e-12)
    cfg = tiny_config(max_position_embeddings=4096, rope_scaling={
        "type": "yarn", "factor": factor, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": mscale, "mscale_all_dim": mscale_all_dim})
    rot = RotaryEmbedding(cfg)
    # official: cos/sin times mscale(s, mscale) / mscale(s, mscale_all_dim) (default mscale_all_dim 0 -> 1)
    assert rot.mscale == pytest.approx(ref_mscale(factor, mscale) / ref_mscale(factor, mscale_all_dim), rel=1e-12)
    cos, sin = rot(torch.arange(7)[None])
    torch.testing.assert_close(cos.pow(2) + sin.pow(2), torch.full_like(cos, rot.mscale**2), atol=1e-5, rtol=0)
    # official softmax scale: q_head_dim^-0.5 * mscale(s, mscale_all_dim)^2 when mscale_all_dim is set
    want_scale = cfg.qk_head_dim**-0.5 * (ref_mscale(factor, mscale_all_dim) ** 2 if mscale_all_dim else 1.0)
    assert cfg.softmax_scale == pytest.approx(want_scale, rel=1e-12)


def test_plain_rope_frequencies_and_cos_sin():
    cfg = tiny_config(rope_theta=500.0)
    rot = RotaryEmbedding(cfg)
    d = cfg.qk_rope_head_dim
    inv = torch.tensor([500.0 ** (-2 * i / d) for i in range(d // 2)], dtype=torch.float64)
    torch.testing.assert_close(rot._inv_freq.double(), inv, rtol=1e-6, atol=0)
    pos = torch.tensor([[0, 3, 11], [5, 5, 100]])
    cos, sin = rot(pos)
    assert cos.shape == (2, 3, d // 2) and cos.dtype == torch.float32
    ang = pos[..., None].double() * inv
    torch.testing.assert_close(cos.double(), ang.cos(), atol=1e-5, rtol=0)
    torch.testing.assert_close(sin.double(), ang.sin(), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
def _rot(dim, theta=10000.0):
    return RotaryEmbedding(tiny_config(qk_rope_head_dim=dim, rope_theta=theta))


@settings(max_examples=40, deadline=None)
@given(dim=st.sampled_from([2, 8, 16, 32]), pos=st.integers(0, 10000), seed=st.integers(0, 2**31 - 1))
def test_apply_rope_preserves_norm(dim, pos, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, dim, generator=g)
    cos, sin = _rot(dim)(torch.full((1, 3), pos))
    y = apply_rope(x, cos[0], sin[0])
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)
    if float(cos.min()) < 0.99:  # and really rotates (pos * theta_i can sit on a multiple of 2 pi: dim 2, pos 710)
        assert not torch.allclose(y, x, atol=1e-3)


@settings(max_examples=40, deadline=None)
@given(dim=st.sampled_from([8, 16, 32]), m=st.integers(0, 5000), n=st.integers(0, 5000), shift=st.integers(1, 5000),
       seed=st.integers(0, 2**31 - 1))
def test_apply_rope_is_relative(dim, m, n, shift, seed):
    """q(m) . k(n) depends only on m - n."""
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(dim, generator=g), torch.randn(dim, generator=g)
    rot = _rot(dim)

    def score(a, b):
        cos, sin = rot(torch.tensor([[a, b]]))
        return (apply_rope(q, cos[0, 0], sin[0, 0]) * apply_rope(k, cos[0, 1], sin[0, 1])).sum()

    s1, s2 = score(m, n), score(m + shift, n + shift)
    scale = q.norm() * k.norm()
    assert abs(float(s1 - s2)) <= 1e-4 * float(scale)


def test_apply_rope_is_position_sensitive():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(16, generator=g), torch.randn(16, generator=g)
    cos, sin = _rot(16)(torch.tensor([[0, 1, 2]]))
    s = [float((apply_rope(q, cos[0, i], sin[0, i]) * apply_rope(k, cos[0, 0], sin[0, 0])).sum()) for i in range(3)]
    assert abs(s[0] - s[1]) > 1e-3 and abs(s[1] - s[2]) > 1e-3


@settings(max_examples=30, deadline=None)
@given(dim=st.sampled_from([2, 8, 64]), seed=st.integers(0, 2**31 - 1), yarn=st.booleans())
def test_interleaved_pairs_equal_complex_multiplication(dim, seed, yarn):
    """transformers' form: view (x[2i], x[2i+1]) as a complex number and multiply by e^{i * pos * inv_freq_i}."""
    g = torch.Generator().manual_seed(seed)
    rs = {"type": "yarn", "factor": 8, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
          "mscale": 1.0, "mscale_all_dim": 0.5} if yarn else None
    rot = RotaryEmbedding(tiny_config(qk_rope_head_dim=dim, rope_scaling=rs, max_position_embeddings=256))
    pos = torch.randint(0, 256, (2, 5), generator=g)
    x = torch.randn(2, 5, 3, dim, generator=g)  # [B, S, H, R]
    cos, sin = rot(pos)
    got = apply_rope(x, cos[:, :, None], sin[:, :, None])
    freqs = torch.polar(torch.full_like(cos, rot.mscale), pos[..., None].float() * rot._inv_freq)  # [B, S, R/2]
    xc = torch.view_as_complex(x.reshape(2, 5, 3, dim // 2, 2).contiguous())
    want = torch.view_as_real(xc * freqs[:, :, None]).flatten(-2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_interleaved_equals_official_permute_then_rotate_half():
    """The official code permutes to [evens; odds] then applies rotate-half with cat(freqs, freqs)."""
    g = torch.Generator().manual_seed(1)
    dim = 16
    x = torch.randn(4, dim, generator=g)
    pos = torch.arange(4)
    rot = _rot(dim)
    cos, sin = rot(pos[None])
    got = apply_rope(x, cos[0], sin[0])
    xp = x.view(4, dim // 2, 2).transpose(-1, -2).reshape(4, dim)  # [x0, x2, ..., x1, x3, ...]
    c2, s2 = torch.cat((cos[0], cos[0]), -1), torch.cat((sin[0], sin[0]), -1)
    rotate_half = torch.cat((-xp[:, dim // 2:], xp[:, : dim // 2]), -1)
    official = xp * c2 + rotate_half * s2
    # same values, in the official (de-interleaved) order
    torch.testing.assert_close(got.view(4, dim // 2, 2).transpose(-1, -2).reshape(4, dim), official,
                               atol=1e-5, rtol=1e-5)


def test_apply_rope_keeps_dtype():
    cos, sin = _rot(8)(torch.arange(3)[None])
    x = torch.randn(3, 8).bfloat16()
    y = apply_rope(x, cos[0], sin[0])
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), apply_rope(x.float(), cos[0], sin[0]), atol=2e-2, rtol=2e-2)
