"""The chunked LM loss fused with the LM head (lm_loss.py) == F.cross_entropy over materialised logits: values and
gradients, fp32 within 1e-5 relative (chunk sums in a different order)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv2.model import DeepseekV2
from dsv2.model import lm_loss as lm

TOL = dict(atol=1e-6, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(N=st.integers(1, 90), V=st.integers(2, 40), D=st.integers(1, 12), rows=st.integers(1, 100),
       ignore=st.floats(0.0, 0.6), scale=st.floats(-3.0, 3.0), seed=st.integers(0, 2**16))
def test_equals_cross_entropy_over_logits(N, V, D, rows, ignore, scale, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, requires_grad=True)
    w = torch.randn(V, D, generator=g, requires_grad=True)
    y = torch.randint(0, V, (N,), generator=g)
    y[torch.rand(N, generator=g) < ignore] = lm.IGNORE_INDEX
    y[0] = 0  # at least one target
    want = F.cross_entropy(h @ w.t(), y)
    got = lm.lm_loss(h, w, y, rows=rows)
    torch.testing.assert_close(got, want, **TOL)
    # the backward scales the gradients computed in the forward by the incoming one (here: scale)
    torch.testing.assert_close(torch.autograd.grad(scale * got, (h, w)), torch.autograd.grad(scale * want, (h, w)),
                               **TOL)


def test_without_grad_gives_the_loss_only():
    h, w, y = torch.randn(20, 4, requires_grad=True), torch.randn(7, 4), torch.randint(0, 7, (20,))
    with torch.no_grad():
        got = lm.lm_loss(h, w, y, rows=6)
    assert not got.requires_grad
    torch.testing.assert_close(got, F.cross_entropy(h @ w.t(), y), **TOL)


def test_all_targets_ignored_is_nan_as_cross_entropy():
    h, w = torch.randn(5, 3), torch.randn(4, 3)
    y = torch.full((5,), lm.IGNORE_INDEX)
    assert torch.isnan(lm.lm_loss(h, w, y)) and torch.isnan(F.cross_entropy(h @ w.t(), y))


def test_bad_shapes_are_errors():
    with pytest.raises(ValueError, match="h \\[N, D\\] and w \\[V, D\\]"):
        lm.lm_loss(torch.randn(4, 3), torch.randn(5, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="targets of shape"):
        lm.lm_loss(torch.randn(4, 3), torch.randn(5, 3), torch.zeros(3, dtype=torch.long))
    model = DeepseekV2(tiny_config(num_hidden_layers=2))
    with pytest.raises(ValueError, match="targets must have"):
        model(torch.zeros(1, 4, dtype=torch.long), targets=torch.zeros(1, 3, dtype=torch.long))


@pytest.mark.parametrize("tied", [False, True])
def test_model_targets_equal_cross_entropy_of_its_logits(tied):
    """model(x, targets=y), the trainer's path, == F.cross_entropy(model(x), y): loss and every parameter's grad
    (the tied case adds the head's gradient into the embedding's)."""
    torch.manual_seed(0)
    model = DeepseekV2(tiny_config(num_hidden_layers=2, vocab_size=300, tie_word_embeddings=tied))
    x, y = torch.randint(0, 300, (3, 40)), torch.randint(0, 300, (3, 40))
    want = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    want_g = torch.autograd.grad(want, list(model.parameters()))
    got, routings = model(x, targets=y, return_routing=True)
    assert routings and got.dtype == torch.float32
    torch.testing.assert_close(got, want, **TOL)
    for a, b in zip(torch.autograd.grad(got, list(model.parameters())), want_g, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_chunk_rows_keep_logits_near_chunk_bytes():
    assert lm.chunk_rows(4096) * 4096 * 4 == lm.CHUNK_BYTES
    assert lm.chunk_rows(102_400) == lm.MIN_ROWS  # V2's vocabulary: 128 tokens, 52 MB of logits
