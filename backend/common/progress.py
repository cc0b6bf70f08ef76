"""Progress reporting and cooperative cancellation for pipeline stages.

Stages take a :class:`Progress` and call ``update`` between steps; ``update``
raises :class:`Cancelled` when the job was cancelled, which is how a job stops
"between steps". The server, the CLI and the tests plug in their own sinks.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

# sink(stage, overall_fraction, stage_fraction, message, preview_png)
Sink = Callable[[str, float, float, str, Optional[bytes]], None]


class Cancelled(Exception):
    """Raised inside a job when its cancellation was requested."""


class Progress:
    """Maps a stage's own 0..1 progress into the job's overall 0..1 range."""

    def __init__(
        self,
        sink: Sink | None = None,
        is_cancelled: Callable[[], bool] | None = None,
        stage: str = "job",
        lo: float = 0.0,
        hi: float = 1.0,
        min_interval: float = 0.1,
    ):
        self._sink = sink
        self._is_cancelled = is_cancelled
        self.stage = stage
        self.lo = lo
        self.hi = hi
        self.min_interval = min_interval
        self._last_emit = -1e9
        self._last_fraction = -1.0

    @property
    def cancelled(self) -> bool:
        return bool(self._is_cancelled and self._is_cancelled())

    def check(self) -> None:
        if self.cancelled:
            raise Cancelled()

    def update(self, fraction: float, message: str = "", preview_png: bytes | None = None, force: bool = False) -> None:
        """Report the stage's progress (0..1). Rate-limited unless ``force``,
        a preview, or the stage's end. Raises :class:`Cancelled`."""
        self.check()
        if self._sink is None:
            return
        now = time.monotonic()
        fraction = min(1.0, max(0.0, float(fraction)))
        if not (force or preview_png is not None or fraction >= 1.0 or now - self._last_emit >= self.min_interval):
            return
        self._last_emit = now
        self._last_fraction = fraction
        self._sink(self.stage, self.lo + (self.hi - self.lo) * fraction, fraction, message, preview_png)

    def child(self, stage: str, start: float, end: float) -> "Progress":
        """A sub-stage covering ``start..end`` of this one's range."""
        span = self.hi - self.lo
        p = Progress(self._sink, self._is_cancelled, stage, self.lo + span * start, self.lo + span * end, self.min_interval)
        p.update(0.0, force=True)
        return p

    def stages(self, weights: dict[str, float]) -> "StagePlan":
        return StagePlan(self, weights)


class StagePlan:
    """Split a progress range between named stages by weight (e.g. expected seconds)."""

    def __init__(self, parent: Progress, weights: dict[str, float]):
        total = sum(weights.values()) or 1.0
        self.parent = parent
        self.ranges: dict[str, tuple[float, float]] = {}
        acc = 0.0
        for name, w in weights.items():
            self.ranges[name] = (acc / total, (acc + w) / total)
            acc += w

    def __getitem__(self, name: str) -> Progress:
        start, end = self.ranges[name]
        return self.parent.child(name, start, end)


NULL = Progress()
