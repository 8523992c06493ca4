"""One live progress line for long runs: updated in place on a terminal
(rich, which flax already installs), plain lines every few seconds in a
log (not a terminal) or through a caller's `out`."""

from __future__ import annotations

import sys
import time


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None or v != v else format(v, spec)


class Progress:
    def __init__(self, out=print, every_s: float = 5.0):
        self.out = out
        self.every_s = every_s
        self._last = 0.0
        self._live = None
        self._text = None
        if out is print and sys.stdout.isatty():
            try:
                from rich.console import Console
                from rich.live import Live
                from rich.text import Text

                self._Text = Text
                self._live = Live(Text(""), console=Console(), refresh_per_second=4, transient=False)
                self._live.start()
            except ImportError:
                self._live = None

    def line(self, seconds=None, examples=0, rate=0.0, auc=None, syncs=None, freshness=None, predictions=0,
             status: str | None = None) -> str:
        if status:
            return status
        return (f"{_fmt(seconds, '5.0f')} s  {examples:>10,} examples  {_fmt(rate, '8,.0f')} ex/s  "
                f"AUC {_fmt(auc, '.4f')}  syncs {_fmt(syncs, ',')}  freshness {_fmt(freshness, '.2f')} s  "
                f"{predictions:,} predictions")

    def status(self, text: str) -> None:
        self._show(text, force=True)

    def update(self, **fields) -> None:
        self._show(self.line(**fields))

    def _show(self, text: str, force: bool = False) -> None:
        if self._live is not None:
            self._live.update(self._Text(text))
            return
        now = time.monotonic()
        if force or now - self._last >= self.every_s:
            self._last = now
            self.out(text)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
