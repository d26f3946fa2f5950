"""Load strategies: how the ranks of a load share the reading (``load_strategy``).

A load strategy (:class:`dcplan.LoadStrategy`, registered through
``dcplan_register_load_strategies``) shapes the global load plan on the coordinator
and may run a *session* on every rank that serves items it added to the plan and
finishes the load after the rank's own reads. The built-in ``default`` is torch's
behaviour: every rank reads what it needs.

The contract between planner and storage reader (torch has no post-read hook):

* a reader that supports it marks each local plan in ``prepare_local_plan`` with
  :func:`mark_reader` (``planner_data[READER_KEY] = True``), so the coordinator knows
  every rank's reader will call back; without the mark a strategy must plan plain reads;
* at the end of ``read_data`` the reader calls ``planner.finish_reads(plan, read=...,
  error=...)`` exactly once, where ``read(plan)`` reads more items of the same checkpoint
  the same way (calling ``planner.resolve_tensor``/``commit_tensor``/``load_bytes``) and
  ``error`` is the exception its own reads raised, if any.

See ``docs/cooperative-load.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from dcplan import compat
from dcplan.types import LoadStrategy

__all__ = ["LOAD_INFO_KEY", "READER_KEY", "LoadSession", "check_agreement", "load_infos", "default_load_strategy", "mark_reader", "reader_marked"]

#: ``LoadPlan.planner_data`` key of a rank's load-strategy info (name, options, ``local_info``).
LOAD_INFO_KEY = "dcplan_load_strategy"
#: ``LoadPlan.planner_data`` key a storage reader sets when it calls ``planner.finish_reads``.
READER_KEY = "dcplan_finish_reads"


class LoadSession(Protocol):
    """What a load strategy's ``start`` returns, per rank and load."""

    def resolve_tensor(self, read_item: Any) -> Any | None: ...  # None: not mine

    def commit_tensor(self, read_item: Any, tensor: Any) -> bool: ...  # True: handled

    def load_bytes(self, read_item: Any, value: Any) -> bool: ...  # True: handled

    def finish_reads(self, plan: Any, read: Callable[[Any], None] | None, error: BaseException | None) -> None: ...


def mark_reader(plan: Any) -> Any:
    """``plan`` with ``planner_data[READER_KEY] = True`` (when its planner_data is a dict or empty)."""
    pd = plan.planner_data
    if pd is None or isinstance(pd, dict):
        return compat.replace_plan(plan, planner_data={**(pd or {}), READER_KEY: True})
    return plan


def reader_marked(plan: Any) -> bool:
    """Whether the rank's storage reader will call ``planner.finish_reads``."""
    pd = plan.planner_data
    return isinstance(pd, dict) and bool(pd.get(READER_KEY))


def load_infos(all_plans: Sequence[Any]) -> list[Any]:
    """Each rank's ``local_info`` (``None`` where a rank sent none)."""
    out = []
    for plan in all_plans:
        pd = plan.planner_data
        entry = pd.get(LOAD_INFO_KEY) if isinstance(pd, dict) else None
        out.append(entry[1] if isinstance(entry, tuple) else None)
    return out


def check_agreement(all_plans: Sequence[Any], name: str) -> None:
    """Every rank must load with the same load strategy (a rank that reads for others must know it).

    :raises PlanMismatchError: naming the ranks that differ; raised during planning, so
        it reaches every rank before any byte is read.
    """
    names = []
    for plan in all_plans:
        pd = plan.planner_data
        entry = pd.get(LOAD_INFO_KEY) if isinstance(pd, dict) else None
        names.append(entry[0] if isinstance(entry, tuple) else None)
    bad = [r for r, n in enumerate(names) if n != name]
    if bad and not (name == "default" and all(n in (None, "default") for n in names)):
        from dcplan.errors import PlanMismatchError

        shown = ", ".join(f"rank {r}: {names[r] or 'not dcplan.LoadPlanner'}" for r in bad[:8])
        raise PlanMismatchError(
            f"dcplan: ranks disagree on the load strategy (coordinator: {name!r}; {shown}); nothing was "
            "read. Use dcplan.LoadPlanner with the same load_strategy on every rank."
        )


def _default(all_plans: Sequence[Any], planner: Any = None) -> list[Any]:
    return list(all_plans)


def default_load_strategy() -> LoadStrategy:
    """The built-in ``default``: every rank reads what it needs (torch's behaviour)."""
    return LoadStrategy(
        name="default",
        func=_default,
        description="every rank reads what it needs from storage (torch's behaviour)",
    )
