"""Bitwise-reproducible CPU GEMMs across processes: what makes a resumed run log the losses of a straight one.

Intel MKL (torch's BLAS on x86) chooses among code paths per call, by CPU and by the memory alignment of the
operands, unless its conditional numerical reproducibility (CNR) mode is set; buffer alignment differs from one
process to the next, so without CNR the same step can round differently after a resume (seen on AMD EPYC: the
7th digit of the loss). MKL reads the MKL_CBWR environment variable once, at its first use, so dsv2 sets it
when it is imported (the user's own MKL_CBWR wins). AUTO,STRICT keeps the fastest code path of the CPU and only
pins the summation order; dsv2's few-row decode products do not go through MKL. Bitwise equality also needs the
same number of threads in both processes (MKL splits a GEMM by threads), which a resumed run on the same machine
has.

If MKL ran before dsv2 was imported (a GEMM in the same process), the mode can no longer change:
`mkl_reproducible()` tells, and training warns.

The rest of a CPU training step is reproducible by construction: the data order and token dropping are functions
of the seed and the step, micro-batch losses are summed in order, and every gradient that gathers copies of a row
adds them in order (the MoE dispatch uses index_select, whose gradient is index_add_, not indexing, whose gradient
adds with atomics). CUDA is another matter: index_add_, scatter_add_ and some cuBLAS reductions use atomics there.
`deterministic_algorithms()` turns on torch's deterministic variants for a run (`dsv2 train --deterministic`);
cuBLAS also needs CUBLAS_WORKSPACE_CONFIG set before CUDA starts, which dsv2 does at import, as for MKL.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from collections.abc import Iterator
from pathlib import Path

MKL_CBWR = "AUTO,STRICT"
CUBLAS_WORKSPACE_CONFIG = ":4096:8"  # what torch's reproducibility notes ask cuBLAS for (CUDA >= 10.2)
_CBWR_ALL = -1  # MKL_CBWR_ALL: query the whole mode word
_CBWR_STRICT = 0x10000  # mkl_cbwr.h: MKL_CBWR_STRICT


def request_reproducible_gemms() -> None:
    """Ask MKL for CNR before its first use (no effect once MKL has run; see mkl_reproducible), and cuBLAS for
    the fixed workspace its deterministic mode needs (read when CUDA starts, so set for every dsv2 process that
    uses CUDA: a few MB of cuBLAS workspace per stream; the user's own setting wins)."""
    os.environ.setdefault("MKL_CBWR", MKL_CBWR)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)


@contextlib.contextmanager
def deterministic_algorithms(on: bool = True) -> Iterator[None]:
    """torch's deterministic algorithms for the duration (when `on`): an op that has none warns instead of
    failing, unless the caller had made them strict already. The setting in force before comes back afterwards."""
    import torch

    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    if on:
        torch.use_deterministic_algorithms(True, warn_only=before[1] if before[0] else True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@functools.cache
def _mkl_cbwr_get():
    import torch

    try:  # torch links MKL statically into libtorch_cpu and exports its service functions
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        get = lib.mkl_serv_cbwr_get
    except (OSError, AttributeError):
        return None
    get.restype, get.argtypes = ctypes.c_int, [ctypes.c_int]
    return get


def mkl_reproducible() -> bool | None:
    """Whether MKL runs in a strict CNR mode; None where this torch has no MKL to ask."""
    import torch

    get = _mkl_cbwr_get() if torch.backends.mkl.is_available() else None
    if get is None:
        return None
    mode = get(_CBWR_ALL)
    return mode > 0 and bool(mode & _CBWR_STRICT)
