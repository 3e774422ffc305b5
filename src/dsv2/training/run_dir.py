"""A training run's directory, and the rules that keep one run from mixing with or destroying another.

    RUN_DIR/
      .lock               held (flock) by the one trainer writing here; the kernel drops it when that process
                          ends, however it ends, so a killed run never leaves a stale lock behind
      train_config.json   the run's settings, written when it starts or resumes (what --resume continues with)
      metrics.jsonl       one JSON object per step
      tokenizer/          tokenizer.json, and sources.json: the data a tokenizer dsv2 trained was trained on
      data/               token files (data/token_files.py)
      checkpoints/        step_NNNNNNN/ (state.py); damaged-step_NNNNNNN/ for ones set aside on resume
      plots/              `dsv2 plot`

The rules: a new run starts only in a directory that holds no run (otherwise: --resume, another --out, or
--overwrite, which removes the files dsv2 wrote there by name, nothing else, and only once the new run's
settings have been checked, never what the new run reads); one trainer at a time per directory; a resumed run
keeps its settings (config.py) and reads the data it started with.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from ..files import atomic_write, file_mode
from .config import TrainConfig, TrainingError
from .data import TOKENIZER_FILE
from .data.token_files import META_FILE, SPLITS

LOCK_FILE = ".lock"
SETTINGS_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
TOKENIZER_DIR = "tokenizer"
DATA_DIR = "data"
PLOTS_DIR = "plots"
PLOT_FILES = ("loss.png", "balance.png", "expert_load.png", "lr_throughput.png")
SOURCES_FILE = "sources.json"
"""In tokenizer/: the data a tokenizer dsv2 trained was trained on (trainer.prepare_data)."""
STEP_PREFIX = "step_"
STATE_FILE = "trainer_state.json"
_STEP_RE = re.compile(rf"^{STEP_PREFIX}(\d+)$")
OWNED = {
    # what --overwrite removes: the files dsv2 writes, by name (a folder goes only if that leaves it empty)
    ".": (SETTINGS_FILE, METRICS_FILE),
    CHECKPOINTS_DIR: (f"{STEP_PREFIX}*", f"damaged-*{STEP_PREFIX}*", f".tmp-{STEP_PREFIX}*"),
    TOKENIZER_DIR: (TOKENIZER_FILE, SOURCES_FILE, ".*.tmp"),
    DATA_DIR: (*(f"{split}.bin" for split in SPLITS), META_FILE, TOKENIZER_FILE, ".*.tmp"),
    PLOTS_DIR: (*PLOT_FILES, ".*.tmp"),
}


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

    def checkpoint_path(self, step: int) -> Path:
        """Where the checkpoint of `step` is (or will be) written."""
        return self.checkpoints_dir / f"{STEP_PREFIX}{step:07d}"

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
        """Complete checkpoint directories (step_ and digits), by step (temporaries and set-aside ones are not
        listed)."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.checkpoints_dir.iterdir()
                 if (m := _STEP_RE.match(p.name)) and p.is_dir()]
        return [p for _, p in sorted(found)]

    def set_aside_checkpoints(self) -> list[Path]:
        return sorted(self.checkpoints_dir.glob(f"damaged-*{STEP_PREFIX}*")) if self.checkpoints_dir.is_dir() else []

    def holds_run(self) -> bool:
        """Anything a run writes is here (a run killed while it prepared its data counts too)."""
        return any(next(iter((self.path / folder).glob(pattern)), None) is not None
                   for folder, patterns in OWNED.items() for pattern in patterns)

    def stored_settings(self) -> dict[str, Any]:
        """The run's settings: train_config.json, else the newest checkpoint's (a checkpoint copied on its own);
        a TrainingError saying why there are none."""
        problems = []
        for path in [self.path / SETTINGS_FILE] + [c / STATE_FILE for c in reversed(self.checkpoints())]:
            if not path.exists():
                continue
            try:
                d = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                problems.append(f"{path} is unreadable ({e})")
                continue
            d = d.get("train_config") if path.name == STATE_FILE and isinstance(d, dict) else d
            if isinstance(d, dict):
                return d
            problems.append(f"{path} holds no settings object")
        if problems:
            raise TrainingError(f"--resume: cannot read the settings of {self.path}: {'; '.join(problems)}")
        raise TrainingError(f"--resume: {self.path} holds no run to resume (no {SETTINGS_FILE}, no checkpoint)")

    def describe(self) -> str:
        """Where the run stands, for messages: 'step 300 of 500' (its newest checkpoint) or 'no checkpoint'."""
        ckpts = self.checkpoints()
        if not ckpts:
            return "no checkpoint yet"
        step = int(_STEP_RE.match(ckpts[-1].name).group(1))
        try:
            total = self.stored_settings().get("max_steps")
        except TrainingError:
            total = None
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
        """Lock the directory and apply the rules for a new run (refuse it, or let --overwrite replace the one
        there: the caller calls clear() once the new run's settings are known to work) or a resumed one."""
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
                aside = self.set_aside_checkpoints()
                if aside:
                    raise TrainingError(f"--resume: the checkpoints of {self.path} were set aside as damaged "
                                        f"({', '.join(p.name for p in aside)}); see the warnings of the resume that "
                                        "set them aside")
                what = "has no checkpoint yet (it stopped before its first save)" if self.holds_run() else \
                    "holds no run"
                raise TrainingError(f"--resume: {self.path} {what}; start it again with --overwrite")
        elif self.holds_run() and not overwrite:
            if not self.checkpoints():
                raise TrainingError(f"{self.path} already holds a run that stopped before its first checkpoint; "
                                    "start it again with --overwrite, or train into another --out")
            raise TrainingError(f"{self.path} already holds a run ({self.describe()}); continue it with "
                                "--resume, start a new one with another --out, or replace it with --overwrite")

    def owned_paths(self) -> list[Path]:
        return [p for folder, patterns in OWNED.items() for pattern in patterns
                for p in (self.path / folder).glob(pattern)]

    def refuse_reading_from(self, paths: list[Path], what: str) -> None:
        """--overwrite must not remove what the new run reads (--init-from a checkpoint of this run, say)."""
        owned = [p.resolve() for p in self.owned_paths()]
        for path in paths:
            path = path.resolve()
            if any(path == o or o in path.parents for o in owned):
                raise TrainingError(f"--overwrite would delete {path}, which this run reads as its {what}; "
                                    "copy it elsewhere first, or train into another --out")

    def clear(self) -> None:
        """Remove what dsv2 wrote here (OWNED, by name), nothing else; a folder only if that empties it."""
        for p in self.owned_paths():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
        for folder in OWNED:
            if folder != "." and (self.path / folder).is_dir() and not any((self.path / folder).iterdir()):
                (self.path / folder).rmdir()

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
        """Move a damaged checkpoint out of the checkpoint list (kept for inspection; --overwrite removes it with
        the rest of the run)."""
        target = ckpt.with_name("damaged-" + ckpt.name)
        n = 1
        while target.exists():
            target, n = ckpt.with_name(f"damaged-{n}-{ckpt.name}"), n + 1
        os.replace(ckpt, target)
        return target
