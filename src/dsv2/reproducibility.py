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
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

MKL_CBWR = "AUTO,STRICT"
_CBWR_ALL = -1  # MKL_CBWR_ALL: query the whole mode word
_CBWR_STRICT = 0x10000  # mkl_cbwr.h: MKL_CBWR_STRICT


def request_reproducible_gemms() -> None:
    """Ask MKL for CNR before its first use (no effect once MKL has run; see mkl_reproducible)."""
    os.environ.setdefault("MKL_CBWR", MKL_CBWR)


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
