"""Files that are either complete or absent: every file dsv2 writes (checkpoints, token files, run records) goes
through here.

A file is written under a unique hidden name in its target's folder, flushed to the disk and renamed into place:
`os.replace` is atomic within one file system, so a crash, a Ctrl-C or a power cut never leaves a half-written
file under the real name, and two processes writing the same target never write into each other's temporaries.
The file then gets the permissions of any other output file (0666 minus the umask): safetensors writes its files
owner-only (0600), which would make a run's checkpoints unreadable to the group that can read the rest of the run.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path


@functools.cache
def file_mode() -> int:
    """0666 minus this process's umask: the mode open() gives a new file."""
    try:  # Linux >= 4.7 reports the umask without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it; restored at once
    os.umask(mask)
    return 0o666 & ~mask


def temp_path(directory: Path, name: str) -> Path:
    """A new, empty, uniquely named hidden file in `directory` for `name`'s content (rename it into place)."""
    tmp = Path(directory) / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    tmp.open("xb").close()
    return tmp


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries (a rename in it), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # a folder on a file system that cannot sync one: the file itself was synced
        pass
    finally:
        os.close(fd)


def finish(tmp: Path, target: Path) -> None:
    """Give a written temporary the usual permissions, flush it to the disk, rename it to `target` and flush the
    rename: after a power cut too the target is the old file or the new one."""
    os.chmod(tmp, file_mode())
    fsync_path(tmp)
    os.replace(tmp, target)
    fsync_path(Path(target).parent)


def atomic_write(target: str | os.PathLike, data: bytes | str | Callable[[str], None]) -> None:
    """Write `target` whole: `data` as bytes, as UTF-8 text, or by calling data(temporary_path)."""
    target = Path(target)
    tmp = temp_path(target.parent, target.name)
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        elif isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            data(str(tmp))
        finish(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_safetensors(target: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file through atomic_write. Its I/O failures (a full disk) come out as the OSError they
    are, not as a SafetensorError that only mentions the errno in its text."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    def write(tmp: str) -> None:
        try:
            save_file(tensors, tmp, metadata=metadata)
        except SafetensorError as e:
            code = re.search(r"os error (\d+)", str(e))
            if code is None:
                raise
            n = int(code.group(1))
            raise OSError(n, os.strerror(n) if n in errno.errorcode else str(e), str(target)) from None

    atomic_write(target, write)
