"""Job progress for people: a bar in a terminal, periodic log lines otherwise (CLI layer).

[##########----------]  12/24  ok 11  failed 1  skipped 0  |  41.3/h  ETA 17m26s
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from raytseg.batch.results import BatchReport, ItemResult, JobProgress

_BAR_WIDTH = 20


class ProgressPrinter:
    """Renders ``JobProgress`` updates to ``stream``; failures get a line of their own."""

    def __init__(self, stream: TextIO, *, tty: bool | None = None, interval_s: float = 10.0) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.interval_s = interval_s
        self._last_line: float | None = None  # not 0: the monotonic clock starts at boot
        self._drawn = False

    def update(self, progress: JobProgress, result: ItemResult) -> None:
        if result.status == "failed":
            self._write_line(f"failed {result.id}: {result.error_type}: {_first_line(result.error_message)}")
        if self.tty:
            self.stream.write("\r" + status_line(progress, bar=True))
            self.stream.flush()
            self._drawn = True
            return
        now = time.monotonic()
        due = self._last_line is None or now - self._last_line >= self.interval_s
        if due or progress.done == progress.total:
            self._last_line = now
            self._write_line(status_line(progress, bar=False))

    def close(self, report: BatchReport) -> None:
        ok, failed, skipped = (report.count(s) for s in ("ok", "failed", "skipped"))
        computed = ok + failed
        rate = 3600.0 * computed / report.elapsed_s if report.elapsed_s > 0 else 0.0
        self._write_line(
            f"{len(report.results)} item(s): {ok} ok, {failed} failed, {skipped} skipped "
            f"in {_duration(report.elapsed_s)} ({rate:.1f} volumes/h). Results: {report.results_uri}"
        )

    def _write_line(self, text: str) -> None:
        if self._drawn:  # finish the bar's line first
            self.stream.write("\n")
            self._drawn = False
        self.stream.write(text + "\n")
        self.stream.flush()


def status_line(progress: JobProgress, *, bar: bool) -> str:
    counts = (
        f"{progress.done}/{progress.total}  ok {progress.ok}  failed {progress.failed}  "
        f"skipped {progress.skipped}  |  {progress.rate_per_hour:.1f}/h"
    )
    eta = progress.eta_s
    text = f"{counts}  ETA {_duration(eta)}" if eta is not None else counts
    if not bar:
        return text
    filled = _BAR_WIDTH * progress.done // max(progress.total, 1)
    return f"[{'#' * filled}{'-' * (_BAR_WIDTH - filled)}]  {text}"


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0] if text and text.strip() else ""
