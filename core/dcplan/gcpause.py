"""Pausing the cyclic garbage collector while planning allocates millions of objects."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector (planning allocates millions of acyclic objects).

    With millions of live plan objects every automatic collection walks all of
    them, which can double the coordinator's planning time; nothing planning
    creates is cyclic, so pausing loses nothing. Re-entrant.

    On the way out, the objects allocated meanwhile are handed to the oldest
    generation (``gc.freeze`` + ``gc.unfreeze``, both O(1)) instead of being
    walked by the first young collection after the pause (seconds for millions
    of plan objects); most of them are freed by reference counting before a
    full collection would look at them. Skipped when the application keeps
    objects frozen itself (``gc.get_freeze_count() > 0``, e.g. before forking
    workers): their frozen state is left alone.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            if gc.get_freeze_count() == 0:
                gc.freeze()
                gc.unfreeze()
            gc.enable()

