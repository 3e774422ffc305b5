"""The CPU fast paths (dsv2.cpu): each custom op equals its reference, each CPU module equals the plain module it
replaces, and a whole model gives the same outputs with optimize() and without; the joint cache layout; masks
skipped only where they are no-ops; logits_at. Tests that need the C++ kernels take the `kernels` fixture
(conftest.py), which builds them once per session."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv2.cpu import build as kernel_build
from dsv2.cpu import modules, ops, optimize
from dsv2.cpu.modules import SMALL_ROWS, CpuLinear, CpuRMSNorm, CpuRoutedExperts
from dsv2.model import DeepseekV2
from dsv2.model.attention import MLA
from dsv2.model.cache import KVCache
from dsv2.model.experts import RoutedExperts
from dsv2.model.norm import RMSNorm

TOL = dict(atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# few-row linears and experts (kernels/few_rows.cpp)


def cpu_linear(D_in, D_out, bias):
    lin = torch.nn.Linear(D_in, D_out, bias=bias)
    lin.__class__ = CpuLinear
    return lin


@pytest.mark.parametrize("rows", [1, 3, 16, 17, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_linear_equals_an_fp64_product(rows, bias):
    """Every path of CpuLinear (the few-row op up to SMALL_ROWS rows, oneDNN or F.linear beyond), any layout of x,
    against x W^T + b in fp64 (1e-5); bf16 within one bf16 rounding of the fp64 product of the same values."""
    torch.manual_seed(rows)
    lin = cpu_linear(48, 80, bias)
    x = torch.randn(rows, 48)

    def want(x, lin):
        y = x.double() @ lin.weight.double().T
        return y + lin.bias.double() if bias else y

    with torch.no_grad():
        torch.testing.assert_close(lin(x).double(), want(x, lin), **TOL)
        torch.testing.assert_close(lin(x.view(1, rows, 48)).double(), want(x, lin)[None], **TOL)
        xt = torch.randn(48, rows).t()  # non-contiguous rows
        torch.testing.assert_close(lin(xt).double(), want(xt, lin), **TOL)
        lin16 = lin.to(torch.bfloat16)
        got = lin16(x.bfloat16())
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), want(x.bfloat16(), lin16), atol=2e-2, rtol=2**-7)


@pytest.mark.usefixtures("kernels")
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
    got = ops.rows_dot(x, w, ends)
    group_N = torch.repeat_interleave(torch.arange(G), torch.tensor(counts))
    want = torch.einsum("nk,nrk->nr", x.double(), w.double()[group_N])
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    # bf16 rows in any layout: widened, accumulated in fp32, rounded once to bf16 (relative error <= 2^-8)
    x16 = torch.randn(K, N, generator=g).bfloat16().t()
    got16 = ops.rows_dot(x16, w, ends)
    want16 = torch.einsum("nk,nrk->nr", x16.double(), w.double()[group_N])
    assert got16.dtype == torch.bfloat16
    torch.testing.assert_close(got16.double(), want16, atol=1e-4, rtol=2**-8)


@pytest.mark.usefixtures("kernels")
@settings(max_examples=40, deadline=None)
@given(G=st.integers(1, 4), N=st.integers(1, 40), M=st.integers(1, 9), C=st.sampled_from([1, 8, 23, 24, 100, 200]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 999))
def test_per_head_products_equal_reference(G, N, M, C, dtype, seed):
    """x @ w per head by rows_combine (a head per task for one query; 4-query x 24/16/8-column tiles, single
    columns, 96-column task blocks), through CpuMLA.absorb_query's transposed input: within 1e-5 of fp64;
    apply_w_uv (rows_dot per head) too."""
    g = torch.Generator().manual_seed(seed)
    mla = _cpu_mla()
    x = torch.randn(G, M, N, generator=g)
    w = torch.randn(G, N, C + 1, generator=g).to(dtype)[..., :C]
    with torch.no_grad():
        got = mla.absorb_query(x, w)
        torch.testing.assert_close(got.double(), x.double() @ w.double(), atol=1e-5, rtol=1e-5)
        y = torch.randn(G, M, C, generator=g)
        got = mla.apply_w_uv(y, w)  # w as [G, R, K]: strided rows (C of C + 1)
        torch.testing.assert_close(got.double(), y.double() @ w.double().transpose(1, 2), atol=1e-5, rtol=1e-5)


def _cpu_mla():
    model = optimize(DeepseekV2(tiny_config(num_hidden_layers=1)))
    return model.model.layers[0].self_attn


@pytest.mark.usefixtures("kernels")
def test_few_row_kernels_reject_bad_input():
    k = ops
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
    with pytest.raises(RuntimeError, match="fp32, bf16 or uint8"):
        k.rows_dot(x, w.half(), torch.tensor([1, 3]))
    with pytest.raises(RuntimeError, match="blocked int8/int4 rows of 8 values"):  # 7 bytes: no int8/int4 format
        k.rows_dot(x, torch.zeros(2, 5, 7, dtype=torch.uint8), torch.tensor([1, 3]))
    with pytest.raises(RuntimeError, match="cols is the width of a quantized w"):
        k.rows_combine(torch.randn(2, 5, 3), torch.zeros(2, 5, 34, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="differ in G or N"):
        k.rows_combine(torch.randn(2, 4, 3), torch.randn(2, 5, 8))


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_dot_one_matrix_keeps_the_leading_shape(dtype):
    k = ops
    x, w = torch.randn(2, 3, 20).to(dtype), torch.randn(7, 20).to(dtype)
    got = k.rows_dot(x, w)
    assert got.shape == (2, 3, 7) and got.dtype == dtype
    torch.testing.assert_close(got.double(), x.double() @ w.double().T, atol=1e-4, rtol=2**-8)
    with pytest.raises(RuntimeError, match="grouped rows take x"):
        k.rows_dot(x, w[None], torch.tensor([6]))


@pytest.mark.usefixtures("kernels")
@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, SMALL_ROWS), D=st.sampled_from([1, 7, 64, 1024]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 999))
def test_rms_norm_kernel_equals_module(rows, D, dtype, seed):
    """The decode RMSNorm kernel == RMSNorm's PyTorch formula (fp32 normalisation, rounded to the dtype, then
    scaled): fp32 within 1e-5; bf16 within one bf16 rounding of the scale-and-round steps."""
    g = torch.Generator().manual_seed(seed)
    norm = RMSNorm(D, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(D, generator=g))
    x = (torch.randn(D, rows, generator=g) * 3).to(dtype).t()[None]  # [1, rows, D], strided rows
    want = norm.weight * F.rms_norm(x.float(), (D,), eps=1e-6).to(dtype)
    with torch.no_grad():
        got = ops.rms_norm(x, norm.weight, 1e-6)
        plain = norm(x)
        norm.__class__ = CpuRMSNorm
        torch.testing.assert_close(norm(x), got, atol=0, rtol=0)  # the CPU module takes it
    assert got.dtype == dtype and got.shape == x.shape
    tol = TOL if dtype == torch.float32 else dict(atol=1e-2, rtol=2**-7)
    torch.testing.assert_close(got.float(), want.float(), **tol)
    torch.testing.assert_close(plain.float(), want.float(), **tol)


def test_cpu_modules_keep_autograd_and_many_rows_on_pytorch():
    """Under autograd, and with more than SMALL_ROWS rows per weight, the plain PyTorch paths run (gradients
    flow to inputs and weights)."""
    mla = _cpu_mla()
    x = torch.randn(2, 3, 4, requires_grad=True)
    w = torch.randn(2, 4, 5, requires_grad=True)
    mla.absorb_query(x, w).sum().backward()
    mla.apply_w_uv(x, w.transpose(1, 2)).sum().backward()
    assert x.grad is not None and w.grad is not None
    with torch.no_grad():
        many = torch.randn(2, SMALL_ROWS + 1, 4)
        torch.testing.assert_close(mla.absorb_query(many, w), many @ w, **TOL)
    lin = cpu_linear(8, 4, True)
    x = torch.randn(2, 8, requires_grad=True)
    lin(x).sum().backward()
    assert x.grad is not None and lin.weight.grad is not None


def make_experts(E, D, F_, seed, dtype=torch.float32, cpu=True):
    """Routed experts with random weights: the CPU class (cpu=True) or the plain one."""
    torch.manual_seed(seed)
    ex = RoutedExperts(E, D, F_)
    with torch.no_grad():
        ex.gate_up_proj.normal_(0, 0.3)
        ex.down_proj.normal_(0, 0.3)
    if cpu:
        ex.__class__ = CpuRoutedExperts
    return ex.to(dtype)


def plain_experts(ex, x, counts):
    """The plain module's forward on the same weights: the one-pass grouped GEMMs."""
    return RoutedExperts.forward(ex, x, counts)


def sorted_copies(E, D, N, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    expert_N = torch.randint(0, E, (N,), generator=g).sort().values
    counts_E = torch.bincount(expert_N, minlength=E)
    return torch.randn(N, D, generator=g).to(dtype), counts_E


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N", [1, 6, 13, 40])
def test_small_batch_experts_equal_grouped(N, dtype):
    """The small-batch expert path (one few-row product per chosen expert and projection) == the grouped GEMMs in
    the same dtype: fp32 within 1e-5; bf16 within 2% of the output's scale (both round the intermediates to bf16,
    in different summation orders)."""
    ex = make_experts(8, 32, 24, N, dtype)
    x, counts = sorted_copies(8, 32, N, N, dtype)
    with torch.no_grad():
        got = ex(x, counts)
        assert got.dtype == dtype
        want = plain_experts(ex, x, counts)
        tol = TOL if dtype == torch.float32 else dict(atol=0.02 * want.abs().max().item(), rtol=0.02)
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.usefixtures("kernels")
def test_small_batch_experts_only_for_few_copies_per_expert(monkeypatch):
    ex = make_experts(8, 32, 24, 0)
    x, counts = sorted_copies(8, 32, 4, 0)
    calls = []
    real = ops.rows_dot
    monkeypatch.setattr(ops, "rows_dot", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        ex(x, counts)
        assert len(calls) == 2  # the few-row op for both projections
        ex(torch.randn(17 * 8, 32), torch.tensor([17] * 8))  # 17 copies per expert: a GEMM's reuse wins
        assert len(calls) == 2
    ex(x, counts)  # autograd: the grouped GEMMs
    assert len(calls) == 2


def test_in_place_without_grad_equals_with_grad():
    ex = make_experts(4, 16, 8, 1)
    x, counts = sorted_copies(4, 16, 20, 1)
    with_grad = ex(x, counts)
    with torch.no_grad():
        torch.testing.assert_close(ex(x, counts), with_grad.detach())


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
        mp.setattr(modules, "BLOCK_BYTES", 1)
        assert ex._block_rows(x, dtype) == N  # autograd: one pass
        one_pass = ex(x, counts).detach()
        with torch.no_grad():
            assert ex._block_rows(x, dtype) == 256
            blocked = ex(x, counts)
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
    cfg = tiny_config(num_hidden_layers=2)
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


def test_logits_at():
    torch.manual_seed(0)
    model = DeepseekV2(tiny_config(num_hidden_layers=2)).eval()
    B, S = 2, 7
    ids = torch.randint(2, 100, (B, S))
    with torch.no_grad():
        full = model(ids)
        rows = torch.arange(B)[:, None] * S
        for n in (1, 3):  # each row's last n positions
            at = (rows + torch.arange(S - n, S)).flatten()
            torch.testing.assert_close(model(ids, logits_at=at), full[:, -n:].flatten(0, 1), **TOL)


def test_cache_writable_with_grad_mode_on():
    """Writes into the cache's stream views reach its storage with grad mode on (plain slices, not split()'s
    multi-output views, which autograd forbids writing)."""
    cache = KVCache({"c_kv": 3, "k_pe": 2}, num_layers=1, batch_size=1, max_len=4, dtype=torch.float32)
    cache.begin(1)
    c, k = torch.randn(1, 1, 3), torch.randn(1, 1, 2)
    cache.update(0, c_kv=c, k_pe=k)
    torch.testing.assert_close(cache.storage[0, :, :1], torch.cat((c, k), dim=-1))
    cache.buffers["c_kv"][:, :, :1] = 0.0
    assert cache.storage[0, :, :1, :3].abs().sum() == 0 and cache.storage[0, :, :1, 3:].equal(k)


# ---------------------------------------------------------------------------------------------------------------
# the CPU MLA decode kernel (kernels/mla_decode.cpp)
def _latent_reference(q_BKX, kv_BTX, valid_BT, C):
    s = torch.einsum("bkx,btx->bkt", q_BKX.double(), kv_BTX.double())
    if valid_BT is not None:
        s = s.masked_fill(~valid_BT[:, None, : kv_BTX.shape[1]], float("-inf"))
    return torch.einsum("bkt,btc->bkc", s.softmax(-1), kv_BTX[..., :C].double())




@pytest.mark.usefixtures("kernels")
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
    got = ops.mla_decode(q, kv, torch.empty(0, dtype=torch.bool) if valid is None else valid, C)
    torch.testing.assert_close(got.double(), _latent_reference(q, kv.float(), valid, C), atol=1e-5, rtol=1e-5)


@pytest.mark.usefixtures("kernels")
@settings(max_examples=40, deadline=None)
@given(lens=st.lists(st.integers(1, 300), min_size=1, max_size=4), block=st.sampled_from([1, 5, 16, 64]),
       K=st.integers(1, 9), X=st.sampled_from([7, 20, 72]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 999))
def test_paged_latent_attention_kernel_equals_reference(lens, block, K, X, dtype, seed):
    """The paged decode kernel on random block tables (blocks in any order, shared between sequences, unused
    table entries past a sequence's length holding any block): within 1e-5 of an fp64 reference over each
    sequence's rows gathered by its table."""
    g = torch.Generator().manual_seed(seed)
    C = X - 3 if X > 8 else X
    M = max(-(-n // block) for n in lens)
    blocks = torch.randn(M * len(lens) + 3, block, X, generator=g).to(dtype)
    table = torch.randint(0, blocks.shape[0], (len(lens), M), generator=g)
    q = torch.randn(len(lens), K, X, generator=g) * 0.3
    got = ops.mla_decode_paged(q, blocks, table, torch.tensor(lens), C)
    for b, n in enumerate(lens):
        kv = blocks[table[b]].reshape(-1, X)[:n].float()
        torch.testing.assert_close(got[b].double(), _latent_reference(q[b:b + 1], kv[None], None, C)[0],
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.usefixtures("kernels")
def test_paged_kernel_rejects_bad_tables():
    q, blocks = torch.randn(2, 4, 12), torch.randn(5, 3, 12)
    table, lens = torch.tensor([[4, 0], [1, 3]]), torch.tensor([6, 5])
    for t, n, msg in [(table, torch.tensor([7, 5]), "lens must be in"), (table, torch.tensor([0, 5]), "lens must"),
                      (torch.tensor([[5, 0], [1, 3]]), lens, "out of range"),
                      (torch.tensor([[-1, 0], [1, 3]]), lens, "out of range"), (table.int(), lens, "int64|Long")]:
        with pytest.raises(RuntimeError, match=msg):
            ops.mla_decode_paged(q, blocks, t, n, 8)


@pytest.mark.usefixtures("kernels")
def test_paged_decode_in_the_model_uses_the_kernel(monkeypatch):
    """CpuMLA.absorbed_paged goes through the kernel without grad and equals the plain gathered path."""
    mla = _cpu_mla()
    g = torch.Generator().manual_seed(0)
    H, N, R = mla.n_heads, mla.nope, mla.rope
    blocks = torch.randn(6, 4, mla.kv_rank + R, generator=g)
    table, lens = torch.tensor([[3, 1, 0], [5, 2, 2]]), torch.tensor([9, 6])
    q_nope, q_pe = torch.randn(2, 1, H, N, generator=g), torch.randn(2, 1, H, R, generator=g)
    calls = []
    real = ops.mla_decode_paged
    monkeypatch.setattr(ops, "mla_decode_paged", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        got = mla.absorbed_paged(q_nope, q_pe, blocks, table, lens)
        assert calls == [1]
        monkeypatch.setattr(ops, "available", False)  # the plain path: a gathered copy, masked
        want = mla.absorbed_paged(q_nope, q_pe, blocks, table, lens)
    assert calls == [1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.usefixtures("kernels")
def test_latent_attention_falls_back_under_autograd(monkeypatch):
    mla = _cpu_mla()
    calls = []
    real = ops.mla_decode
    monkeypatch.setattr(ops, "mla_decode", lambda *a: calls.append(1) or real(*a))
    q = torch.randn(1, 4, mla.kv_rank + mla.rope, requires_grad=True)
    kv = torch.randn(1, 6, mla.kv_rank + mla.rope)
    mla.latent_attention(q, kv, None, 1, 4).sum().backward()  # autograd: the differentiable GEMM path
    assert not calls and q.grad is not None
    with torch.no_grad():
        got = mla.latent_attention(q, kv, None, 1, 4)
        assert calls == [1]
        torch.testing.assert_close(got, MLA.latent_attention(mla, q, kv, None, 1, 4), **TOL)


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("padded", [False, True])
def test_decode_with_kernel_equals_gemm_path(padded, monkeypatch):
    """A whole model's decode steps, kernel vs the batched-GEMM path: same logits (fp32, 1e-5)."""
    cfg = tiny_config(num_hidden_layers=2)
    torch.manual_seed(0)
    model = DeepseekV2(cfg).eval()
    ids = torch.randint(2, cfg.vocab_size, (2, 40))
    pad = torch.ones(2, 40, dtype=torch.bool)
    if padded:
        pad[0, :7] = False
    outs = []
    for use_kernel in (True, False):
        if use_kernel:
            optimize(model)
        else:
            monkeypatch.setattr(ops, "available", False)
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
    monkeypatch.setattr(ops, "native_bf16", lambda: native)
    torch.manual_seed(0)
    lin = cpu_linear(64, 48, True).to(torch.bfloat16)
    x = torch.randn(40, 64).bfloat16()
    assert modules.gemm_dtype(x, 40) == (torch.bfloat16 if native else torch.float32)
    assert modules.gemm_dtype(x, 1) == torch.bfloat16
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
        y = ex(xs, counts)
    ref = make_experts(4, 32, 24, 0)(xs.float(), counts)
    torch.testing.assert_close(y.float(), ref, atol=0.05, rtol=0.05)


def test_kernel_build_key_ignores_the_clock():
    """The kernel's cache name hashes the CPU model and flags, not /proc/cpuinfo's varying MHz: one build per
    machine, not one per process."""
    sig = kernel_build.cpu_signature()
    assert "MHz" not in sig and "bogomips" not in sig
    assert sig == kernel_build.cpu_signature()


# ---------------------------------------------------------------------------------------------------------------
# the model with the fast paths on and off; the ops as torch.library custom ops
def _pair(**cfg_overrides):
    torch.manual_seed(0)
    plain = DeepseekV2(tiny_config(num_hidden_layers=3, **cfg_overrides)).eval()
    fast = optimize(copy.deepcopy(plain))
    return plain, fast


@pytest.mark.parametrize("attention_type", ["mla", "mha"])
def test_model_gives_the_same_outputs_with_fast_paths_on_and_off(attention_type):
    """Prefill logits, absorbed decode steps over the cache, greedy generation and a training step's loss and
    gradients: the optimized model (kernels where they build) equals the plain one (fp32, 1e-5)."""
    plain, fast = _pair(attention_type=attention_type)
    assert type(fast.lm_head) is CpuLinear and type(plain.lm_head) is torch.nn.Linear
    assert list(fast.state_dict()) == list(plain.state_dict())  # same parameters, same names
    ids = torch.randint(2, 4096, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(fast(ids), plain(ids), **TOL)
        caches = [m.new_cache(2, 16) for m in (plain, fast)]
        steps = []
        for m, cache in zip((plain, fast), caches, strict=True):
            m(ids[:, :8], cache=cache)
            steps.append(torch.stack([m(ids[:, i:i + 1], cache=cache) for i in range(8, 12)]))
        torch.testing.assert_close(steps[1], steps[0], **TOL)
    from dsv2 import generate

    prompts = [[0, 5, 6, 7], [0, 9]]
    assert generate(copy.deepcopy(plain), prompts, max_new_tokens=8) == generate(fast, prompts, max_new_tokens=8)
    grads = []
    for m in (plain, fast):
        m.train().zero_grad()
        m(ids[:, :-1], targets=ids[:, 1:]).backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], **TOL)


def test_model_in_bf16_with_fast_paths_on_and_off():
    """bf16 weights and cache: the fast paths round in different places (fp32 accumulation, one rounding), so the
    logits agree within bf16's resolution of their scale."""
    plain, fast = _pair()
    plain, fast = plain.to(torch.bfloat16), fast.to(torch.bfloat16)
    ids = torch.randint(2, 4096, (1, 10))
    with torch.no_grad():
        a, b = plain(ids).float(), fast(ids).float()
        torch.testing.assert_close(b, a, atol=0.05 * a.abs().max().item(), rtol=0.05)


def test_optimize_is_idempotent():
    _, fast = _pair()
    kinds = [type(m) for m in fast.modules()]
    assert [type(m) for m in optimize(fast).modules()] == kinds


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("op,args", [
    ("rows_dot", lambda: (torch.randn(3, 8), torch.randn(5, 8))),
    ("rows_dot", lambda: (torch.randn(4, 8), torch.randn(2, 5, 8), torch.tensor([1, 4]))),
    ("rows_combine", lambda: (torch.randn(2, 6, 3), torch.randn(2, 6, 7))),
    ("rms_norm", lambda: (torch.randn(2, 16), torch.rand(16) + 0.5, 1e-6)),
    ("mla_decode", lambda: (torch.randn(2, 4, 12), torch.randn(2, 9, 12), torch.ones(2, 9, dtype=torch.bool), 8)),
    ("mla_decode_paged", lambda: (torch.randn(2, 4, 12), torch.randn(5, 3, 12), torch.tensor([[4, 0, 2], [1, 1, 3]]),
                                  torch.tensor([7, 5]), 8)),
])
def test_ops_are_custom_ops_with_fake_implementations(op, args):
    """Each op's schema, its fake (meta) implementation against the kernel, and the reference implementation
    (what runs where the kernels do not build) against the kernel's result."""
    a = args()
    overload = getattr(torch.ops.dsv2, op).default
    torch.library.opcheck(overload, a, test_utils=("test_schema", "test_faketensor"))
    meta = overload(*[t.to("meta") if torch.is_tensor(t) else t for t in a])
    got = overload(*a)
    assert meta.shape == got.shape and meta.dtype == got.dtype
    reference = getattr(ops, f"_{op}")
    torch.testing.assert_close(got, reference(*a), atol=1e-5, rtol=1e-5)


def test_flop_counter_and_torch_compile_see_the_optimized_model():
    """The custom ops carry FLOP formulas (FlopCounterMode counts an optimized model's prefill and decode as it
    counts the plain model's, give or take the padding of the flash path) and trace under torch.compile (graph
    breaks where the plain model has them too: data-dependent MoE dispatch): same logits."""
    from torch.utils.flop_counter import FlopCounterMode

    plain, fast = _pair()
    ids = torch.randint(2, 4096, (1, 8))
    counts = []
    for m in (plain, fast):
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            m(ids)
            cache = m.new_cache(1, 12)
            m(ids, cache=cache)
            m(ids[:, :1], cache=cache)
        counts.append(fc.get_total_flops())
    assert 0.9 * counts[0] <= counts[1] <= 1.25 * counts[0], counts
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(fast, backend="eager")(ids), plain(ids), **TOL)
