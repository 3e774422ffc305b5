"""The inference fast paths (src/dsv2/fastpath.py) equal the paths they replace; the joint cache layout; masks
skipped only where they are no-ops; logits_to_keep."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv2.cpu import build as kernel_build
from dsv2.cpu import fastpath
from dsv2.model import DeepseekV2, experts
from dsv2.model.cache import KVCache
from dsv2.model.experts import RoutedExperts
from dsv2.presets import get_config

TOL = dict(atol=1e-5, rtol=1e-5)
requires_kernel = pytest.mark.skipif(fastpath._kernels() is None,
                                     reason="no C++ toolchain: PyTorch ops are used (tested elsewhere)")


# ---------------------------------------------------------------------------------------------------------------
# few-row linears and experts (kernels/few_rows.cpp)


@pytest.mark.parametrize("rows", [1, 3, 16, 17, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_equals_f_linear(rows, bias):
    torch.manual_seed(rows)
    lin = fastpath.Linear(48, 80, bias=bias)
    x = torch.randn(rows, 48)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), **TOL)
        torch.testing.assert_close(lin(x.view(1, rows, 48)), F.linear(x, lin.weight, lin.bias)[None], **TOL)
        xt = torch.randn(48, rows).t()  # non-contiguous rows
        torch.testing.assert_close(lin(xt), F.linear(xt, lin.weight, lin.bias), **TOL)
        lin16 = lin.to(torch.bfloat16)  # bf16: F.linear, or fp32 on the same values where bf16 is emulated
        torch.testing.assert_close(lin16(x.bfloat16()), F.linear(x.bfloat16(), lin16.weight, lin16.bias))


@requires_kernel
@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(0, 5), min_size=1, max_size=5), R=st.integers(1, 100),
       K=st.sampled_from([1, 7, 8, 20, 64, 72, 130]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 999))
def test_rows_dot_equals_reference(counts, R, K, dtype, seed):
    """y[n] = w[g] x[n] for the rows of each group: every tile remainder (1-row GEMV path, 3-row x 4-query tiles,
    48-row task blocks, widths below/between/above the 8- and 64-wide loops), empty groups, strided groups,
    fp32 and bf16 weights: within 1e-5 of an fp64 reference over the same weight values."""
    g = torch.Generator().manual_seed(seed)
    G, N = len(counts), sum(counts)
    w = torch.randn(G, R + 3, K, generator=g).to(dtype)[:, 2:R + 2]  # group stride != R * K
    x = torch.randn(N, K, generator=g)
    ends = torch.tensor(counts).cumsum(0)
    got = fastpath._kernels().rows_dot(x, w, ends)
    group_N = torch.repeat_interleave(torch.arange(G), torch.tensor(counts))
    want = torch.einsum("nk,nrk->nr", x.double(), w.double()[group_N])
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    # bf16 rows in any layout: widened, accumulated in fp32, rounded once to bf16 (relative error <= 2^-8)
    x16 = torch.randn(K, N, generator=g).bfloat16().t()
    got16 = fastpath._kernels().rows_dot(x16, w, ends)
    want16 = torch.einsum("nk,nrk->nr", x16.double(), w.double()[group_N])
    assert got16.dtype == torch.bfloat16
    torch.testing.assert_close(got16.double(), want16, atol=1e-4, rtol=2**-8)


@requires_kernel
@settings(max_examples=40, deadline=None)
@given(G=st.integers(1, 4), N=st.integers(1, 40), M=st.integers(1, 9), C=st.sampled_from([1, 8, 23, 24, 100, 200]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 999))
def test_heads_xw_equals_reference(G, N, M, C, dtype, seed):
    """x @ w per group by rows_combine (4-query x 24/16/8-column tiles, single columns, 96-column task blocks),
    through fastpath.heads_xw's transposed input: within 1e-5 of fp64; heads_xwt (rows_dot per head) too."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(G, M, N, generator=g)
    w = torch.randn(G, N, C + 1, generator=g).to(dtype)[..., :C]
    with torch.no_grad():
        got = fastpath.heads_xw(x, w)
        torch.testing.assert_close(got.double(), x.double() @ w.double(), atol=1e-5, rtol=1e-5)
        y = torch.randn(G, M, C, generator=g)
        got = fastpath.heads_xwt(y, w)  # w as [G, R, K]: strided rows (C of C + 1)
        torch.testing.assert_close(got.double(), y.double() @ w.double().transpose(1, 2), atol=1e-5, rtol=1e-5)


@requires_kernel
def test_few_row_kernels_reject_bad_input():
    k = fastpath._kernels()
    x, w = torch.randn(3, 8), torch.randn(2, 5, 8)
    for ends, msg in [(torch.tensor([1, 2]), "must equal the number of rows"),
                      (torch.tensor([2, 1]), "non-decreasing"), (torch.tensor([1]), "int64 \\[G\\]"),
                      (torch.tensor([1.0, 3.0]), "int64")]:
        with pytest.raises(RuntimeError, match=msg):
            k.rows_dot(x, w, ends)
    with pytest.raises(RuntimeError, match="differ"):
        k.rows_dot(torch.randn(3, 7), w, torch.tensor([1, 3]))
    with pytest.raises(RuntimeError, match="x must be fp32 or bf16"):
        k.rows_dot(x.double(), w, torch.tensor([1, 3]))
    with pytest.raises(RuntimeError, match="fp32 or bf16"):
        k.rows_dot(x, w.half(), torch.tensor([1, 3]))
    with pytest.raises(RuntimeError, match="differ in G or N"):
        k.rows_combine(torch.randn(2, 4, 3), torch.randn(2, 5, 8))


@requires_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_dot_one_matrix_keeps_the_leading_shape(dtype):
    k = fastpath._kernels()
    x, w = torch.randn(2, 3, 20).to(dtype), torch.randn(7, 20).to(dtype)
    got = k.rows_dot(x, w)
    assert got.shape == (2, 3, 7) and got.dtype == dtype
    torch.testing.assert_close(got.double(), x.double() @ w.double().T, atol=1e-4, rtol=2**-8)
    with pytest.raises(RuntimeError, match="grouped rows take x"):
        k.rows_dot(x, w[None], torch.tensor([6]))


@requires_kernel
@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, fastpath.SMALL_ROWS), D=st.sampled_from([1, 7, 64, 1024]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 999))
def test_rms_norm_kernel_equals_module(rows, D, dtype, seed):
    """The decode RMSNorm kernel == RMSNorm's PyTorch formula (fp32 normalisation, rounded to the dtype, then
    scaled): fp32 within 1e-5; bf16 within one bf16 rounding of the scale-and-round steps."""
    from dsv2.model.norm import RMSNorm

    g = torch.Generator().manual_seed(seed)
    norm = RMSNorm(D, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(D, generator=g))
    x = (torch.randn(D, rows, generator=g) * 3).to(dtype).t()[None]  # [1, rows, D], strided rows
    want = norm.weight * F.rms_norm(x.float(), (D,), eps=1e-6).to(dtype)
    with torch.no_grad():
        got = fastpath.rms_norm(x, norm.weight, 1e-6)
        torch.testing.assert_close(norm(x), got, atol=0, rtol=0)  # the module takes it
    assert got is not None and got.dtype == dtype and got.shape == x.shape
    tol = TOL if dtype == torch.float32 else dict(atol=1e-2, rtol=2**-7)
    torch.testing.assert_close(got.float(), want.float(), **tol)
    assert fastpath.rms_norm(torch.randn(fastpath.SMALL_ROWS + 1, D).to(dtype), norm.weight, 1e-6) is None
    assert fastpath.rms_norm(x, norm.weight.detach().requires_grad_(), 1e-6) is None  # autograd


def test_few_row_products_keep_autograd_and_many_rows_on_pytorch():
    """Under autograd, and with more than SMALL_ROWS rows per weight, the PyTorch ops run (gradients flow)."""
    x = torch.randn(2, 3, 4, requires_grad=True)
    w = torch.randn(2, 4, 5, requires_grad=True)
    fastpath.heads_xw(x, w).sum().backward()
    fastpath.heads_xwt(x, w.transpose(1, 2)).sum().backward()
    assert x.grad is not None and w.grad is not None
    with torch.no_grad():
        many = torch.randn(2, fastpath.SMALL_ROWS + 1, 4)
        torch.testing.assert_close(fastpath.heads_xw(many, w), many @ w, **TOL)


def test_linear_keeps_autograd():
    lin = fastpath.Linear(8, 4)
    x = torch.randn(2, 8, requires_grad=True)
    lin(x).sum().backward()
    assert x.grad is not None and lin.weight.grad is not None


def make_experts(E, D, F_, seed, dtype=torch.float32):
    torch.manual_seed(seed)
    ex = RoutedExperts(E, D, F_)
    with torch.no_grad():
        ex.gate_up_proj.normal_(0, 0.3)
        ex.down_proj.normal_(0, 0.3)
    return ex.to(dtype)


def sorted_copies(E, D, N, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    expert_N = torch.randint(0, E, (N,), generator=g).sort().values
    counts_E = torch.bincount(expert_N, minlength=E)
    return torch.randn(N, D, generator=g).to(dtype), counts_E


@requires_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N", [1, 6, 13, 40])
def test_small_batch_experts_equal_grouped(N, dtype):
    """The small-batch expert path (one few-row product per chosen expert and projection) == the grouped GEMMs in
    the same dtype: fp32 within 1e-5; bf16 within 2% of the output's scale (both round the intermediates to bf16,
    in different summation orders)."""
    ex = make_experts(8, 32, 24, N, dtype)
    x, counts = sorted_copies(8, 32, N, N, dtype)
    with torch.no_grad():
        got = fastpath.small_batch_swiglu(x, counts, ex.gate_up_proj, ex.down_proj, F.silu)
        assert got is not None and got.dtype == dtype
        want = ex.grouped(x, counts)
        tol = TOL if dtype == torch.float32 else dict(atol=0.02 * want.abs().max().item(), rtol=0.02)
        torch.testing.assert_close(got, want, **tol)
        torch.testing.assert_close(ex(x, counts), got, atol=0, rtol=0)  # forward picks it


@requires_kernel
def test_small_batch_experts_only_for_few_copies_per_expert():
    ex = make_experts(8, 32, 24, 0)
    x, counts = sorted_copies(8, 32, 4, 0)
    with torch.no_grad():
        assert fastpath.small_batch_swiglu(x, counts, ex.gate_up_proj, ex.down_proj, F.silu) is not None
        many = torch.randn(17 * 8, 32)  # 17 copies per expert: a GEMM's reuse of the weights wins
        assert fastpath.small_batch_swiglu(many, torch.tensor([17] * 8), ex.gate_up_proj, ex.down_proj, F.silu) is None
    assert fastpath.small_batch_swiglu(x, counts, ex.gate_up_proj, ex.down_proj, F.silu) is None  # autograd


def test_grouped_in_place_without_grad_equals_with_grad():
    ex = make_experts(4, 16, 8, 1)
    x, counts = sorted_copies(4, 16, 20, 1)
    with_grad = ex.grouped(x, counts)
    with torch.no_grad():
        torch.testing.assert_close(ex.grouped(x, counts), with_grad.detach())


@settings(max_examples=15, deadline=None)
@given(N=st.integers(257, 900), E=st.integers(1, 9), seed=st.integers(0, 2**16), bf16=st.booleans())
def test_grouped_in_blocks_equals_one_pass(N, E, seed, bf16):
    """Without autograd the CPU path runs the copies in blocks of at least 256 (here: exactly 256, block edges
    falling inside experts, some experts empty) == the one-pass grouped GEMMs of the autograd path: fp32 within
    1e-5; bf16 (same fp32 products where bf16 GEMMs are emulated, rounded once) within one bf16 rounding."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    ex = make_experts(E, 16, 8, seed, dtype)
    x, counts = sorted_copies(E, 16, N, seed, dtype)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(experts, "BLOCK_BYTES", 1)
        assert ex._block_rows(x, dtype) == N  # autograd: one pass
        one_pass = ex.grouped(x, counts).detach()
        with torch.no_grad():
            assert ex._block_rows(x, dtype) == 256
            blocked = ex.grouped(x, counts)
    tol = TOL if not bf16 else dict(atol=1e-2 * one_pass.abs().max().item(), rtol=1e-2)
    torch.testing.assert_close(blocked, one_pass, **tol)


def test_joint_cache_rows_are_the_streams_side_by_side():
    cache = KVCache({"c_kv": 3, "k_pe": 2}, num_layers=2, batch_size=2, max_len=5, dtype=torch.float32)
    cache.begin(2)
    c, k = torch.randn(2, 2, 3), torch.randn(2, 2, 2)
    cache.update(1, c_kv=c, k_pe=k)
    cache.advance(2)
    torch.testing.assert_close(cache.joint(1, 2), torch.cat((c, k), dim=-1))
    assert cache.nbytes() == 2 * 2 * 5 * 5 * 4 and cache.bytes_per_token() == 2 * 5 * 4


def test_padded_flag_tracks_padding():
    cache = KVCache({"a": 2}, num_layers=1, batch_size=2, max_len=8, dtype=torch.float32)
    cache.begin(2, torch.ones(2, 2, dtype=torch.bool))
    assert not cache.padded
    cache.advance(2)
    cache.begin(2, torch.tensor([[True, False], [True, True]]))
    assert cache.padded


@pytest.mark.parametrize("absorb", [False, True])
def test_unmasked_cached_forward_equals_masked(absorb):
    """Without padding the model skips the attention mask (causal prefill, single-token decode): same outputs as
    with the explicit mask it used to build."""
    torch.manual_seed(0)
    cfg = get_config("tiny", num_hidden_layers=2)
    model = DeepseekV2(cfg).eval()
    ids = torch.randint(2, 100, (2, 9))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 9)
        outs = [model(ids[:, :6], cache=cache)]
        assert not cache.padded
        for t in range(6, 9):
            outs.append(model(ids[:, t:t + 1], cache=cache, absorb=absorb))
        torch.testing.assert_close(torch.cat(outs, 1), full, **TOL)
        # chunked prefill (start > 0, several tokens) still builds its offset causal mask
        cache = model.new_cache(2, 9)
        chunked = torch.cat([model(ids[:, :4], cache=cache), model(ids[:, 4:], cache=cache)], 1)
        torch.testing.assert_close(chunked, full, **TOL)


def test_logits_to_keep():
    torch.manual_seed(0)
    model = DeepseekV2(get_config("tiny", num_hidden_layers=2)).eval()
    ids = torch.randint(2, 100, (2, 7))
    with torch.no_grad():
        full = model(ids)
        torch.testing.assert_close(model(ids, logits_to_keep=1), full[:, -1:], **TOL)
        torch.testing.assert_close(model(ids, logits_to_keep=3), full[:, -3:], **TOL)


def test_cache_writable_with_grad_mode_on():
    cache = KVCache({"c_kv": 3, "k_pe": 2}, num_layers=1, batch_size=1, max_len=4, dtype=torch.float32)
    cache.begin(1)
    cache.update(0, c_kv=torch.randn(1, 1, 3), k_pe=torch.randn(1, 1, 2))
    cache.buffers["c_kv"][:, :, :1] = 0.0


# ---------------------------------------------------------------------------------------------------------------
# the CPU MLA decode kernel (kernels/mla_decode.cpp)
def _latent_reference(q_BKX, kv_BTX, valid_BT, C):
    s = torch.einsum("bkx,btx->bkt", q_BKX.double(), kv_BTX.double())
    if valid_BT is not None:
        s = s.masked_fill(~valid_BT[:, None, : kv_BTX.shape[1]], float("-inf"))
    return torch.einsum("bkt,btc->bkc", s.softmax(-1), kv_BTX[..., :C].double())




@requires_kernel
@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(1, 300), K=st.integers(1, 9), X=st.sampled_from([7, 20, 40, 72]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), masked=st.booleans(),
       seed=st.integers(0, 999))
def test_latent_attention_kernel_equals_reference(B, T, K, X, dtype, masked, seed):
    """Any row/query/width remainder of the micro-kernels (3-row x 4-query score tiles, 24/16/8-column
    accumulate tiles, single columns), chunk boundaries (128), strided cache rows, masks (including rows with every
    key of a chunk masked), each cache dtype's load path (fp32 and bf16 in place, fp16 widened per chunk): fp32
    result within 1e-5 of an fp64 reference over the same (possibly bf16/fp16) cache values."""
    g = torch.Generator().manual_seed(seed)
    C = X - 3 if X > 8 else X
    storage = torch.randn(B, T + 5, X + 2, generator=g).to(dtype)  # slack in both dims: strided rows
    kv = storage[:, :T, :X]
    q = torch.randn(B, K, X, generator=g) * 0.3
    valid = None
    if masked:
        valid = torch.rand(B, T + 5, generator=g) > 0.6
        valid[:, T - 1] = True  # the new token always sees itself
    got = fastpath.latent_attention(q, kv, valid, C)
    torch.testing.assert_close(got.double(), _latent_reference(q, kv.float(), valid, C), atol=1e-5, rtol=1e-5)


@requires_kernel
def test_latent_attention_falls_back_under_autograd_and_other_devices():
    q = torch.randn(1, 2, 8, requires_grad=True)
    kv = torch.randn(1, 4, 8)
    assert fastpath.latent_attention(q, kv, None, 8) is None  # autograd: the differentiable GEMM path
    with torch.no_grad():
        assert fastpath.latent_attention(q, kv, None, 8) is not None
        assert fastpath.latent_attention(q.to("meta"), kv.to("meta"), None, 8) is None


@requires_kernel
@pytest.mark.parametrize("padded", [False, True])
def test_decode_with_kernel_equals_gemm_path(padded, monkeypatch):
    """A whole model's decode steps, kernel vs the batched-GEMM path: same logits (fp32, 1e-5)."""
    cfg = get_config("tiny", num_hidden_layers=2)
    torch.manual_seed(0)
    model = DeepseekV2(cfg).eval()
    ids = torch.randint(2, cfg.vocab_size, (2, 40))
    pad = torch.ones(2, 40, dtype=torch.bool)
    if padded:
        pad[0, :7] = False
    outs = []
    for use_kernel in (True, False):
        if not use_kernel:
            monkeypatch.setattr(fastpath, "latent_attention", lambda *a: None)
        cache = model.new_cache(2, 48)
        with torch.no_grad():
            model(ids, cache=cache, pad_mask=pad)
            outs.append(torch.stack([model(ids[:, i:i + 1], cache=cache) for i in range(5)]))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("native", [False, True])
def test_many_row_bf16_gemms_widen_only_where_bf16_is_emulated(native, monkeypatch):
    """Prefill-sized bf16 linears and grouped experts compute in fp32 on CPUs without native bf16 matmul: the
    result is the fp32 product of the same bf16 values, rounded once to bf16 (what a bf16 GEMM with fp32
    accumulation returns, up to summation order); decode-sized calls and native CPUs keep bf16."""
    fastpath._cpu_native_low_precision.cache_clear()
    monkeypatch.setattr(fastpath, "_cpu_native_low_precision", lambda: native)
    torch.manual_seed(0)
    lin = fastpath.Linear(64, 48).to(torch.bfloat16)
    x = torch.randn(40, 64).bfloat16()
    assert fastpath.gemm_dtype(x, 40) == (torch.bfloat16 if native else torch.float32)
    assert fastpath.gemm_dtype(x, 1) == torch.bfloat16
    exact = F.linear(x.float(), lin.weight.float(), lin.bias.float())
    with torch.no_grad():
        got = lin(x)
    assert got.dtype == torch.bfloat16
    if not native:
        torch.testing.assert_close(got, exact.bfloat16(), atol=0, rtol=0)
    torch.testing.assert_close(got.float(), exact, atol=0.05, rtol=0.02)  # bf16 rounding of the output
    ex = make_experts(4, 32, 24, 0, torch.bfloat16)
    xs, counts = sorted_copies(4, 32, 200, 1, torch.bfloat16)
    with torch.no_grad():
        y = ex.grouped(xs, counts)
    ref = make_experts(4, 32, 24, 0).grouped(xs.float(), counts)
    torch.testing.assert_close(y.float(), ref, atol=0.05, rtol=0.05)


def test_kernel_build_key_ignores_the_clock():
    """The kernel's cache name hashes the CPU model and flags, not /proc/cpuinfo's varying MHz: one build per
    machine, not one per process."""
    sig = kernel_build.cpu_signature()
    assert "MHz" not in sig and "bogomips" not in sig
    assert sig == kernel_build.cpu_signature()
