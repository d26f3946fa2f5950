"""dcplan-size-balanced: give each replicated item to the least-loaded holder.

Modes (``strategy_options = {mode = "..."}``):

* ``"torch"``: the same owners as torch's ``dedup_save_plans`` on the same plans
  (first-seen order, global tensor size as the weight) except that ties go to
  the lowest rank, where torch's follow Python set order.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch.distributed.checkpoint.planner import SavePlan, WriteItem

import dcplan
from dcplan.compat import replace_plan
from dcplan.planning import item_key

__all__ = ["torch_parity"]

MODES = ("torch",)


def _torch_weight(item: WriteItem) -> int:
    return item.tensor_storage_size() or 1


def torch_parity(all_plans: Sequence[SavePlan]) -> list[SavePlan]:
    """torch's greedy: items in first-seen order, weight = global tensor bytes, ties lowest rank."""
    holders: dict[tuple[str, tuple[int, ...]], list[int]] = {}
    weight: dict[tuple[str, tuple[int, ...]], int] = {}
    for rank, plan in enumerate(all_plans):
        for item in plan.items:
            k = item_key(item)
            holders.setdefault(k, []).append(rank)
            weight[k] = _torch_weight(item)  # torch keeps the last holder's item
    load = [0] * len(all_plans)
    owner: dict[tuple[str, tuple[int, ...]], int] = {}
    for k, ranks in holders.items():
        best = min(ranks, key=lambda r: (load[r], r))
        owner[k] = best
        load[best] += weight[k]
    return [
        replace_plan(plan, items=[i for i in plan.items if owner[item_key(i)] == rank])
        for rank, plan in enumerate(all_plans)
    ]


def size_balanced(all_plans: Sequence[SavePlan], mode: str = "torch") -> list[SavePlan]:
    if mode == "torch":
        return torch_parity(all_plans)
    raise ValueError(f"size_balanced: unknown mode {mode!r}; choose one of: {', '.join(MODES)}")


@dcplan.hookimpl
def dcplan_register_strategies() -> list[dcplan.Strategy]:
    return [
        dcplan.Strategy(
            name="size_balanced",
            func=size_balanced,
            description="replicated items go to the least-loaded holder (mode: " + "/".join(MODES) + ")",
            options={"mode": "torch"},
        )
    ]
