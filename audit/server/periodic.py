"""A daemon thread that calls `tick` each time `delay()` seconds have passed, until stopped:
serve's scheduled audits and its daily report. A tick in progress finishes before stop returns."""

from __future__ import annotations

import threading
from collections.abc import Callable


class Periodic:
    def __init__(self, name: str, delay: Callable[[], float], tick: Callable[[], object]):
        self.delay, self.tick = delay, tick
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(max(self.delay(), 0.0)):
            self.tick()
