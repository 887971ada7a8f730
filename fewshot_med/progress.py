"""Progress of a long stage that reads well both on a terminal and in a scheduler's log file.

On a terminal (the stream is a TTY) a tqdm bar is drawn. Anywhere else, where a bar would either
switch itself off or fill the log with carriage returns, plain lines are printed instead::

    pretrain: epoch 3/30  loss=1.234  val_bal_acc=0.6120  elapsed=0:01:02  eta=0:09:18

A line is printed on every ``update(..., force=True)`` (a loop's epoch ends and validations) and on
any other ``update`` once ``interval`` seconds have passed since the last line, so a loop that calls
``update`` at every step gives a heartbeat at least that often without flooding the log.

Usage::

    with Progress("pretrain", total=epochs, unit="epoch") as progress:
        for epoch in range(epochs):
            for step in range(steps):
                ...
                progress.update(epoch + (step + 1) / steps)  # a heartbeat, at most once an interval
            progress.update(epoch + 1, force=True, loss=train_loss, val_bal_acc=score)
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import TextIO

from tqdm.auto import tqdm

#: seconds between two plain lines when no update is forced
DEFAULT_INTERVAL = 60.0


class Progress:
    """Progress of ``total`` units of work: a tqdm bar on a TTY, plain throttled lines otherwise.

    Use it as a context manager (or call ``close``). Elapsed time and the ETA are measured from
    construction, and the ETA extrapolates the rate of the units done since then (a resumed run
    passes its ``initial`` units, which do not count towards the rate).

    Args:
        stage: the name lines start with, e.g. ``pretrain``.
        total: units of the whole stage, e.g. epochs.
        unit: what a unit is called in lines, e.g. ``epoch``.
        initial: units already done (a resumed run).
        stream: where to write; ``sys.stderr`` (as it is at construction) when ``None``.
        interval: least seconds between two lines that are not forced.
        clock: seconds from an arbitrary origin (tests pass a fake one).
    """

    def __init__(
        self,
        stage: str,
        total: int,
        unit: str,
        initial: int = 0,
        stream: TextIO | None = None,
        interval: float = DEFAULT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stage, self.total, self.unit, self.initial = stage, total, unit, initial
        self.stream = sys.stderr if stream is None else stream
        self.interval, self.clock = interval, clock
        self.started = self.last_line = clock()
        self.bar: tqdm | None = None
        #: under torchrun only rank 0 reports (every rank runs the same loop)
        self.silent = os.environ.get("RANK", "0") != "0"
        if self.stream.isatty() and not self.silent:
            self.bar = tqdm(desc=stage, total=total, initial=initial, unit=unit, file=self.stream)

    def update(self, done: float, force: bool = False, **metrics: float) -> None:
        """Report that ``done`` units are finished (a fraction during a unit is fine).

        Args:
            done: units finished so far, counted from 0 (not from ``initial``).
            force: print a line now, whatever the interval (epoch ends, validations).
            **metrics: values to show, e.g. ``loss=0.61``; a bar keeps the last ones shown.
        """
        if self.silent:
            return
        if self.bar is not None:
            self.bar.update(int(done) - self.bar.n)
            if metrics:
                self.bar.set_postfix({key: f"{value:.4g}" for key, value in metrics.items()}, refresh=False)
            if force:
                self.bar.refresh()
            return
        now = self.clock()
        if force or now - self.last_line >= self.interval:
            self.last_line = now
            print(self._line(done, now, metrics), file=self.stream, flush=True)

    def _line(self, done: float, now: float, metrics: dict[str, float]) -> str:
        """The plain line for ``done`` units at clock time ``now``."""
        elapsed = now - self.started
        rate_done = done - self.initial
        eta = _clock_time(elapsed / rate_done * (self.total - done)) if rate_done > 0 else "?"
        shown = "".join(f"  {key}={value:.4g}" for key, value in metrics.items())
        return (
            f"{self.stage}: {self.unit} {round(done, 2):g}/{self.total}{shown}"
            f"  elapsed={_clock_time(elapsed)}  eta={eta}"
        )

    def close(self) -> None:
        """Finish the bar (plain lines need no closing)."""
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


def _clock_time(seconds: float) -> str:
    """``H:MM:SS`` of a duration, rounded to the second."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
