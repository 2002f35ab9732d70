"""Preemption: SIGTERM (TPU maintenance, spot VMs) as a flag the train loop checks after each step."""

from __future__ import annotations

import jax
import numpy as np


class Preemption:
    """SIGTERM (TPU maintenance, spot preemption) as a flag the loop checks after each step.

    Multi-host: jax's preemption sync point, where the coordination service catches the signal and all hosts
    agree on the step to stop at; if that service is not running, our own handler and an all-gather."""

    def __init__(self):
        import signal

        self.flag, self.signal = False, signal
        self._jax_sync = jax.process_count() > 1
        self._previous = None
        if self._jax_sync:
            from jax.experimental import multihost_utils

            try:
                multihost_utils.reached_preemption_sync_point(0)
            except Exception:  # noqa: BLE001 - no preemption service in this cluster
                self._jax_sync = False
        import threading

        if not self._jax_sync and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)  # only the main thread may set handlers

    def _handle(self, signum, frame):
        self.flag = True

    def reached(self, step: int) -> bool:
        if self._jax_sync:
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(step))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return bool(np.any(multihost_utils.process_allgather(np.asarray(self.flag))))
        return self.flag

    def close(self) -> None:
        if self._previous is not None:
            self.signal.signal(self.signal.SIGTERM, self._previous)
