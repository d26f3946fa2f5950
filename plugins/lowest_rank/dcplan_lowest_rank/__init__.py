"""dcplan-lowest-rank: each replicated item goes to the lowest rank holding it.

Good for load locality (one file holds every replicated scalar, like torch's
``dedup_save_to_lowest_rank=True``) and node-local filesystems.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch.distributed.checkpoint.planner import SavePlan

import dcplan
from dcplan.compat import replace_plan
from dcplan.save.local import item_key

__all__ = ["lowest_rank"]


def lowest_rank(all_plans: Sequence[SavePlan]) -> list[SavePlan]:
    """Keep each item on the first (lowest) rank whose plan holds it."""
    taken: set[tuple[str, tuple[int, ...]]] = set()
    out = []
    for plan in all_plans:
        items = []
        for item in plan.items:
            key = item_key(item)
            if key in taken:
                continue
            taken.add(key)
            items.append(item)
        out.append(replace_plan(plan, items=items))
    return out


@dcplan.hookimpl
def dcplan_register_strategies() -> list[dcplan.Strategy]:
    return [
        dcplan.Strategy(
            name="lowest_rank",
            func=lowest_rank,
            description="every replicated item is written by the lowest rank holding it",
        )
    ]
