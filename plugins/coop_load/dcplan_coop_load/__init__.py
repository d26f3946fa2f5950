"""dcplan-coop-load: cooperative loads -- each stored byte several ranks need is read once.

Select it by config (``load_strategy = "cooperative"`` in ``dcplan.toml`` /
``[tool.dcplan]``, ``DCPLAN_LOAD_STRATEGY=cooperative``) or per planner::

    dcp.load(sd, checkpoint_id=path,
             planner=dcplan.LoadPlanner(load_strategy="cooperative"),
             storage_reader=dcplan.FileSystemReader(path))

Options (``load_strategy_options``):

* ``scope``: ``"world"`` (default) shares among all ranks, ``"node"`` only among ranks
  on the same host (``socket.gethostname()``, or the ``host`` option);
* ``max_in_flight``: bytes of staged and exchanged data a rank holds per round
  (default 256 MiB; a single stored chunk larger than that travels alone);
* ``min_saving``: read plainly when cooperation would save less than this fraction of
  the default load's bytes (default 0.1; pure FSDP falls back);
* ``host``: this rank's host name for ``scope = "node"`` (tests).

The process group is the default one, or ``planner.process_group`` when set (set it to
the group you pass to ``dcp.load``). After the load, ``planner.load_stats`` holds a
:class:`CoopLoadStats` on every rank; the coordinator logs it once (logger ``dcplan``).
See ``docs/cooperative-load.md``.
"""

from __future__ import annotations

import socket
from typing import Any

import dcplan
from dcplan_coop_load.report import CoopLoadStats

__all__ = ["CoopLoadStats", "check_options", "local_info", "plan_global", "start"]

_SCOPES = ("world", "node")
_SHARED_OPTIONS = ("scope", "max_in_flight", "min_saving")


def check_options(options: dict[str, Any]) -> None:
    """Reject bad option values, on every rank, when the planner is built."""
    if options["scope"] not in _SCOPES:
        raise ValueError(f"cooperative: scope must be one of {', '.join(_SCOPES)}, got {options['scope']!r}")
    mif = options["max_in_flight"]
    if isinstance(mif, bool) or not isinstance(mif, int) or mif < 1:
        raise ValueError(f"cooperative: max_in_flight must be a positive number of bytes, got {mif!r}")
    ms = options["min_saving"]
    if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not 0 <= ms <= 1:
        raise ValueError(f"cooperative: min_saving must be a fraction between 0 and 1, got {ms!r}")
    if options["host"] is not None and not isinstance(options["host"], str):
        raise ValueError(f"cooperative: host must be a string, got {options['host']!r}")


def _group(planner: Any) -> Any:
    return getattr(planner, "process_group", None)


def local_info(planner: Any, options: dict[str, Any]) -> dict[str, Any]:
    """Every rank: its host, group rank, transport abilities and the shared options."""
    import torch
    import torch.distributed as dist

    info: dict[str, Any] = {
        "host": options["host"] or socket.gethostname(),
        "options": tuple((k, options[k]) for k in _SHARED_OPTIONS),
        "cuda": any(isinstance(v, torch.Tensor) and v.is_cuda for v in planner.state_dict.values()),
        "rank": 0,
        "world": 1,
        "nccl": False,
    }
    if dist.is_available() and dist.is_initialized():
        group = _group(planner)
        info["rank"] = dist.get_rank(group)
        info["world"] = dist.get_world_size(group)
        info["nccl"] = "nccl" in str(dist.get_backend(group)).lower()
    return info


def plan_global(all_plans: list[Any], planner: Any, **options: Any) -> list[Any]:
    """Coordinator: the cooperative global plan (see :mod:`dcplan_coop_load.plan`)."""
    from dcplan.load.strategy import load_infos
    from dcplan_coop_load.plan import plan_cooperative

    infos = load_infos(all_plans)
    mine = tuple((k, options[k]) for k in _SHARED_OPTIONS)
    bad = [r for r, i in enumerate(infos) if isinstance(i, dict) and i.get("options") != mine]
    if bad:
        raise dcplan.PlanMismatchError(
            f"dcplan: ranks disagree on the cooperative load options (coordinator: {dict(mine)}; "
            + "; ".join(f"rank {r}: {dict(infos[r]['options'])}" for r in bad[:8])
            + "); nothing was read. Make load_strategy_options identical on every rank."
        )
    return plan_cooperative(
        all_plans, planner.metadata, scope=options["scope"], max_in_flight=options["max_in_flight"],
        min_saving=float(options["min_saving"]),
    )


def start(planner: Any, plan: Any, options: dict[str, Any]) -> Any:
    """Every rank, in ``finish_plan``: the session that serves proxy reads and runs the exchange."""
    from dcplan_coop_load.exchange import CoopSession
    from dcplan_coop_load.plan import SCHEDULE_KEY

    pd = plan.planner_data
    schedule = pd.get(SCHEDULE_KEY) if isinstance(pd, dict) else None
    if schedule is None:
        return None
    return CoopSession(planner, schedule, _group(planner))


@dcplan.hookimpl
def dcplan_register_load_strategies() -> list[dcplan.LoadStrategy]:
    return [
        dcplan.LoadStrategy(
            name="cooperative",
            func=plan_global,
            description="each stored byte several ranks need is read once, then shared over the process group",
            options={"scope": "world", "max_in_flight": 256 << 20, "min_saving": 0.1, "host": None},
            check_options=check_options,
            local_info=local_info,
            start=start,
        )
    ]
