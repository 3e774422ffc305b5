"""The language-modelling loss: next-token cross-entropy fused with the LM head, a chunk of tokens at a time.

    loss = 1/N sum_n (logsumexp_v z_nv - z_{n,y_n}),   z = h W^T   (h: final-norm hidden states, W: LM head)

Materialising z for a whole batch costs N x V fp32 values several times over (the logits, log-softmax's output,
the gradient, and the zeroed buffer nll_loss scatters into): at V2's vocabulary of 102,400 and 4,096 tokens per
micro-batch, about 5 GB. `lm_loss` instead walks the tokens in chunks of about CHUNK_BYTES of logits and, when a
gradient will be needed, computes it in the same pass, while the chunk's logits are in cache:

    dL/dz = (softmax(z) - onehot(y)) / N,   dL/dh = dL/dz W,   dL/dW = sum over chunks of (dL/dz)^T h

The backward pass then only scales those by the incoming gradient (the loss is a scalar, so that is exact).
FLOPs are those of the unfused head (three GEMMs). Shapes follow dsv2.model's legend (N tokens, V vocabulary).
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK_BYTES = 16 * 2**20  # fp32 logits per chunk (at least MIN_ROWS tokens)
MIN_ROWS = 128
IGNORE_INDEX = -100  # as F.cross_entropy: targets equal to it add no loss and no gradient


def chunk_rows(vocab_size: int) -> int:
    return max(MIN_ROWS, CHUNK_BYTES // (4 * vocab_size))


class _FusedLMLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND: Tensor, w_VD: Tensor, y_N: Tensor, rows: int, grad: bool) -> Tensor:
        N = h_ND.shape[0]
        keep_N = y_N != IGNORE_INDEX
        count = keep_N.sum()
        dh_ND = torch.empty_like(h_ND) if grad else None
        dw_VD = torch.zeros_like(w_VD, dtype=torch.float32) if grad else None
        total = torch.zeros((), dtype=torch.float32, device=h_ND.device)
        for s in range(0, N, rows):
            h_nD, y_n, keep_n = h_ND[s:s + rows], y_N[s:s + rows], keep_N[s:s + rows]
            z_nV = (h_nD @ w_VD.t()).float()
            lse_n = torch.logsumexp(z_nV, dim=-1)
            target_n = z_nV.gather(1, y_n.clamp_min(0)[:, None])[:, 0]
            total += torch.where(keep_n, lse_n - target_n, 0.0).sum()
            if grad:  # (softmax - onehot) / count in place of the logits, zero rows for ignored targets
                g_nV = z_nV.sub_(lse_n[:, None]).exp_()
                g_nV.scatter_add_(1, y_n.clamp_min(0)[:, None], -torch.ones_like(lse_n)[:, None])
                g_nV.mul_((keep_n / count)[:, None])
                dh_ND[s:s + rows] = g_nV.to(w_VD.dtype) @ w_VD
                dw_VD.addmm_(g_nV.t(), h_nD.to(torch.float32))
        if grad:
            ctx.save_for_backward(dh_ND, dw_VD)
            ctx.w_dtype = w_VD.dtype
        return total / count  # no target left: nan, as F.cross_entropy

    @staticmethod
    def backward(ctx, g: Tensor):
        dh_ND, dw_VD = ctx.saved_tensors
        dh = dh_ND * g.to(dh_ND.dtype) if ctx.needs_input_grad[0] else None
        dw = (dw_VD * g).to(ctx.w_dtype) if ctx.needs_input_grad[1] else None
        return dh, dw, None, None, None


def lm_loss(h_ND: Tensor, w_VD: Tensor, y_N: Tensor, rows: int | None = None) -> Tensor:
    """Mean cross-entropy of the logits h_ND @ w_VD^T against targets y_N (IGNORE_INDEX: skipped), as
    F.cross_entropy(h_ND @ w_VD.T, y_N) but without the [N, V] logits in memory. rows: tokens per chunk
    (default: chunk_rows(V)). Returns an fp32 scalar."""
    if h_ND.dim() != 2 or w_VD.dim() != 2 or h_ND.shape[1] != w_VD.shape[1]:
        raise ValueError(f"lm_loss: h [N, D] and w [V, D] expected, got {tuple(h_ND.shape)} and {tuple(w_VD.shape)}")
    if y_N.shape != h_ND.shape[:1]:
        raise ValueError(f"lm_loss: {h_ND.shape[0]} hidden states but targets of shape {tuple(y_N.shape)}")
    rows = rows or chunk_rows(w_VD.shape[0])
    if rows < 1:
        raise ValueError(f"lm_loss: rows must be positive, got {rows}")
    grad = torch.is_grad_enabled() and (h_ND.requires_grad or w_VD.requires_grad)
    return _FusedLMLoss.apply(h_ND, w_VD, y_N, rows, grad)
