"""Compile the CPU kernels once per machine, so that no process, however it ends, can make another one wait.

torch's extension loader (`cpp_extension.load`) guards a build with a `lock` file that it deletes when done: a
process killed mid-build (the first run on a machine takes about a minute) leaves it behind, and every later
process waits for it forever. So dsv2 builds under its own lock, an flock the kernel releases when its holder
dies, removes a leftover torch `lock` (under the flock no other dsv2 build can be running in that folder), waits at
most BUILD_WAIT_S for another process's build and then goes on without kernels, and once a build has loaded
imports the library directly, bypassing the loader.

The build folder is named by a hash of everything that goes into the library: the source texts, torch's version
and install location, the Python headers and the CPU (the flags say -march=native). The sources are copied into
it before building, so two installs of the same dsv2 over the same torch share one build, and installs that would
build differently get different folders: none rebuilds another's.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import platform
import shutil
import sysconfig
import time
from pathlib import Path

log = logging.getLogger("dsv2")

SOURCE_DIR = Path(__file__).parent / "kernels"
SOURCES = ("module.cpp", "mla_decode.cpp", "few_rows.cpp", "rms_norm.cpp", "decode_step.cpp")
BUILD_WAIT_S = 600
"""How long a process waits for another one's build before it goes on with the PyTorch ops."""
DONE = "built"
"""Written into the build folder once the library has loaded: from then on processes import it directly."""


def cpu_signature() -> str:
    """The CPU model and instruction-set flags (not the clock, which /proc/cpuinfo reports as it varies)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
    except OSError:
        return platform.processor()
    return "|".join(ln for ln in lines if ln.split(":")[0].strip() in ("vendor_id", "model name", "flags"))


def _flags() -> list[str]:
    native = "-march=native" if platform.machine() in ("x86_64", "AMD64") else "-mcpu=native"
    return ["-O3", native, "-fopenmp", "-ffp-contract=fast", "-fno-math-errno"]


def _name() -> str:
    import torch

    texts = [(SOURCE_DIR / f).read_text() for f in sorted(os.listdir(SOURCE_DIR)) if f.endswith((".cpp", ".h"))]
    key = "|".join(texts + [torch.__version__, str(Path(torch.__file__).parent), sysconfig.get_paths()["include"],
                            platform.machine(), cpu_signature(), " ".join(_flags())])
    return "dsv2_kernels_" + hashlib.sha256(key.encode()).hexdigest()[:12]


def _import(name: str, folder: Path) -> Path:
    """Load the library into this process: its TORCH_LIBRARY_IMPL registers the kernels with torch.ops.dsv2."""
    import torch

    torch.ops.load_library(str(folder / f"{name}.so"))
    return folder / f"{name}.so"


def _import_built(name: str, folder: Path) -> Path | None:
    """The library of a finished build, or None (not built, or it does not load: then it is built again)."""
    if not (folder / DONE).exists():
        return None
    try:
        return _import(name, folder)
    except (ImportError, OSError, RuntimeError) as e:
        log.warning("dsv2: the built CPU kernels in %s do not load (%s); building them again", folder, e)
        return None


def _wait_for_lock(fd: int, lock_path: Path) -> bool:
    """Take the build lock, waiting up to BUILD_WAIT_S for a build in progress; False if it did not come free."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        log.warning("dsv2: waiting for process %s, which is building the CPU kernels (at most %d s)", holder,
                    BUILD_WAIT_S)
    deadline = time.monotonic() + BUILD_WAIT_S
    while time.monotonic() < deadline:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            time.sleep(0.5)
    log.warning("dsv2: the CPU kernel build in %s did not finish within %d s; going on without the kernels",
                lock_path.parent, BUILD_WAIT_S)
    return False


def load() -> Path | None:
    """Load the compiled kernels (registering them as the CPU implementation of torch.ops.dsv2, see ops.py),
    building them first if this machine has not; returns the library's path, or None where they cannot be had
    (no compiler, DSV2_NO_KERNELS=1, another build still running after BUILD_WAIT_S), with the reason logged.
    Call it once per process (ops.load_kernels)."""
    if os.environ.get("DSV2_NO_KERNELS"):
        return None
    try:
        from torch.utils import cpp_extension

        name = _name()
        folder = Path(cpp_extension._get_build_directory(name, verbose=False))
        library = _import_built(name, folder)
        if library is not None:
            return library
        lock_path = folder / "dsv2-build.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            if not _wait_for_lock(fd, lock_path):
                return None
            library = _import_built(name, folder)  # built (again) by the process we waited for
            if library is not None:
                return library
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            for leftover in ("lock", DONE, f"{name}.so"):  # torch's lock of a killed build; a library that failed
                (folder / leftover).unlink(missing_ok=True)
            src = folder / "src"
            src.mkdir(exist_ok=True)
            for f in os.listdir(SOURCE_DIR):  # only changed files: ninja keeps the objects of unchanged ones
                if f.endswith((".cpp", ".h")) and (not (src / f).exists() or
                                                   (src / f).read_bytes() != (SOURCE_DIR / f).read_bytes()):
                    shutil.copyfile(SOURCE_DIR / f, src / f)
            log.warning("dsv2: building the CPU decode kernels (once per machine and torch install, ~1 min)")
            cpp_extension.load(name, [str(src / f) for f in SOURCES], extra_cflags=_flags(),
                               extra_ldflags=["-fopenmp"], build_directory=str(folder), verbose=False,
                               is_python_module=False)
            (folder / DONE).write_text(f"{name}\n")
            return folder / f"{name}.so"
        finally:
            os.close(fd)
    except Exception as e:  # noqa: BLE001 - no compiler, no ninja, unsupported platform: keep the PyTorch ops
        log.warning("dsv2: CPU decode kernels unavailable (%s); decode uses PyTorch's GEMMs", e)
        return None
