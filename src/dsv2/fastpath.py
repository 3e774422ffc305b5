"""Inference fast paths for small batches (decode), each falling back to the plain PyTorch op it replaces.

Batch-1 decode reads every active weight once per token: it is bound by memory bandwidth, and what matters is
whether a kernel streams weights with all cores. Measured on an AVX2 2-core EPYC (torch 2.13, cold weights):

- `linear`: MKL's sgemm serves M = 1..16 rows from one thread (M=1: 9.6 GB/s of weights with 2 threads, the same
  as with 1; M=8: 3.6 GB/s); oneDNN's inner product streams with all threads (M=1: 16.5 GB/s, M=8: 8.2 GB/s; a
  plain sum reads 17.5). So fp32 CPU linears without autograd and with few rows go to oneDNN. Training, prefill
  (many rows), other dtypes and devices keep F.linear. `scores` does the same for MLA's absorbed decode scores,
  and `matmul_dtype` runs that attention in fp32 on CPUs without native bf16 matmul. Many-row bf16 GEMMs
  (prefill) run in fp32 there too (`gemm_dtype`: bf16 prefill at 2K tokens ~5x faster on an AVX2 EPYC).
- `gathered_swiglu`: the routed experts of a handful of token copies (decode). The grouped GEMM runs one
  single-threaded GEMV per expert; instead, one compiled reduction kernel per projection reads each chosen expert's
  weights in place (no gathered copy, no Python loop over experts) with all threads, upcasting bf16 in registers.
  torch.compile builds it once per process (seconds, cached on disk by inductor); where compiling is impossible
  (no C++ compiler, unsupported platform) the caller keeps its grouped path.
- `latent_attention`: MLA's absorbed decode attention in one pass over the latent cache (kernels/mla_decode.cpp,
  flash-decoding on CPU threads): the two batched GEMMs it replaces each stream the whole cache, the second with
  MKL's single-threaded few-row kernel. It is faster from the shortest caches on (whole decode step, 8 heads,
  4 layers: 1-2 ms less at batch 1 from 16 cached tokens, 12 ms less at batch 8 and 512 tokens). Built once per
  machine with torch's C++ extension loader (about a minute; cached under ~/.cache/torch_extensions); without a
  compiler, or with DSV2_NO_KERNELS=1, attention keeps the GEMM path.

tests/test_fastpath.py holds each fast path equal to its fallback.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

SMALL_ROWS = 16
"""Rows (batch tokens) up to which CPU fp32 linears use oneDNN."""

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@functools.cache
def _cpu_native_low_precision() -> bool:
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # unknown: leave dtypes alone
        return True


def matmul_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 for a bf16/fp16 CPU tensor when the CPU has no native low-precision matmul (AVX512-BF16 or AMX): there
    those GEMMs are emulated, several times slower than fp32. For MLA's absorbed attention over a long cache, which
    is compute-bound, upcasting the cache slice costs less than the emulation."""
    if t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float16) and not _cpu_native_low_precision():
        return torch.float32
    return t.dtype


def plain_eager() -> bool:
    """No dispatch mode (FlopCounterMode, fake tensors, profilers' modes) and no tracing: the fast paths call
    kernels that such modes cannot count or trace, so under them every op takes its reference form."""
    return torch._C._len_torch_dispatch_stack() == 0 and not torch.compiler.is_compiling()


def _no_grad_needed(*tensors: torch.Tensor) -> bool:
    return not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors)


def gemm_dtype(x: torch.Tensor, rows: int) -> torch.dtype:
    """The dtype a GEMM with `rows` rows of x should compute in: fp32 for bf16/fp16 on CPUs without native
    low-precision matmul once there are enough rows to amortise widening the weights (prefill, training): the
    products of bf16 values are exact in fp32 and accumulation is fp32 either way (as in oneDNN's and cuBLAS's bf16
    GEMMs), so only the summation order differs, at fp32 speed instead of the emulated bf16 rate (~6x slower here).
    Few rows (decode) read each weight once: widening would triple the bytes moved, so they keep x.dtype."""
    return matmul_dtype(x) if rows > SMALL_ROWS else x.dtype


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with few-row fp32 CPU inference calls served by oneDNN and many-row bf16 calls computed in fp32
    where bf16 GEMMs are emulated (see the module docstring and gemm_dtype)."""
    dtype = gemm_dtype(x, x.numel() // max(x.shape[-1], 1))
    if dtype != x.dtype and weight.dtype == x.dtype:
        return F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)).to(x.dtype)
    if (_ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.numel() <= SMALL_ROWS * x.shape[-1] and _no_grad_needed(x, weight) and plain_eager()):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def scores(q_BKX: torch.Tensor, kv_BTX: torch.Tensor) -> torch.Tensor:
    """q @ kv^T per batch row: [B, K, X] x [B, T, X] -> [B, K, T] (MLA's absorbed decode: K = query rows, T cached
    tokens). With few query rows, batched GEMM streams the cache at a third of the rate of oneDNN's inner product
    with the cache as its many-row input (measured 3.6 vs 10.2 GB/s at T=8K, K=8, X=576, 2 threads)."""
    if (_ONEDNN and kv_BTX.device.type == "cpu" and q_BKX.dtype == kv_BTX.dtype == torch.float32
            and q_BKX.shape[1] <= SMALL_ROWS and _no_grad_needed(q_BKX, kv_BTX) and plain_eager()):
        q_BKX = q_BKX.contiguous()  # a strided "weight" makes oneDNN reorder it at every call
        return torch.stack([torch.ops.mkldnn._linear_pointwise(kv_BTX[b], q_BKX[b], None, "none", [], "")
                            for b in range(q_BKX.shape[0])]).transpose(1, 2)
    return torch.bmm(q_BKX, kv_BTX.transpose(1, 2))


class Linear(nn.Linear):
    """nn.Linear (same parameters, same checkpoint names) whose forward is `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


# ---------------------------------------------------------------------------------------------------------------
# routed experts of a few token copies
GATHER_MIN_EXPERT_BYTES = 1 << 20
"""Below this many weight bytes per expert, call overhead rather than bandwidth dominates: keep the grouped GEMM."""

_compiled: dict[Callable, Callable] = {}
_disabled = False


def _swiglu_gathered_reference(x_ND, e_N, gate_up_EXD, down_EDF, act):
    """y_n = W_down[e_n] (act(W_gate[e_n] x_n) * W_up[e_n] x_n), written as reductions so that inductor fuses the
    index into the weight read (no [N, 2F, D] copy) and accumulates in fp32."""
    h_NX = (gate_up_EXD[e_N].float() * x_ND[:, None, :].float()).sum(-1)
    gate_NF, up_NF = h_NX.chunk(2, dim=-1)
    a_NF = (act(gate_NF) * up_NF).to(x_ND.dtype)
    return (down_EDF[e_N].float() * a_NF[:, None, :].float()).sum(-1).to(x_ND.dtype)


def _kernel(act: Callable) -> Callable:
    if act not in _compiled:
        _compiled[act] = torch.compile(functools.partial(_swiglu_gathered_reference, act=act), dynamic=True,
                                       fullgraph=True)
    return _compiled[act]


def use_gathered(x_ND: torch.Tensor, counts_E: torch.Tensor, gate_up_EXD: torch.Tensor, force: bool = False) -> bool:
    """Few copies per chosen expert (decode), CPU inference, experts big enough to be bandwidth-bound."""
    if _disabled or x_ND.device.type != "cpu" or not _no_grad_needed(x_ND, gate_up_EXD) or not plain_eager():
        return False
    if force:
        return True
    expert_bytes = gate_up_EXD[0].numel() * gate_up_EXD.element_size() * 3 // 2
    if expert_bytes < GATHER_MIN_EXPERT_BYTES or x_ND.shape[0] > SMALL_ROWS * 8:
        return False
    # each copy reads its expert's weights: worth it while copies rarely share an expert
    return 2 * x_ND.shape[0] <= 3 * int((counts_E > 0).sum())


def gathered_swiglu(x_ND, e_N, gate_up_EXD, down_EDF, act: Callable) -> torch.Tensor | None:
    """The compiled kernel's output, or None if it cannot be built here (the caller then uses its grouped path)."""
    global _disabled
    try:
        return _kernel(act)(x_ND, e_N, gate_up_EXD, down_EDF)
    except Exception as e:  # noqa: BLE001 - any compile failure means: no fast path on this machine
        _disabled = True
        log.warning("dsv2: compiled small-batch expert path unavailable (%s); using grouped GEMM", e)
        return None


# ---------------------------------------------------------------------------------------------------------------
# MLA absorbed decode attention (one query token per sequence)
_MLA_DECODE_SRC = Path(__file__).parent / "kernels" / "mla_decode.cpp"


@functools.cache
def _mla_decode_kernel():
    """The compiled kernel's entry point, or None where it cannot be built (logged once)."""
    if os.environ.get("DSV2_NO_KERNELS"):
        return None
    try:
        from torch.utils import cpp_extension

        # -march=native: the name carries the CPU and torch version, so a cache shared by machines stays correct
        key = f"{_MLA_DECODE_SRC.read_text()}|{torch.__version__}|{platform.machine()}|{_cpu_signature()}"
        name = "dsv2_mla_decode_" + hashlib.sha256(key.encode()).hexdigest()[:12]
        built = Path(cpp_extension._get_build_directory(name, verbose=False), f"{name}.so").exists()
        if not built:
            log.warning("dsv2: building the CPU MLA decode kernel (once per machine and torch version, ~1 min)")
        native = "-march=native" if platform.machine() in ("x86_64", "AMD64") else "-mcpu=native"
        flags = ["-O3", native, "-fopenmp", "-ffp-contract=fast", "-fno-math-errno"]
        return cpp_extension.load(name, [str(_MLA_DECODE_SRC)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                                  verbose=False).mla_decode
    except Exception as e:  # noqa: BLE001 - no compiler, no ninja, unsupported platform: keep the GEMM path
        log.warning("dsv2: CPU MLA decode kernel unavailable (%s); absorbed attention uses batched GEMMs", e)
        return None


def _cpu_signature() -> str:
    """The CPU model and instruction-set flags (not the clock, which /proc/cpuinfo reports as it varies)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
    except OSError:
        return platform.processor()
    return "|".join(ln for ln in lines if ln.split(":")[0].strip() in ("vendor_id", "model name", "flags"))


def latent_attention(q_BKX: torch.Tensor, kv_BTX: torch.Tensor, valid_BT: torch.Tensor | None,
                     C: int) -> torch.Tensor | None:
    """softmax(q kv^T) kv[..., :C] in fp32 for K query rows per batch row (the scale already in q), masking keys
    where valid_BT is False; None where the kernel does not apply (the caller then runs its GEMM path)."""
    if (kv_BTX.device.type != "cpu" or kv_BTX.stride(-1) != 1 or not _no_grad_needed(q_BKX, kv_BTX)
            or not plain_eager() or kv_BTX.dtype not in (torch.float32, torch.bfloat16, torch.float16)):
        return None
    kernel = _mla_decode_kernel()
    if kernel is None:
        return None
    mask = torch.empty(0, dtype=torch.bool) if valid_BT is None else valid_BT.contiguous()
    return kernel(q_BKX.float().contiguous(), kv_BTX, mask, C)
