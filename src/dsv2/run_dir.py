"""A training run's directory, and the rules that keep one run from mixing with or destroying another.

    RUN_DIR/
      .lock               held (flock) by the one trainer writing here; the kernel drops it when that process
                          ends, however it ends, so a killed run never leaves a stale lock behind
      train_config.json   the run's settings, written when it starts or resumes (what --resume continues with)
      metrics.jsonl       one JSON object per step
      tokenizer/          tokenizer.json, and sources.json: the data a tokenizer dsv2 trained was trained on
      data/               token files (data.py)
      checkpoints/        step_NNNNNNN/ (train_state.py); damaged-step_NNNNNNN/ for ones set aside on resume
      plots/              `dsv2 plot`

The rules: a new run starts only in a directory that holds no run (otherwise: --resume, another --out, or
--overwrite, which removes what dsv2 wrote there and nothing else); one trainer at a time per directory; a
resumed run keeps its settings (train_config.py) and reads the data it started with.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Any

from .files import atomic_write, file_mode
from .train_config import TrainConfig, TrainingError

LOCK_FILE = ".lock"
SETTINGS_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
TOKENIZER_DIR = "tokenizer"
DATA_DIR = "data"
OWNED = (SETTINGS_FILE, METRICS_FILE, CHECKPOINTS_DIR, TOKENIZER_DIR, DATA_DIR, "plots")
"""What dsv2 writes into a run directory: all that --overwrite removes."""
STEP_PREFIX = "step_"
STATE_FILE = "trainer_state.json"


def _os_problem(e: OSError, path: Path) -> str:
    if e.errno in (errno.EEXIST, errno.ENOTDIR):
        return f"{path} (or a folder above it) is a file, not a directory"
    return f"cannot write to {path}: {e.strerror or e}"


class RunDir:
    """The directory of one training run (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock_fd: int | None = None

    # -- layout --------------------------------------------------------------------------------------------------
    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / TOKENIZER_DIR

    @property
    def data_dir(self) -> Path:
        return self.path / DATA_DIR

    def checkpoints(self) -> list[Path]:
        """Complete checkpoint directories, oldest first (temporaries and set-aside ones are not listed)."""
        if not self.checkpoints_dir.is_dir():
            return []
        return sorted(p for p in self.checkpoints_dir.glob(f"{STEP_PREFIX}*") if p.is_dir())

    def holds_run(self) -> bool:
        return (self.path / SETTINGS_FILE).exists() or self.metrics_path.exists() or bool(self.checkpoints())

    def stored_settings(self) -> dict[str, Any] | None:
        """The run's settings: train_config.json, else the newest checkpoint's (a checkpoint copied on its own)."""
        candidates = [self.path / SETTINGS_FILE] + [c / STATE_FILE for c in reversed(self.checkpoints())]
        for path in candidates:
            try:
                d = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            d = d.get("train_config", d) if path.name == STATE_FILE and isinstance(d, dict) else d
            if isinstance(d, dict):
                return d
        return None

    def describe(self) -> str:
        """Where the run stands, for messages: 'step 300 of 500' (its newest checkpoint) or 'no checkpoint'."""
        ckpts = self.checkpoints()
        if not ckpts:
            return "no checkpoint yet"
        step = int(ckpts[-1].name.removeprefix(STEP_PREFIX))
        total = (self.stored_settings() or {}).get("max_steps")
        finished = ", finished" if isinstance(total, int) and step >= total else ""
        return f"checkpoint at step {step}" + (f" of {total}{finished}" if total else "")

    # -- one trainer per directory -------------------------------------------------------------------------------
    def lock(self) -> None:
        """Hold the directory's lock for this process, or refuse naming the trainer that holds it."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, file_mode())
        except OSError as e:
            raise TrainingError(_os_problem(e, self.path)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise TrainingError(f"{self.path} is in use by another trainer (PID {holder}); wait for it to end or "
                                "stop it, or train into another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the last descriptor drops the flock
            self._lock_fd = None

    # -- starting a run --------------------------------------------------------------------------------------------
    def open(self, resume: bool, overwrite: bool) -> None:
        """Lock the directory and apply the rules for a new run (refuse, or --overwrite) or a resumed one."""
        if resume and overwrite:
            raise TrainingError("--resume and --overwrite contradict each other: --resume continues the run in "
                                f"{self.path}, --overwrite replaces it")
        if self.path.exists() and not self.path.is_dir():
            raise TrainingError(f"--out {self.path} is a file, not a directory")
        if resume and not self.path.is_dir():
            raise TrainingError(f"--resume: {self.path} does not exist; start a run there without --resume")
        self.lock()
        if resume:
            if not self.checkpoints():
                what = "has no checkpoint yet (it stopped before its first save)" if self.holds_run() else \
                    "holds no run"
                raise TrainingError(f"--resume: {self.path} {what}; start it again with --overwrite")
        elif self.holds_run():
            if not overwrite:
                raise TrainingError(f"{self.path} already holds a run ({self.describe()}); continue it with "
                                    "--resume, start a new one with another --out, or replace it with --overwrite")
            self.clear()

    def clear(self) -> None:
        """Remove what dsv2 wrote here (OWNED), nothing else."""
        for name in OWNED:
            p = self.path / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()

    def write_settings(self, tc: TrainConfig) -> None:
        atomic_write(self.path / SETTINGS_FILE, json.dumps(tc.to_dict(), indent=1) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """On resume, drop metric lines after the checkpoint's step (they will be produced again)."""
        if not self.metrics_path.exists():
            return
        keep = []
        for line in self.metrics_path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a crash
        atomic_write(self.metrics_path, "".join(line + "\n" for line in keep))

    def set_aside(self, ckpt: Path) -> Path:
        """Move a damaged checkpoint out of the checkpoint list (kept for inspection, never deleted)."""
        target = ckpt.with_name("damaged-" + ckpt.name)
        n = 1
        while target.exists():
            target, n = ckpt.with_name(f"damaged-{n}-{ckpt.name}"), n + 1
        os.replace(ckpt, target)
        return target
