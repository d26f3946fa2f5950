"""Failures carried to the planning collective, so that no rank waits for a peer that already failed.

A planner that fails on one rank only (a malformed ``dcplan.toml`` on one node, a
junk ``DCPLAN_VALIDATE``, a plugin missing there, a local planning error) must
not raise where its peers cannot see it: they would wait in the next collective
until the process-group timeout. Inside a multi-rank process group, dcplan's
planners therefore *keep* such an error (:func:`carry`), still take part in the
planning collective with an empty plan that carries the error's text, and the
coordinator raises :class:`dcplan.errors.RankPlanningError` naming every failed
rank and its error; torch hands that error to every rank. Outside a process
group (one process) the error is raised at once, as before.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from dcplan.errors import RankPlanningError

__all__ = ["carry", "describe", "in_process_group", "raise_carried"]

log = logging.getLogger("dcplan")


def in_process_group() -> bool:
    """Whether this process is one rank of several in the default process group."""
    try:
        import torch.distributed as dist

        return bool(dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)
    except Exception:  # noqa: BLE001 - a half-initialised group: behave as one process
        return False


def describe(exc: BaseException) -> str:
    """``"ErrorType: message"`` (what travels to the coordinator)."""
    return f"{type(exc).__name__}: {exc}"


def carry(planner: Any, exc: Exception, step: str) -> None:
    """Keep ``exc`` on ``planner`` for the planning collective, or raise it outside a process group."""
    if not in_process_group():
        raise exc
    if getattr(planner, "failure", None) is None:
        planner.failure = f"{describe(exc)} (in {step})"
        log.error("dcplan: %s failed on this rank; the error goes to every rank at the planning step: %s",
                  step, planner.failure)


def raise_carried(failures: Iterable[tuple[int, str | None]], side: str) -> None:
    """Raise :class:`RankPlanningError` when any ``(rank, failure)`` carries one."""
    bad = [(r, f) for r, f in failures if f]
    if bad:
        raise RankPlanningError(bad, side)
