"""Progress bars for long, countable jobs (ahead-of-time compiles, k-means).

A bar appears only where someone is watching: tqdm is installed and stderr is a
terminal. Logs, pipes and CI output stay clean. `CONVDSL_PROGRESS=0` turns the
automatic bars off; `CONVDSL_PROGRESS=1` turns them on even without a terminal
(still only with tqdm). A caller's explicit `progress=True/False` wins over both.
"""
from __future__ import annotations

import os
import sys

ENV = "CONVDSL_PROGRESS"
_OFF = {"0", "off", "false", "no"}
_ON = {"1", "on", "true", "yes"}


def wanted(progress: bool | None = None) -> bool:
    """Whether to show a bar: `progress` if given, else the environment, else
    whether stderr is a terminal."""
    if progress is not None:
        return bool(progress)
    setting = os.environ.get(ENV, "").strip().lower()
    if setting in _OFF:
        return False
    if setting in _ON:
        return True
    stream = sys.stderr
    return bool(getattr(stream, "isatty", None) and stream.isatty())


class _Quiet:
    """The bar nobody sees: same interface, does nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bar(total: int, desc: str, progress: bool | None = None):
    """A tqdm bar on stderr (`update(n)`, `close()`, usable with `with`), or a
    quiet stand-in when no bar is wanted or tqdm is not installed."""
    if not wanted(progress):
        return _Quiet()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _Quiet()
    return tqdm(total=total, desc=desc, leave=False, file=sys.stderr)
