"""Stopping a run cleanly on a signal: Ctrl-C or a scheduler's SIGTERM ends the run at a step boundary, with a
checkpoint (trainer.train), instead of wherever the signal lands."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

from tqdm import tqdm


class GracefulStop:
    """SIGINT (Ctrl-C) and SIGTERM while training: finish the step, write a checkpoint, stop. A second signal
    stops at once (KeyboardInterrupt): the checkpoints written so far stay whole (state.py)."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        tqdm.write(f"{signal.Signals(signum).name}: stopping after this step with a checkpoint "
                   "(again to stop at once)", file=sys.stderr)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
