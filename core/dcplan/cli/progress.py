"""Progress bars for long commands (``plan``, ``convert``, ``inspect``, ``verify``).

A bar on stderr when stderr is a terminal, nothing when it is a pipe or a file, so
that ``dcplan plan ... --json > out.json`` and CI logs stay clean. It uses tqdm, a
small, pure-Python, widely used library, rather than a hand-written bar: it handles
terminal width, rates, ETA and non-TTY output already.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

__all__ = ["progress"]

T = TypeVar("T")


def progress(iterable: Iterable[T], desc: str, *, total: int | None = None, unit: str = "it",
             enabled: bool | None = None, **kwargs: Any) -> Iterator[T]:
    """``iterable``, with a tqdm bar on a terminal (``enabled=None``: only when stderr is a TTY)."""
    if enabled is None:
        enabled = bool(getattr(sys.stderr, "isatty", lambda: False)())
    if not enabled:
        yield from iterable
        return
    from tqdm import tqdm

    yield from tqdm(iterable, desc=desc, total=total, unit=unit, file=sys.stderr, leave=False,
                    dynamic_ncols=True, **kwargs)
