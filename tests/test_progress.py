"""Progress in a log file: plain lines when the stream is not a terminal, throttled by an injectable
clock (the training loops' own lines are tested beside them, in test_pretrain.py and test_meta.py)."""

from __future__ import annotations

import io

from fewshot_med.progress import Progress


class FakeClock:
    """A clock that only moves when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_lines_are_throttled_by_the_clock_unless_forced():
    clock, stream = FakeClock(), io.StringIO()
    with Progress(
        "meta-train", total=10, unit="episode", stream=stream, interval=60, clock=clock
    ) as progress:
        for now, done in [(10, 1), (61, 2), (100, 3)]:
            clock.now = 1000 + now
            progress.update(done)
        clock.now = 1101
        progress.update(4, force=True, loss=0.51234, val_acc=0.6)
        clock.now = 1160  # 59 s after the forced line
        progress.update(5)
        clock.now = 1161
        progress.update(5.5)
    assert stream.getvalue().splitlines() == [
        "meta-train: episode 2/10  elapsed=0:01:01  eta=0:04:04",
        "meta-train: episode 4/10  loss=0.5123  val_acc=0.6  elapsed=0:01:41  eta=0:02:32",
        "meta-train: episode 5.5/10  elapsed=0:02:41  eta=0:02:12",
    ]


def test_eta_counts_only_the_units_done_since_a_resume():
    clock, stream = FakeClock(), io.StringIO()
    progress = Progress("pretrain", total=30, unit="epoch", initial=20, stream=stream, clock=clock)
    progress.update(20, force=True)
    clock.now += 100
    progress.update(21, force=True)
    assert stream.getvalue().splitlines() == [
        "pretrain: epoch 20/30  elapsed=0:00:00  eta=?",
        "pretrain: epoch 21/30  elapsed=0:01:40  eta=0:15:00",
    ]


def test_a_terminal_gets_a_bar_not_lines():
    stream = Terminal()
    with Progress("pretrain", total=3, unit="epoch", stream=stream, interval=0) as progress:
        progress.update(0.5)
        progress.update(1, force=True, loss=1.5)
    output = stream.getvalue()
    assert "\r" in output and "1/3" in output and "loss=1.5" in output
    assert "elapsed=" not in output


def test_only_rank_0_of_a_torchrun_launch_reports(monkeypatch):
    for rank, expected in (("1", ""), ("0", "pretrain: epoch 1/2")):
        monkeypatch.setenv("RANK", rank)
        stream = io.StringIO()
        Progress("pretrain", total=2, unit="epoch", stream=stream).update(1, force=True)
        assert stream.getvalue().startswith(expected) and (expected or not stream.getvalue())
