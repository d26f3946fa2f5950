"""Count the bytes that pass through DCP's planning collectives (tests and benchmarks).

:func:`counting` patches, for the duration of a ``with`` block in one process,
``_DistWrapper.reduce_scatter`` (the plan step of ``dcp.save``: what this rank
sends to the gather and, on the coordinator, what it scatters) and
``torch.distributed.all_gather_object`` (dcplan's digest exchange). Sizes are
those of ``pickle.dumps`` of each object, as torch's object collectives pickle
them.
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Iterator
from typing import Any

import attrs

__all__ = ["WireCount", "counting"]


@attrs.define
class WireCount:
    """Bytes seen by one process: ``gathered`` (this rank's local plan),
    ``scattered`` (coordinator: all final plans it sends), ``exchanged`` (this
    rank's digest), and how many plan entries this rank sent."""

    gathered: int = 0
    scattered: int = 0
    exchanged: int = 0
    entries_sent: int = 0

    def to_dict(self) -> dict[str, int]:
        return attrs.asdict(self)


def _size(obj: Any) -> int:
    return len(pickle.dumps(obj))


def _entries(plan: Any) -> int:
    from dcplan.save.wire import LocalMsg

    msg = getattr(plan, "planner_data", None)
    if isinstance(msg, LocalMsg):
        return msg.wire.n if msg.wire is not None else 0
    return len(getattr(plan, "items", ()))


@contextlib.contextmanager
def counting() -> Iterator[WireCount]:
    import torch.distributed as dist
    from torch.distributed.checkpoint.utils import _DistWrapper

    count = WireCount()
    orig_rs = _DistWrapper.reduce_scatter
    orig_ag = dist.all_gather_object

    def reduce_scatter(self: Any, step: str, map_fun: Any, reduce_fun: Any) -> Any:
        if step != "plan":
            return orig_rs(self, step, map_fun, reduce_fun)

        def mapped() -> Any:
            out = map_fun()
            count.gathered += _size(out)
            count.entries_sent += _entries(out)
            return out

        def reduced(all_data: Any) -> Any:
            out = reduce_fun(all_data)
            count.scattered += sum(_size(p) for p in out)
            return out

        return orig_rs(self, step, mapped, reduced)

    def all_gather_object(object_list: Any, obj: Any, group: Any = None) -> Any:
        count.exchanged += _size(obj)
        return orig_ag(object_list, obj, group=group)

    _DistWrapper.reduce_scatter = reduce_scatter  # type: ignore[method-assign]
    dist.all_gather_object = all_gather_object
    try:
        yield count
    finally:
        _DistWrapper.reduce_scatter = orig_rs  # type: ignore[method-assign]
        dist.all_gather_object = orig_ag
